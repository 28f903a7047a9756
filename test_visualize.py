"""visualize.py renders a tiny DRIP checkpoint's segments and reports unreadable files clearly."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data import image_transform, make_shape_image
from model import CLIP, make_config

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = make_config("tiny", compress=4)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    torch.save({"model": CLIP(cfg).state_dict(), "model_config": cfg.__dict__, "run_config": {"model": "tiny"}}, path)
    return path


def visualize(*args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, "visualize.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_without_out_dir_the_data_folder_is_left_as_it_was(checkpoint, tmp_path):
    """A picture written next to a validation image would be read back as data: the default is out/visualize."""
    data = tmp_path / "data" / "val" / "red_ring"
    data.mkdir(parents=True)
    make_shape_image(random.Random(0), 3, size=48)[0].save(data / "0000.jpg")
    os.makedirs(tmp_path / "out" / "clip_tiny_c4")
    torch.save(dict(torch.load(checkpoint, weights_only=False), tokenizer=""), tmp_path / "out" / "clip_tiny_c4" / "ckpt.pt")
    result = visualize(str(data / "0000.jpg"), cwd=tmp_path)  # the newest checkpoint, and it says which
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"the newest drip checkpoint: {os.path.join('out', 'clip_tiny_c4', 'ckpt.pt')}\n")
    assert os.listdir(data) == ["0000.jpg"]
    assert (tmp_path / "out" / "visualize" / "0000_drip.png").is_file()


def test_a_photo_is_drawn_with_its_crop_said_and_left_visible(checkpoint, tmp_path):
    """A 300 x 200 photo (any mode): the model's 48 px input and the crop are said; the photo's
    crop keeps its pixels outside the segment borders (outlines, not a tint); each checkpoint's
    panel is that photo beside the segment map, under a header, over a legend."""
    photo = np.zeros((200, 300, 3), dtype=np.uint8)
    photo[..., 0] = np.linspace(0, 255, 300, dtype=np.uint8)[None, :]  # a red ramp across, green down
    photo[..., 1] = np.linspace(0, 255, 200, dtype=np.uint8)[:, None]
    Image.fromarray(photo).convert("RGBA").save(tmp_path / "photo.png")
    result = visualize(str(tmp_path / "photo.png"), "--ckpt", checkpoint, "--ckpt", checkpoint, "--out_dir",
                       str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out" / "photo_drip.png"
    assert f"{out}: {tmp_path / 'photo.png'} is 300 x 200 px; the model sees its centre 200 x 200 resized to 48 x 48" \
        in result.stdout
    grid, size = 6, 6 * 48
    with Image.open(out) as png:  # two panels (photo + segments, 8 px apart) 16 px apart, 36 px header, 22 px legend
        assert png.size == (2 * (2 * size + 8) + 16, size + 36 + 22)
        sheet = np.asarray(png.convert("RGB")).astype(int)
    shown = sheet[36:36 + size, :size]
    expected = np.asarray(Image.fromarray(photo[:, 50:250]).resize((size, size), Image.BICUBIC)).astype(int)
    inside = np.zeros((size, size), bool)  # the middle of every patch, away from borders and dots
    for r in range(grid):
        for c in range(grid):
            inside[r * 48 + 4:r * 48 + 16, c * 48 + 4:c * 48 + 16] = True
    assert np.abs(shown[inside] - expected[inside]).max() <= 1  # the photo itself, untinted
    segments = sheet[36:36 + size, size + 8:2 * size + 8]
    assert len({tuple(segments[r * 48 + 10, c * 48 + 10]) for r in range(grid) for c in range(grid)}) > 1


def test_unreadable_file_is_reported_and_others_render(checkpoint, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    make_shape_image(random.Random(1), 5, size=48)[0].save(tmp_path / "good.jpg")
    result = visualize(str(tmp_path / "broken.jpg"), str(tmp_path / "good.jpg"), "--ckpt", checkpoint,
                       "--out_dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: cannot read") and "broken.jpg" in result.stderr
    assert (tmp_path / "out" / "good_drip.png").exists() and not (tmp_path / "out" / "broken_drip.png").exists()


def test_stats_and_object_ratio(checkpoint, tmp_path):
    for i in range(4):
        make_shape_image(random.Random(i), i, size=48)[0].save(tmp_path / f"{i}.jpg")
    result = visualize("--stats", str(tmp_path), "--object_ratio", "20", "--ckpt", checkpoint, "--out_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    stats_text, ratio_text = result.stdout.split("}\n{")
    stats, ratio = json.loads(stats_text + "}"), json.loads("{" + ratio_text)
    assert stats["images"] == 4 and sum(stats["histogram"].values()) == 4
    assert stats["min_segments"] <= stats["mean_segments"] <= stats["max_segments"]
    assert os.path.exists(stats["plot"])
    assert ratio["object_ratio"] > 0 and 0 < ratio["patches_touching_object"] < 1


def test_no_checkpoint_says_how_to_make_one(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "visualize.py"), "x.jpg"], capture_output=True,
                            text=True, timeout=60, cwd=str(tmp_path))
    assert result.returncode != 0 and "python train_clip.py --compress 4" in result.stderr


def test_newest_drip_checkpoint_passes_over_other_scripts_checkpoints(checkpoint, tmp_path):
    """Without --ckpt: the newest train_clip.py checkpoint with compress > 1, not a newer classifier's."""
    from visualize import newest_checkpoint
    os.makedirs(tmp_path / "clip_tiny_c4")
    saved = torch.load(checkpoint, weights_only=False)
    torch.save(dict(saved, tokenizer=""), tmp_path / "clip_tiny_c4" / "ckpt.pt")  # train_clip.py saves its tokenizer
    os.makedirs(tmp_path / "imagenet_tiny_c4")
    torch.save({"model": {}, "model_config": saved["model_config"], "num_classes": 36}, tmp_path / "imagenet_tiny_c4" / "ckpt.pt")
    assert newest_checkpoint("drip", str(tmp_path)) == str(tmp_path / "clip_tiny_c4" / "ckpt.pt")


def test_an_entropy_tower_is_drawn_beside_its_entropy_map(tmp_path):
    """--boundaries entropy: the panel gets a third square, the entropy model's map, brighter where the
    next patch is less predictable; without --ckpt the newest entropy checkpoint is the one drawn."""
    cfg = make_config("tiny", compress=4, boundaries="entropy")
    torch.manual_seed(0)
    model = CLIP(cfg)
    os.makedirs(tmp_path / "out" / "clip_tiny_entropy_c4")
    torch.save({"model": model.state_dict(), "model_config": cfg.__dict__, "run_config": {"model": "tiny"},
                "tokenizer": ""}, tmp_path / "out" / "clip_tiny_entropy_c4" / "ckpt.pt")
    image, _ = make_shape_image(random.Random(2), 7, size=48)
    image.save(tmp_path / "shape.png")
    result = visualize(str(tmp_path / "shape.png"), "--boundaries", "entropy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "the newest drip-entropy checkpoint: " + os.path.join("out", "clip_tiny_entropy_c4", "ckpt.pt") in result.stdout
    size = 6 * 48
    with Image.open(tmp_path / "out" / "visualize" / "shape_drip.png") as png:
        assert png.size == (3 * size + 2 * 8, size + 36 + 22)
        heat = np.asarray(png.convert("RGB"))[36:36 + size, 2 * (size + 8):].astype(int)
    with torch.no_grad():
        entropy = model.visual.patch_entropy(image_transform(48)(image.convert("RGB"))[None])[0]
    brightness = [heat[r * 48 + 10, c * 48 + 10].sum() for r in range(6) for c in range(6)]
    assert brightness.index(max(brightness)) == int(entropy.argmax()) and brightness.index(min(brightness)) == int(entropy.argmin())

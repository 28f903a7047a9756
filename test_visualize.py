"""visualize.py renders a tiny DRIP checkpoint's segments and reports unreadable files clearly."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image

from data import make_shape_image
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
    result = visualize(str(data / "0000.jpg"), "--ckpt", checkpoint, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert os.listdir(data) == ["0000.jpg"]
    assert (tmp_path / "out" / "visualize" / "0000_drip.png").is_file()


def test_renders_png_of_expected_size(checkpoint, tmp_path):
    image, _ = make_shape_image(random.Random(0), 3, size=100)
    image = image.convert("RGBA").rotate(90, expand=True)  # any size and mode
    image.save(tmp_path / "shape.png")
    result = visualize(str(tmp_path / "shape.png"), "--ckpt", checkpoint, "--ckpt", checkpoint, "--out_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out" / "shape_drip.png"
    grid = 48 // 8
    with Image.open(out) as png:  # two panels of grid x 48 px, 8 px apart, under a 22 px title
        assert png.size == (2 * grid * 48 + 8, grid * 48 + 22)


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

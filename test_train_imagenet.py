"""End-to-end tests of train_imagenet.py: 2-rank linear probe and fine-tuning of a DRIP tower, the LR finder,
resume, and its one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from data import write_shapes_dataset
from model import CLIP, make_config

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = ["--batch_size", "16", "--workers", "0", "--log_every", "1", "--warmup_steps", "2"]


def run(args, nproc=1, check=True, timeout=240):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    result = subprocess.run(launcher + [os.path.join(HERE, "train_imagenet.py")] + args, capture_output=True,
                            text=True, timeout=timeout, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Small shapes data and a compress-4 CLIP checkpoint as train_clip.py writes it."""
    root = tmp_path_factory.mktemp("imagenet")
    cfg = make_config("tiny", compress=4)
    write_shapes_dataset(str(root / "shapes"), train_samples=320, val_per_class=2, shard_size=160, size=cfg.image_size)
    torch.manual_seed(0)
    torch.save({"model": CLIP(cfg).state_dict(), "model_config": cfg.__dict__}, root / "clip.pt")
    return str(root)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("freeze", [True, False])
def test_two_rank_probe_and_finetune_of_a_drip_tower(setup, tmp_path, freeze):
    out = str(tmp_path)
    args = ["--shapes_dir", setup, "--init", os.path.join(setup, "clip.pt"), "--out_dir", out, "--max_steps", "3"]
    run(args + (["--freeze"] if freeze else ["--mixup", "0.2", "--label_smoothing", "0.1"]) + FAST, nproc=2)
    record = metrics(out)[-1]
    assert record["step"] == 3 and record["eval_images"] == 72 and record["target_rate"] == 0.25
    assert 0 < record["eval_boundary_rate"] < 0.6
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    initial = torch.load(os.path.join(setup, "clip.pt"), weights_only=False)["model"]
    predictor = "visual.boundary_predictor.fc.weight"
    unchanged = torch.equal(saved["model"][predictor], initial[predictor])
    assert unchanged == freeze  # the probe leaves the whole tower, predictor included, as it was


def test_lr_finder_writes_its_plot(setup, tmp_path):
    result = run(["--shapes_dir", setup, "--out_dir", str(tmp_path), "--lr_find", "--lr_find_steps", "15"] + FAST)
    assert "suggested lr" in result.stdout
    suggested = float(result.stdout.split("suggested lr ")[1].split()[0])
    assert 1e-7 <= suggested <= 10
    from PIL import Image
    with Image.open(tmp_path / "lr_find.png") as plot:
        assert plot.size == (640, 400)  # plots.plot_lr_find


def test_resume_continues_at_saved_step(setup, tmp_path):
    out = str(tmp_path)
    args = ["--shapes_dir", setup, "--out_dir", out, "--compress", "4"] + FAST
    run(args + ["--max_steps", "2"])
    result = run(args + ["--max_steps", "4", "--resume"])
    steps = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert "at step 2" in result.stdout and steps[0].startswith("3/") and len(steps) == 2
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"] == 4
    refused = run(args[:-len(FAST)] + ["--compress", "2", "--resume"] + FAST, check=False)
    assert refused.returncode != 0 and "another model configuration" in refused.stderr


def test_missing_train_folder_is_one_clear_error(tmp_path):
    (tmp_path / "val").mkdir()
    result = run(["--data_dir", str(tmp_path)], check=False, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {tmp_path} has no train/ folder; --data_dir needs train/ and val/ in ImageFolder layout"


def test_webdataset_shards_and_class_count_check_on_resume(setup, tmp_path):
    shards = os.path.join(setup, "shapes", "train-{00000..00001}.tar")
    val = os.path.join(setup, "shapes", "train-00001.tar")
    out = str(tmp_path)
    args = ["--train_data", shards, "--val_data", val, "--train_num_samples", "320", "--num_classes", "36",
            "--out_dir", out, "--max_steps", "2"] + FAST
    run(args, nproc=2)
    assert metrics(out)[-1]["eval_images"] == 160  # one validation shard, read by one of the two ranks, summed
    refused = run(args + ["--num_classes", "10", "--resume"], check=False)
    assert refused.returncode != 0 and "trained on 36 classes, this data has 10" in refused.stderr

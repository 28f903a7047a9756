"""End-to-end tests of train_imagenet.py: 2-rank linear probe and fine-tuning of a DRIP tower, the LR finder,
resume, and its one-line errors."""
import io
import json
import os
import tarfile
import subprocess
import sys

import pytest
import torch
import webdataset as wds

from data import decode_batches, image_transform, write_shapes_dataset
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
    args = ["--data_dir", setup, "--init_from", os.path.join(setup, "clip.pt"), "--out_dir", out, "--max_steps", "3"]
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
    result = run(["--data_dir", setup, "--out_dir", str(tmp_path), "--lr_find", "--lr_find_steps", "15"] + FAST)
    assert "suggested lr" in result.stdout
    suggested = float(result.stdout.split("suggested lr ")[1].split()[0])
    assert 1e-7 <= suggested <= 10
    from PIL import Image
    with Image.open(tmp_path / "lr_find.png") as plot:
        assert plot.size == (640, 400)  # plots.plot_lr_find


def test_resume_continues_at_saved_step(setup, tmp_path):
    out = str(tmp_path)
    args = ["--data_dir", setup, "--out_dir", out, "--compress", "4"] + FAST
    run(args + ["--max_steps", "2"])
    result = run(args + ["--max_steps", "4", "--resume"])
    steps = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert "at step 2" in result.stdout and steps[0].startswith("3/") and len(steps) == 2
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"] == 4
    refused = run(args[:-len(FAST)] + ["--compress", "2", "--resume"] + FAST, check=False)
    assert refused.returncode != 0 and "checkpoint of another configuration: compress=4.0 (now 2.0)" in refused.stderr


def test_mixed_up_cls_samples_are_skipped_and_counted(setup, tmp_path):
    """Samples whose .cls is missing, not a number or out of range are skipped and counted;
    images and labels stay in step, so training goes on."""
    with tarfile.open(os.path.join(setup, "shapes", "train-00000.tar")) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split(".")[0] for name in files})[:24]
    bad = {keys[0]: None, keys[5]: b"abc", keys[9]: b"99", keys[14]: b""}  # 4 of 24 samples
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        for key in keys:
            for ext in ("jpg", "txt", "cls"):
                data = bad.get(key, files[f"{key}.cls"]) if ext == "cls" else files[f"{key}.{ext}"]
                if data is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    samples = wds.DataPipeline(wds.SimpleShardList([str(tmp_path / "mixed.tar")]), wds.tarfile_to_samples())
    batches = list(decode_batches(samples, 8, image_transform(48), "cls", num_classes=36, keep_last=True))
    assert [len(labels) for _, labels, _ in batches] == [8, 8, 4] and sum(s for *_, s in batches) == 4
    assert all(len(images) == len(labels) for images, labels, _ in batches)

    out = str(tmp_path / "out")
    run(["--train_data", str(tmp_path / "mixed.tar"), "--val_data", str(tmp_path / "mixed.tar"), "--num_classes", "36",
         "--train_num_samples", "32", "--out_dir", out, "--max_steps", "2"] + FAST)
    record = metrics(out)[-1]
    assert record["step"] == 2 and record["skipped_samples"] >= 1 and record["eval_images"] == 20


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


def test_seed_reproduces_a_mixup_run(setup, tmp_path):
    """The mixup weights come from torch's seeded generator: two runs with the same --seed agree exactly."""
    weights = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        run(["--data_dir", setup, "--out_dir", out, "--max_steps", "2", "--mixup", "0.4", "--seed", "3"] + FAST)
        weights.append(torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["model"]["head.weight"])
    assert torch.equal(weights[0], weights[1])

"""End-to-end tests of train_clip.py: single process, 2-process torchrun (gloo), uneven and
corrupt shards, resume after a kill, and the one-line errors. Runs the script as users do."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from data import write_shapes_dataset
from model import CLIP, CLIPConfig, make_config

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = ["--batch_size", "16", "--workers", "0", "--log_every", "1", "--warmup_steps", "2"]


def run(args, timeout=180, nproc=1, check=True):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(launcher + [os.path.join(HERE, "train_clip.py")] + args, capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=HERE)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_shapes_dataset(str(root / "shapes"), train_samples=320, val_per_class=2, shard_size=160,
                         size=make_config("tiny").image_size)
    return str(root)


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, (image_bytes, caption) in enumerate(samples):
            for ext, data in (("jpg", image_bytes), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def shard_samples(data_dir, n):
    """n (jpeg bytes, caption) pairs taken from the built-in training shards."""
    samples, files = [], {}
    with tarfile.open(os.path.join(data_dir, "shapes", "train-00000.tar")) as tar:
        for member in tar.getmembers():
            files[member.name] = tar.extractfile(member).read()
    for key in sorted({name.split(".")[0] for name in files})[:n]:
        samples.append((files[key + ".jpg"], files[key + ".txt"].decode()))
    return samples


def real_data_args(data_dir, shards, samples_per_epoch):
    shapes = os.path.join(data_dir, "shapes")
    return ["--train_data", shards, "--train_num_samples", str(samples_per_epoch),
            "--val_data", os.path.join(shapes, "val"), "--classnames", os.path.join(shapes, "classnames.txt"),
            "--tokenizer", os.path.join(data_dir, "tokenizer.json")]


@pytest.fixture(scope="session")
def tokenizer_file(data_dir, tmp_path_factory):
    """A default run trains and saves a BPE; later runs load it with --tokenizer."""
    out = str(tmp_path_factory.mktemp("tok"))
    run(["--data_dir", data_dir, "--out_dir", out, "--max_steps", "1"] + FAST)
    os.replace(os.path.join(out, "tokenizer.json"), os.path.join(data_dir, "tokenizer.json"))
    return os.path.join(data_dir, "tokenizer.json")


def test_single_process_run_with_drip(data_dir, tmp_path):
    out = str(tmp_path)
    result = run(["--data_dir", data_dir, "--out_dir", out, "--compress", "4", "--epochs", "2"] + FAST)
    records = metrics(out)
    assert [r["step"] for r in records] == [20, 40]  # 320 samples / 16 per step, 2 epochs
    last = records[-1]
    assert last["eval_images"] == 72 and 0 <= last["zero_shot_top1"] <= last["zero_shot_top5"] <= 100
    assert abs(last["train_boundary_rate"] - 0.25) < 0.1 and last["target_rate"] == 0.25
    assert last["boundary_loss"] > 0 and last["step_time_s"] > 0 and last["peak_memory_gb"] > 0
    assert "| tiny 4x comp |" in result.stdout
    assert "40 steps = 2 epochs of 20 steps" in result.stdout.splitlines()[0]
    progress = [re.match(r"step (\d+)/40 ([\d.]+)% \d+ images/s (\d+h\d\dm|\d+m\d\ds|\d+s) left loss ", line)
                for line in result.stdout.splitlines() if line.startswith("step ")]
    assert all(progress) and [(m[1], m[2]) for m in progress[::39]] == [("1", "2.5"), ("40", "100.0")]
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0
    checkpoint = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert checkpoint["step"] == 40 and checkpoint["model_config"]["compress"] == 4
    # --eval_only on that checkpoint (its own config and tokenizer, no --compress given) gives the run's last numbers
    evaluated = run(["--data_dir", data_dir, "--init_from", os.path.join(out, "ckpt.pt"), "--eval_only",
                     "--batch_size", "16", "--workers", "0"]).stdout.splitlines()[-1].split()
    numbers = dict(zip(evaluated[::2], evaluated[1::2]))
    assert float(numbers["zero_shot_top1"]) == pytest.approx(last["zero_shot_top1"], abs=0.006)  # printed to 4 digits
    assert float(numbers["eval_boundary_rate"]) == pytest.approx(last["eval_boundary_rate"], rel=1e-3)


def test_torchrun_two_ranks(data_dir, tmp_path):
    out = str(tmp_path)
    run(["--data_dir", data_dir, "--out_dir", out, "--compress", "4", "--max_steps", "4"] + FAST, nproc=2)
    record = metrics(out)[-1]
    assert record["step"] == 4
    assert record["eval_images"] == 72  # evaluation sharded over both ranks, then summed
    assert len(torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["rng"]) == 2


def test_uneven_shards_same_steps_on_every_rank(data_dir, tokenizer_file, tmp_path):
    samples = shard_samples(data_dir, 100)
    write_shard(str(tmp_path / "big.tar"), samples)
    write_shard(str(tmp_path / "small.tar"), samples[:3])
    out = str(tmp_path / "out")
    args = real_data_args(data_dir, str(tmp_path / "{big,small}.tar"), 160) + ["--out_dir", out, "--epochs", "2"]
    start = time.time()
    run(args + FAST, nproc=2, timeout=240)  # a rank running dry would hang the other in all-reduce
    assert time.time() - start < 240
    assert [r["step"] for r in metrics(out)] == [5, 10]  # 160 / (16 x 2 ranks) per epoch


def test_corrupt_image_is_skipped_and_reported(data_dir, tokenizer_file, tmp_path):
    samples = shard_samples(data_dir, 40)
    for i in range(0, 40, 4):  # a quarter of the images: garbage or truncated files
        samples[i] = (b"this is not a jpeg" if i % 8 else samples[i][0][:50], samples[i][1])
    write_shard(str(tmp_path / "bad.tar"), samples)
    out = str(tmp_path / "out")
    run(real_data_args(data_dir, str(tmp_path / "bad.tar"), 64) + ["--out_dir", out, "--epochs", "1"] + FAST)
    record = metrics(out)[-1]
    assert record["step"] == 4 and record["skipped_samples"] >= 2


def test_killed_run_resumes_at_saved_step(data_dir, tmp_path):
    out = str(tmp_path)
    args = [sys.executable, os.path.join(HERE, "train_clip.py"), "--data_dir", data_dir, "--out_dir", out,
            "--compress", "4", "--checkpoint_every", "3", "--epochs", "50"] + FAST
    process = subprocess.Popen(args, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(out, "ckpt.pt")
    deadline = time.time() + 120
    while not os.path.exists(ckpt) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(ckpt, weights_only=False)["step"]
    assert saved > 0 and saved % 3 == 0
    result = run(["--data_dir", data_dir, "--out_dir", out, "--compress", "4", "--checkpoint_every", "3",
                  "--epochs", "50", "--max_steps", str(saved + 2), "--resume"] + FAST)
    assert f"at step {saved}" in result.stdout
    steps = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps[0] == f"{saved + 1}/{saved + 2}"  # log lines count to the run's last step, --max_steps here
    assert torch.load(ckpt, weights_only=False)["step"] == saved + 2


def set_up_output(args):
    """What train_clip.py prints up to its zero-shot line; the run is stopped there, before any training."""
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "train_clip.py")] + args, cwd=HERE, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("zero-shot on "):
            break
    process.kill()
    process.wait()
    return "".join(lines)


def test_imagenet_like_val_data_gets_clips_class_names(data_dir, tokenizer_file, tmp_path):
    """1000 class folders and no --classnames: CLIP's ImageNet names and 80 templates, said at start."""
    image = next(os.path.join(root, f) for root, _, files in os.walk(os.path.join(data_dir, "shapes", "val")) for f in files)
    for c in range(1000):
        os.makedirs(tmp_path / "val" / f"n{c:08d}")
        os.link(image, tmp_path / "val" / f"n{c:08d}" / "0.jpg")
    out = str(tmp_path / "out")
    args = real_data_args(data_dir, os.path.join(data_dir, "shapes", "train-00000.tar"), 16)
    args[args.index("--val_data") + 1] = str(tmp_path / "val")
    del args[args.index("--classnames"):args.index("--classnames") + 2]
    assert ("1000 classes, names from CLIP's ImageNet class names (zero_shot/imagenet_classnames.txt), "
            "80 templates (CLIP's ImageNet templates)") in set_up_output(args + ["--out_dir", out] + FAST)


def test_resume_with_another_configuration_is_refused(data_dir, tmp_path):
    out = str(tmp_path)
    run(["--data_dir", data_dir, "--out_dir", out, "--max_steps", "1"] + FAST)
    result = run(["--data_dir", data_dir, "--out_dir", out, "--compress", "4", "--resume"] + FAST, check=False)
    assert result.returncode != 0
    assert "checkpoint of another configuration: compress=1.0 (now 4.0)" in result.stderr


def test_entropy_boundaries_hold_the_rate_and_train_every_part(data_dir, tmp_path):
    """--boundaries entropy: a short run ends with train and eval boundary rates within 0.01 of the
    target, its predictor and entropy model trained, in its own default folder name."""
    out = str(tmp_path / "entropy")
    result = run(["--data_dir", data_dir, "--out_dir", out, "--compress", "4", "--epochs", "2", "--boundaries", "entropy"]
                 + FAST)
    assert "boundaries learnt from entropy spikes" in result.stdout
    last = metrics(out)[-1]
    assert abs(last["train_boundary_rate"] - 0.25) <= 0.01 and abs(last["eval_boundary_rate"] - 0.25) <= 0.01
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert saved["model_config"]["boundaries"] == "entropy"
    fresh = CLIP(CLIPConfig(**saved["model_config"])).state_dict()
    for part in ("visual.entropy_model.head.weight", "visual.boundary_predictor.out.weight"):
        assert not torch.equal(saved["model"][part], fresh[part])
    refused = run(["--data_dir", data_dir, "--compress", "1", "--boundaries", "entropy"], check=False)
    assert refused.returncode != 0 and "--boundaries entropy trains DRIP's boundary predictor" in refused.stderr

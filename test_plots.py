"""plots.py: every plot writes a PNG of the expected size, stops with one line on bad input, the LR
finder's y range leaves the explosion out, the curves command overlays runs of all three training
scripts; common.Progress's arithmetic."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import common
from plots import plot_accuracy_vs_gflops, plot_curves, plot_lr_find, plot_segment_histogram, read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))


def png_size(path):
    with Image.open(path) as image:
        return image.size


def write_run(folder, records):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(folder)


def clip_records(compress, epochs=3):
    """The keys train_clip.py writes."""
    return [{"epoch": e, "step": 10 * e, "zero_shot_top1": 20.0 * e + compress, "zero_shot_top5": 50.0 + 10 * e,
             "eval_boundary_rate": 1 / compress, "train_boundary_rate": 1 / compress, "target_rate": 1 / compress,
             "contrastive_loss": 4.0 / e, "boundary_loss": 0.1, "step_time_s": 0.5 / compress ** 0.5,
             "data_time_s": 0.01, "images_per_s": 250.0 * compress ** 0.5, "peak_memory_gb": 1.0,
             "skipped_samples": 0, "logit_scale": 20.0} for e in range(1, epochs + 1)]


def test_curves_overlay_two_clip_runs(tmp_path):
    runs = [write_run(tmp_path / "c1", clip_records(1)), write_run(tmp_path / "c4", clip_records(4))]
    fig = plot_curves(runs, str(tmp_path / "curves.png"))
    # six panels (loss, accuracy, boundary rate, step time, images/s, memory): 3 x 2 of 4.2 x 3.0 in, + 0.6 in legend
    assert png_size(tmp_path / "curves.png") == (1260, 660)
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {"training loss", "accuracy", "boundary rate", "step time", "throughput", "peak memory"}
    accuracy = panels["accuracy"].get_lines()
    assert len(accuracy) == 4 and len({line.get_color() for line in accuracy}) == 2  # top-1 and top-5 of each run
    assert [list(line.get_ydata()) for line in accuracy[::2]] == [[21, 41, 61], [24, 44, 64]]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [os.path.normpath(r) for r in runs]
    # the plain ViT has no boundaries to show: the rate panel holds the compress-4 run's train, eval and target
    assert [list(line.get_ydata()) for line in panels["boundary rate"].get_lines()] == [[0.25] * 3] * 3
    assert panels["step time"].get_ylim()[0] == 0  # times, throughput and memory drawn from zero
    alone = plot_curves(runs[:1], str(tmp_path / "c1.png"))  # and a plain ViT alone gets no rate panel
    assert "boundary rate" not in {ax.get_title() for ax in alone.axes} and len(alone.axes) == 5


def test_curves_of_imagenet_and_llava_runs(tmp_path):
    imagenet = write_run(tmp_path / "imagenet", [
        {"epoch": e, "step": 5 * e, "top1": 30.0 * e, "top5": 90.0, "eval_boundary_rate": 0.25, "eval_images": 72,
         "train_loss": 3.0 / e, "train_boundary_rate": 0.24, "target_rate": 0.25, "step_time_s": 0.2,
         "data_time_s": 0.01, "images_per_s": 600.0, "peak_memory_gb": 0.5} for e in (1, 2)])
    llava = []  # train_llava.py's: a record per log line (every 20 of 100 steps), then the epoch's
    for s, epochs in ((0, 0.5), (1, 1.0), (2, 1.0)):
        llava += [{"stage": s, "epoch": epochs * step / 100, "step": step, "log": True, "loss": 2.0 / (s + 1) - step / 1000,
                   "lr": 1e-3, "image_tokens_per_sample": 9.0 * (s > 0), "step_time_s": 0.4, "tokens_per_s": 9000.0}
                  for step in range(20, 101, 20)]
        llava.append({"stage": s, "epoch": epochs, "step": 100, "loss": 1.9 / (s + 1), "image_tokens_per_sample": 9.0 * (s > 0),
                      "step_time_s": 0.4, "tokens_per_s": 9000.0, "peak_memory_gb": 1.2, "skipped_samples": 0,
                      "truncated_samples": 0} | ({"exact_match": 30.0 * s} if s else {}))
    llava_run = write_run(tmp_path / "llava", llava)
    fig = plot_curves([llava_run], str(tmp_path / "llava.png"))
    assert png_size(tmp_path / "llava.png") == (1260, 660)
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {"training loss", "accuracy", "image tokens per sample", "step time", "throughput",
                           "peak memory"}
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [f"{llava_run} stage {s}" for s in (0, 1, 2)]
    # the loss a line per stage through its log lines (not the epoch's mean), the stages end to end
    loss = panels["training loss"].get_lines()
    assert [list(line.get_xdata()) for line in loss] == [[0.1, 0.2, 0.3, 0.4, 0.5], [0.7, 0.9, 1.1, 1.3, 1.5],
                                                         [1.7, 1.9, 2.1, 2.3, 2.5]]
    assert list(loss[1].get_ydata()) == [1.0 - step / 1000 for step in range(20, 101, 20)]
    # exact match once a stage, at its end
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in panels["accuracy"].get_lines()] == \
        [([1.5], [30.0]), ([2.5], [60.0])]
    assert panels["accuracy"].get_xlabel() == "epoch (stages end to end)"
    fig = plot_curves([imagenet], str(tmp_path / "imagenet.png"))
    assert png_size(tmp_path / "imagenet.png") == (1260, 660)
    accuracy = next(ax for ax in fig.axes if ax.get_title() == "accuracy")
    assert [list(line.get_ydata()) for line in accuracy.get_lines()] == [[30, 60], [90, 90]]


def test_a_restarted_run_draws_its_newest_history(tmp_path):
    first, second = clip_records(4, epochs=3), clip_records(4, epochs=2)
    second[-1]["zero_shot_top1"] = 99.0
    run = write_run(tmp_path / "run", first + second)  # the same out_dir trained again from step 0
    (records,) = read_metrics(run).values()
    assert [(r["step"], r["zero_shot_top1"]) for r in records] == [(10, 24.0), (20, 99.0)]


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ('{"epoch": 1, "step": 10, "contrastive_loss": 3.0}\n{"epoch": 2, "st', "line 2 is not JSON"),
    ('{"zero_shot_top1": 3.0}\n', "line 1 has no epoch and step"),
    ('[1, 2]\n', "line 1 has no epoch and step"),
])
def test_empty_or_malformed_metrics_stop_with_one_line(tmp_path, content, message):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(SystemExit) as stop:
        plot_curves([str(tmp_path)], str(tmp_path / "curves.png"))
    assert str(stop.value).startswith("error: ") and message in str(stop.value) and "\n" not in str(stop.value)
    assert not os.path.exists(tmp_path / "curves.png")


def test_curves_command(tmp_path):
    runs = [write_run(tmp_path / "c1", clip_records(1)), write_run(tmp_path / "c4", clip_records(4))]
    command = [sys.executable, os.path.join(HERE, "plots.py")]
    result = subprocess.run(command + runs + ["--out", str(tmp_path / "both.png")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "both.png") and png_size(tmp_path / "both.png") == (1260, 660)
    result = subprocess.run(command + [runs[0], str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"error: no metrics.jsonl at {tmp_path / 'nothing'}; give a run's out_dir "
        "(train_clip.py, train_imagenet.py or train_llava.py)"]


def test_lr_find_y_range_leaves_out_the_explosion(tmp_path):
    lrs = [1e-7 * 10 ** (i / 10) for i in range(80)]  # 1e-7 .. ~8
    losses = [3.6 - 1.5 * min(i, 60) / 60 for i in range(80)]  # descends to 2.1 ...
    losses[60:] = [2.1 * 1.3 ** (i - 60) for i in range(60, 80)]  # ... then explodes to ~400
    fig = plot_lr_find(lrs, losses, lrs[30], str(tmp_path / "lr.png"))
    assert png_size(tmp_path / "lr.png") == (640, 400)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert low < 2.1 and 3.6 < high < 4.0  # the descent is in view, the explosion (up to ~400) is not
    assert ax.get_xscale() == "log"
    assert any("suggested lr 1.00e-04" in t.get_text() for t in ax.get_legend().get_texts())
    with pytest.raises(SystemExit, match="^error: LR finder"):
        plot_lr_find([], [], 1e-3, str(tmp_path / "empty.png"))


def test_segment_histogram(tmp_path):
    counts = [7, 8, 8, 9, 9, 9, 11]
    fig = plot_segment_histogram(counts, 9.0, str(tmp_path / "hist.png"), title="run: segments per image")
    assert png_size(tmp_path / "hist.png") == (640, 400)
    ax = fig.axes[0]
    assert [round(p.get_height()) for p in ax.patches] == [1, 2, 3, 0, 1]  # 7, 8, 9, 10, 11 segments
    assert [t.get_text() for t in ax.texts] == ["1", "2", "3", "", "1"]  # each bar's count written on it
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[9.0, 9.0], [61 / 7, 61 / 7]]  # target, mean
    with pytest.raises(SystemExit, match="^error: segment histogram"):
        plot_segment_histogram([], 9.0, str(tmp_path / "empty.png"))


def test_accuracy_vs_gflops(tmp_path):
    results = {"DRIP": [(1.8, 33.0, "4x", 2.0), (4.4, 39.8, "1x", 0.5), (2.6, 37.0, "2x", 1.0)], "ToMe": [(2.0, 31.0)]}
    fig = plot_accuracy_vs_gflops(results, str(tmp_path / "acc.png"))
    assert png_size(tmp_path / "acc.png") == (640, 440)
    drip, tome = fig.axes[0].containers  # an error-bar line per method
    assert list(drip.lines[0].get_xdata()) == [1.8, 2.6, 4.4] and list(drip.lines[0].get_ydata()) == [33.0, 37.0, 39.8]
    bars = drip.lines[2][0].get_segments()  # each point's bar: mean - std to mean + std, sorted with its point
    assert [(float(b[0][1]), float(b[1][1])) for b in bars] == [(31.0, 35.0), (36.0, 38.0), (39.3, 40.3)]
    assert list(tome.lines[0].get_xdata()) == [2.0] and [t.get_text() for t in fig.axes[0].texts] == ["4x", "2x", "1x"]
    with pytest.raises(SystemExit, match="^error: accuracy against GFLOPs"):
        plot_accuracy_vs_gflops({"DRIP": []}, str(tmp_path / "empty.png"))


def test_progress_percentage_throughput_and_time_left(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    progress = common.Progress(200, 1000, 100)  # resumed at step 200 of 1000
    assert progress.plan() == "from step 200 to 1000: 800 steps = 8 epochs of 100 steps"
    for _ in range(40):
        progress.advance(128)
    clock[0] += 20.0  # 40 steps in 20 s: 0.5 s a step, 760 steps left
    assert progress.report() == "24.0% 256 images/s 6m20s left"
    progress.advance(128)
    clock[0] += 1.5  # the throughput window restarted at the previous report; 21.5 s / 41 steps x 759 left
    assert progress.report() == "24.1% 85 images/s 6m38s left"
    assert common.Progress(0, 558, 93).plan() == "558 steps = 6 epochs of 93 steps"
    assert [common.format_duration(s) for s in (42, 185, 3725)] == ["42s", "3m05s", "1h02m"]

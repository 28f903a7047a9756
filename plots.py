"""Every plot of the project, drawn with matplotlib (Agg backend: no display needed).

    python plots.py out/clip_tiny_c1                                  # -> out/clip_tiny_c1/curves.png
    python plots.py out/clip_tiny_c1 out/clip_tiny_c4                 # two runs overlaid -> out/curves.png

The command turns the metrics.jsonl of one or more runs of train_clip.py, train_imagenet.py
or train_llava.py into training curves (loss, accuracy, boundary rate against its target,
step time, throughput, peak memory; one colour per run, per LLaVA stage, whose loss and
speed are drawn per log line and whose stages follow each other). The functions are
used by the scripts: plot_lr_find (train_imagenet.py --lr_find), plot_segment_histogram
(visualize.py --stats), plot_curves (the end of every training run), plot_accuracy_vs_gflops
(method comparisons). Each returns its Figure after writing the PNG (atomically).
"""
import argparse
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)
from matplotlib.lines import Line2D  # noqa: E402

from common import die  # noqa: E402

DPI = 100


def save(fig, path):
    """Write a PNG of exactly figsize * DPI pixels; a temporary file, then rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
    return fig


# ----------------------------------------------------------------------------- LR range test

def plot_lr_find(lrs, losses, suggestion, path, title="LR range test"):
    """Smoothed loss against learning rate (log x), the suggested lr marked.

    The y range is the useful one (fastai's practice): from the minimum loss up to the highest
    loss seen before the minimum, with a margin; the explosion after the minimum, which would
    otherwise set the scale and flatten the rest, runs off the top.
    """
    if len(lrs) < 2 or len(lrs) != len(losses) or not all(map(math.isfinite, losses)):
        die(f"LR finder: need at least two finite losses, one per lr (got {len(losses)} losses for {len(lrs)} lrs)")
    best = min(range(len(losses)), key=losses.__getitem__)
    low, high = losses[best], max(losses[:best + 1])
    margin = 0.05 * max(high - low, 1e-3 * abs(low), 1e-8)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(lrs, losses, color="tab:blue", label="smoothed loss")
    ax.set_xscale("log")
    ax.set_ylim(low - margin, high + 2 * margin)
    ax.set_xlim(lrs[0], lrs[-1])
    suggested_loss = losses[min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / suggestion)))]
    ax.axvline(suggestion, color="tab:red", linestyle="--", linewidth=1)
    ax.plot([suggestion], [suggested_loss], "o", color="tab:red", label=f"suggested lr {suggestion:.2e}")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left")
    return save(fig, path)


# ----------------------------------------------------------------------------- segments per image

def plot_segment_histogram(counts, target, path, title="segments per image"):
    """Bars of how many images got each number of segments, each bar labelled with its count;
    the target number of segments (patches / compress) and the mean marked."""
    if not counts:
        die("segment histogram: no images were counted")
    low, high = min(counts), max(counts)
    values = list(range(low, high + 1))
    heights = [counts.count(v) for v in values]
    mean = sum(counts) / len(counts)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(values, heights, width=0.8, color="tab:blue")
    ax.bar_label(bars, labels=[str(h) if h else "" for h in heights], fontsize=8, padding=3,
                 bbox=dict(facecolor="white", edgecolor="none", pad=1))  # readable where a marker line crosses
    ax.axvline(target, color="tab:red", linestyle="--", label=f"target {target:.3g}")
    ax.axvline(mean, color="black", linestyle=":", label=f"mean {mean:.3g}")
    ax.set_xlim(min(low, target) - 1, max(high, target) + 1)
    ax.set_ylim(0, 1.12 * max(heights))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("segments per image")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    return save(fig, path)


# ----------------------------------------------------------------------------- accuracy against compute

def plot_accuracy_vs_gflops(results, path, title="accuracy against compute",
                            accuracy_label="top-1 accuracy (%)", gflops_label="image-tower GFLOPs"):
    """One line per method through its (GFLOPs, accuracy) points, sorted by GFLOPs.

    results: {method name: [(gflops, accuracy), ...]}, with optionally a third element, a note
    drawn next to the point (e.g. "4x"), and a fourth, the accuracy's standard deviation over
    seeds (an error bar). Say in gflops_label which count was used (analytic or fvcore
    multiply-adds, which tower).
    """
    if not results or not all(results.values()):
        die("accuracy against GFLOPs: every method needs at least one (gflops, accuracy) point")
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for method, points in results.items():
        points = sorted(points, key=lambda p: p[0])
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[3] if len(p) > 3 else 0 for p in points],
                    fmt="o-", capsize=3, label=method)
        for p in points:
            if len(p) > 2 and p[2]:
                ax.annotate(str(p[2]), (p[0], p[1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(gflops_label)
    ax.set_ylabel(accuracy_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save(fig, path)


# ----------------------------------------------------------------------------- training curves

# title, y label, [(metrics.jsonl key, line label)], whether the y axis starts at 0; a panel is
# drawn when some run has one of its keys
PANELS = [
    ("training loss", "loss", [("contrastive_loss", "contrastive"), ("train_loss", "classification"),
                               ("loss", "next token")], False),
    ("accuracy", "%", [("zero_shot_top1", "zero-shot top-1"), ("zero_shot_top5", "zero-shot top-5"),
                       ("top1", "top-1"), ("top5", "top-5"), ("exact_match", "exact match")], False),
    ("boundary rate", "boundaries / patch", [("train_boundary_rate", "train"), ("eval_boundary_rate", "eval"),
                                             ("target_rate", "target")], False),
    ("image tokens per sample", "tokens", [("image_tokens_per_sample", "")], True),
    ("step time", "s", [("step_time_s", "")], True),
    ("throughput", "images / s", [("images_per_s", "")], True),
    ("throughput", "LLM tokens / s", [("tokens_per_s", "")], True),
    ("peak memory", "GB", [("peak_memory_gb", "")], True),
]
RATE_KEYS = ("train_boundary_rate", "eval_boundary_rate", "target_rate")
STYLES = ["-", "--", ":", "-.", (0, (3, 1, 1, 1))]  # by a line's place among the panel's drawn metrics
PANEL_SIZE = (4.2, 3.0)  # inches per panel
LEGEND_HEIGHT = 0.6       # inches below the panels for the runs' legend


def read_metrics(run):
    """A run folder (or its metrics.jsonl) -> {series name: records in step order}.

    One series per run, or per stage for train_llava.py, whose stages are laid end to end: a
    record's "x" is its epoch plus the epochs of the stages before it ("epoch" alone
    otherwise). When a run was restarted or resumed into the same folder, a record replaces
    the earlier ones of its kind (epoch or log line) from its step on, so the newest run's
    history is what is drawn.
    """
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    name = os.path.normpath(os.path.dirname(path) if path.endswith("metrics.jsonl") else path)
    if not os.path.isfile(path):
        die(f"no metrics.jsonl at {run}; give a run's out_dir (train_clip.py, train_imagenet.py or train_llava.py)")
    series = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                die(f"{path} line {n} is not JSON; is it a metrics.jsonl of a training script?")
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), (int, float)) \
                    or not isinstance(record.get("step"), int):
                die(f"{path} line {n} has no epoch and step; is it a metrics.jsonl of a training script?")
            key = f"{name} stage {record['stage']}" if "stage" in record else name
            kept = [r for r in series.get(key, []) if r["step"] < record["step"] or r.get("log") != record.get("log")]
            series[key] = kept + [record]
    if not series:
        die(f"{path} is empty: no epoch of that run has finished yet")
    offset = 0.0
    for key in sorted(series, key=lambda k: series[k][0].get("stage", 0)):
        for record in series[key]:
            record["x"] = offset + record["epoch"]
        if "stage" in series[key][0]:
            offset += max(r["epoch"] for r in series[key])
    return series


def curve(records, key):
    """(x, values) of one metric of one series: from the log-line records where they have it
    (train_llava.py's loss, step time, throughput), else from the epoch records; nothing for
    the boundary rate of a plain ViT (compress 1: every patch its own segment, no boundaries
    to learn)."""
    if key in RATE_KEYS and all(r.get("target_rate") == 1 for r in records):
        return []
    has = [r for r in records if isinstance(r.get(key), (int, float))]
    return [(r["x"], r[key]) for r in [r for r in has if r.get("log")] or has]


def plot_curves(runs, path, title=None):
    """Training curves of one or more runs (folders or metrics.jsonl files), overlaid, one
    colour per run (per stage for LLaVA), against epochs."""
    if not runs:
        die("give at least one run folder")
    series = {}
    for run in runs:
        series |= read_metrics(run)
    panels = [(t, y, [(k, label) for k, label in lines if any(curve(rs, k) for rs in series.values())], zero)
              for t, y, lines, zero in PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        die(f"{', '.join(runs)}: no metric that can be plotted (loss, accuracy, rate, time)")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows + LEGEND_HEIGHT), layout="constrained")
    colours = {name: f"C{i % 10}" for i, name in enumerate(series)}
    staged = any("stage" in records[0] for records in series.values())
    for i, (panel_title, ylabel, lines, from_zero) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, records in series.items():
            for style, (key, _) in zip(STYLES, lines):
                points = curve(records, key)
                if points:
                    ax.plot(*zip(*points), linestyle=style, marker="o", markersize=3, color=colours[name])
        if len(lines) > 1:  # which line style is which metric; the colours are in the figure's legend
            ax.legend([Line2D([], [], color="grey", linestyle=s) for s, _ in zip(STYLES, lines)],
                      [label for _, label in lines], fontsize=8)
        if from_zero:
            ax.set_ylim(0, 1.08 * ax.dataLim.y1)
        ax.set_title(panel_title)
        ax.set_xlabel("epoch (stages end to end)" if staged else "epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    fig.legend([Line2D([], [], color=colours[name], marker="o") for name in series], list(series),
               loc="outside lower center", ncol=min(4, len(series)))
    fig.suptitle(title or f"training curves: {', '.join(series)}")
    return save(fig, path)


def main():
    parser = argparse.ArgumentParser(description="Training curves of one or more runs, from their metrics.jsonl.")
    parser.add_argument("runs", nargs="+", help="run folders (out_dir of a training script) or metrics.jsonl files")
    parser.add_argument("--out", help="PNG to write (default: curves.png in the run's folder, or out/curves.png for "
                                      "several runs)")
    parser.add_argument("--title", help="figure title (default: the runs' names)")
    args = parser.parse_args()
    out = args.out or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1 and os.path.isdir(args.runs[0])
                       else os.path.join("out", "curves.png"))
    plot_curves(args.runs, out, args.title)
    print(out)


if __name__ == "__main__":
    main()

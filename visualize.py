"""See where DRIP cuts an image: the part of it the model sees with the segment borders and boundary
patches drawn on it, beside the segments in their own colours.

    python visualize.py img.jpg [more.jpg ...]                 # newest DRIP checkpoint under out/
    python visualize.py img.jpg --ckpt a.pt --ckpt b.pt        # one panel per checkpoint, side by side
    python visualize.py img.jpg --sample --seed 42             # Gumbel samples instead of the eval rule
    python visualize.py --stats data/shapes/val                # segments-per-image histogram and mean rate
    python visualize.py --object_ratio 500                     # on generated shapes: do boundaries find the object?
    python visualize.py img.jpg --reducer uniform              # newest checkpoint of train_clip.py --reducer uniform
    python visualize.py img.jpg --boundaries entropy           # newest entropy-spike tower, with its entropy map

PNGs go to --out_dir (default out/visualize, never next to the image: a picture written into a
dataset folder would be read back as data); the --stats histogram
(segments_histogram.png, plots.py) into the checkpoint's run folder or --out_dir DIR. Images
are preprocessed as in training (EXIF orientation, RGB, resize + centre crop). An
unreadable image is reported and skipped; the others still render. Towers with segment
boundaries can be drawn: DRIP's and uniform pooling's (--reducer); the other reducers have none.
"""
import colorsys
import glob
import json
import os
import random
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from common import ArgumentParser, check_writable, die, load_clip_checkpoint
from data import CLASSES, VAL_SEED_OFFSET, image_files, image_transform, load_image, make_shape_image
from plots import plot_segment_histogram

CELL = 48    # pixels per patch in the drawing
HEADER = 36  # pixels of title above a panel
LEGEND = 22  # pixels of legend below it


def newest_checkpoint(reducer, root="out", predictor="gumbel"):
    """The most recently written train_clip.py checkpoint with compress > 1, this reducer and (for drip)
    this predictor (memory-mapped: only its config is read, not its weights; train_imagenet.py and
    train_llava.py checkpoints are passed over)."""
    for path in sorted(glob.glob(os.path.join(root, "*", "ckpt.pt")), key=os.path.getmtime, reverse=True):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # a checkpoint of an older torch format or a stray file: not ours to draw
            continue
        cfg = checkpoint.get("model_config", {})
        if ("tokenizer" in checkpoint and cfg.get("compress", 1) > 1 and cfg.get("reducer", "drip") == reducer
                and (reducer != "drip" or cfg.get("boundaries", "gumbel") == predictor)):
            return path
    name, flag = ("DRIP", "") if reducer == "drip" else (reducer, f" --reducer {reducer}")
    if reducer == "drip" and predictor == "entropy":
        name, flag = "DRIP entropy", " --boundaries entropy"
    die(f"no {name} checkpoint under {root}/: train one with `python train_clip.py --compress 4{flag}`, or pass --ckpt PATH")


@torch.no_grad()
def boundaries_of(model, image, sample):
    """Boundaries (N,) for one PIL image, with the model's own preprocessing."""
    x = image_transform(model.cfg.image_size)(image)[None]
    return model.visual(x, sample=sample).boundaries[0]


def segment_colours(count):
    """Distinct hues; neighbouring segments (in raster order) get far-apart colours."""
    hues = [(i * 0.618034) % 1 for i in range(count)]
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0)) for h in hues]


def model_square(image):
    """(left, top, side) of the square the model's preprocessing keeps of `image` (the shorter side
    resized to the input size, then the centre cropped), in the image's own pixels."""
    W, H = image.size
    side = min(W, H)
    return (W - side) // 2, (H - side) // 2, side


def draw_segments(panel, segment, boundaries, grid):
    """Segment borders (white under black: visible on any picture) and boundary patches (white dots)."""
    draw = ImageDraw.Draw(panel)
    for width, colour in ((5, "white"), (2, "black")):
        for row in range(grid):
            for col in range(grid):
                if col + 1 < grid and segment[row][col] != segment[row][col + 1]:
                    draw.line([((col + 1) * CELL, row * CELL), ((col + 1) * CELL, (row + 1) * CELL)], fill=colour, width=width)
                if row + 1 < grid and segment[row][col] != segment[row + 1][col]:
                    draw.line([(col * CELL, (row + 1) * CELL), ((col + 1) * CELL, (row + 1) * CELL)], fill=colour, width=width)
    for i in [i for i in range(grid * grid) if boundaries[i]]:
        cx, cy = (i % grid) * CELL + CELL // 2, (i // grid) * CELL + CELL // 2
        draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill="white", outline="black", width=2)
    return panel


def entropy_map(entropy, grid):
    """The entropy model's uncertainty about the patch after each patch, dark (low) to bright yellow
    (high), over this image's range: what an entropy tower's predictor learnt to cut at."""
    low, high = float(entropy.min()), float(entropy.max())
    heat = Image.new("RGB", (grid * CELL, grid * CELL))
    draw = ImageDraw.Draw(heat)
    for i, value in enumerate(entropy.tolist()):
        t = (value - low) / max(high - low, 1e-9)
        row, col = divmod(i, grid)
        draw.rectangle([col * CELL, row * CELL, (col + 1) * CELL - 1, (row + 1) * CELL - 1],
                       fill=(int(255 * t), int(220 * t), int(60 + 40 * t)))
    return heat


def render_panel(image, boundaries, title, image_size, entropy=None):
    """Side by side: the part of `image` the model sees, at display size, with the segment borders
    and boundary patches drawn on it; the segments, each in its own colour; for an entropy tower
    the entropy map it learnt from. A header says the model's input and what was cropped, a
    legend says what the marks are."""
    N = len(boundaries)
    grid = int(round(N ** 0.5))
    size = grid * CELL
    segment = (boundaries.cumsum(0) - boundaries).long().view(grid, grid).tolist()  # row-major, as the model cuts
    left, top, side = model_square(image)
    photo = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    colours = segment_colours(int(boundaries.sum()))
    segments = Image.new("RGB", (size, size))
    fill = ImageDraw.Draw(segments)
    for i in range(N):
        row, col = divmod(i, grid)
        fill.rectangle([col * CELL, row * CELL, (col + 1) * CELL - 1, (row + 1) * CELL - 1], fill=colours[segment[row][col]])
    W, H = image.size
    cropped = "nothing cropped" if W == H else f"centre {side} x {side} of {W} x {H}"
    header = [title, f"model input {image_size} x {image_size} px ({cropped}), {grid} x {grid} patches"]
    legend = "lines: segment borders; white dots: boundary patches (a segment ends there); middle: one colour a segment"
    squares = [draw_segments(photo, segment, boundaries, grid), draw_segments(segments, segment, boundaries, grid)]
    if entropy is not None:
        legend += f"; right: entropy of the next patch, {float(entropy.min()):.2f} (dark) to {float(entropy.max()):.2f} nats"
        squares.append(draw_segments(entropy_map(entropy, grid), segment, boundaries, grid))
    framed = Image.new("RGB", (len(squares) * (size + 8) - 8, size + HEADER + LEGEND), "white")
    for n, square in enumerate(squares):
        framed.paste(square, (n * (size + 8), HEADER))
    draw = ImageDraw.Draw(framed)
    for n, line in enumerate(header):
        draw.text((4, 4 + 15 * n), line, fill="black")
    draw.text((4, HEADER + size + 5), legend, fill="black")
    return framed


def describe(checkpoint, boundaries, sample, seed):
    cfg = checkpoint["model_config"]
    name = checkpoint.get("run_config", {}).get("model", "")
    k, N = int(boundaries.sum()), len(boundaries)
    mode = f", sampled seed {seed}" if sample else ""
    reducer = cfg.get("reducer", "drip")
    if cfg.get("boundaries") == "entropy":
        reducer = "drip-entropy"
    return f"{name}{'' if reducer == 'drip' else ' ' + reducer} {cfg['compress']:g}x: {k} segments of {N} patches, rate {k / N:.2f}{mode}"


def render_file(path, models, out_dir, sample, seed):
    """One sheet per image, a panel per checkpoint; returns the PNG's path and a line saying what the model saw."""
    image = load_image(path)
    panels = []
    for model, checkpoint in models:
        if sample:
            torch.manual_seed(seed)
        boundaries = boundaries_of(model, image, sample)
        entropy = None
        if model.visual.entropy_model is not None:
            entropy = model.visual.patch_entropy(image_transform(model.cfg.image_size)(image)[None])[0]
        panels.append(render_panel(image, boundaries, describe(checkpoint, boundaries, sample, seed), model.cfg.image_size,
                                   entropy))
    width = sum(p.width for p in panels) + 16 * (len(panels) - 1)
    sheet = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 16
    target = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_drip.png")
    sheet.save(target)
    W, H = image.size
    _, _, side = model_square(image)
    size = models[0][0].cfg.image_size
    return f"{target}: {path} is {W} x {H} px; the model sees its centre {side} x {side} resized to {size} x {size}"


def stats(folder, model, checkpoint, out_dir):
    """Histogram of segments per image over a folder (recursively), as numbers and as
    out_dir/segments_histogram.png."""
    files = [f for f in image_files(folder, recursive=True) if not f.endswith("_drip.png")]  # not our drawings
    if not files:
        die(f"no images in {folder}")
    counts = []
    for path in files:
        try:
            counts.append(int(boundaries_of(model, load_image(path), sample=False).sum()))
        except (OSError, UnidentifiedImageError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
    if not counts:
        die(f"none of the {len(files)} images in {folder} could be read")
    N = model.visual.num_patches
    histogram = np.bincount(counts, minlength=N + 1)
    result = {"images": len(counts), "patches": N, "mean_segments": float(np.mean(counts)),
              "mean_rate": float(np.mean(counts)) / N, "target_rate": 1 / checkpoint["model_config"]["compress"],
              "min_segments": min(counts), "max_segments": max(counts),
              "histogram": {str(k): int(v) for k, v in enumerate(histogram) if v}}
    target = os.path.join(out_dir, "segments_histogram.png")
    name = checkpoint.get("run_config", {}).get("model", "")
    plot_segment_histogram(counts, N * result["target_rate"], target,
                           title=f"{name} {checkpoint['model_config']['compress']:g}x, {len(counts)} images of {folder}: "
                                 f"rate {result['mean_rate']:.3f}")
    result["plot"] = target
    return result


def object_ratio(model, images, seed=0):
    """(fraction of boundaries on patches touching the object) / (fraction of patches touching it).

    On freshly generated images of the held-out split's generator, whose object masks are
    known. 1.0 is content-blind. The last patch, always a boundary, is left out.
    """
    size, grid = model.cfg.image_size, model.cfg.image_size // model.cfg.patch_size
    rng = random.Random(seed + VAL_SEED_OFFSET)
    on_object = boundaries_total = object_patches = patches_total = 0
    for _ in range(images):
        image, _, mask = make_shape_image(rng, rng.randrange(len(CLASSES)), size, with_mask=True)
        touches = mask.reshape(grid, size // grid, grid, size // grid).any(axis=(1, 3)).reshape(-1)[:-1]
        boundaries = boundaries_of(model, image, sample=False).numpy()[:-1].astype(bool)
        on_object += (boundaries & touches).sum()
        boundaries_total += boundaries.sum()
        object_patches += touches.sum()
        patches_total += len(touches)
    ratio = (on_object / max(1, boundaries_total)) / (object_patches / patches_total)
    return {"images": images, "boundaries_on_object": float(on_object / max(1, boundaries_total)),
            "patches_touching_object": float(object_patches / patches_total), "object_ratio": float(ratio)}


def main():
    parser = ArgumentParser(__doc__.split("\n")[0])
    parser.add_argument("images", nargs="*", help="images to draw")
    parser.add_argument("--ckpt", action="append", help="train_clip.py checkpoint; repeat for side-by-side panels")
    parser.add_argument("--out_dir", help="folder for the PNGs (out/visualize if not given) and the --stats "
                        "histogram (the checkpoint's run folder if not given)")
    parser.add_argument("--sample", action="store_true", help="Gumbel samples instead of the deterministic eval rule")
    parser.add_argument("--seed", type=int, default=42, help="the Gumbel samples' seed, with --sample")
    parser.add_argument("--stats", metavar="DIR", help="histogram of segments per image over a folder")
    parser.add_argument("--object_ratio", type=int, metavar="N", help="boundary/object ratio on N generated shapes")
    parser.add_argument("--reducer", default="drip", choices=["drip", "uniform"],
                        help="without --ckpt: the newest checkpoint of this reducer")
    parser.add_argument("--boundaries", default="gumbel", choices=["gumbel", "entropy"],
                        help="without --ckpt: the newest DRIP checkpoint of this predictor (entropy: also its entropy map)")
    args = parser.parse_args()
    if args.object_ratio is not None and args.object_ratio < 1:
        die(f"--object_ratio must be >= 1 (images), got {args.object_ratio}")
    if not (args.images or args.stats or args.object_ratio):
        die("give images, --stats DIR or --object_ratio N")
    if args.stats and not os.path.isdir(args.stats):
        die(f"--stats {args.stats} is not a folder")
    for path in args.ckpt or []:
        if not os.path.isfile(path):
            die(f"--ckpt: no checkpoint at {path}")
    if args.out_dir:
        check_writable(args.out_dir, "--out_dir")
    paths = args.ckpt or [newest_checkpoint(args.reducer, predictor=args.boundaries)]
    if not args.ckpt:
        kind = "drip-entropy" if args.reducer == "drip" and args.boundaries == "entropy" else args.reducer
        print(f"the newest {kind} checkpoint: {paths[0]}", flush=True)
    models = [load_clip_checkpoint(path) for path in paths]
    for model, checkpoint in models:
        if model.cfg.compress == 1:
            die("that checkpoint is a plain ViT (compress 1): it has no boundaries to draw; "
                "train one with `python train_clip.py --compress 4`")
        if model.cfg.reducer not in ("drip", "uniform"):
            die(f"that checkpoint's tower shortens with {model.cfg.reducer}, which has no segment boundaries to draw "
                "(drip and uniform have)")
    images_dir = args.out_dir or "out/visualize"
    if args.images:
        os.makedirs(images_dir, exist_ok=True)
    failed = 0
    for path in args.images:
        try:
            print(render_file(path, models, images_dir, args.sample, args.seed))
        except (OSError, UnidentifiedImageError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            failed += 1
    if args.stats:
        run_dir = os.path.dirname(os.path.abspath(paths[0]))
        print(json.dumps(stats(args.stats, *models[0], args.out_dir or run_dir), indent=2))
    if args.object_ratio:
        print(json.dumps(object_ratio(models[0][0], args.object_ratio), indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

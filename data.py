"""Images and data: CLIP preprocessing, robust image loading, ImageFolders, webdataset
shard decoding (bad samples skipped and counted), and the built-in shapes dataset
(webdataset shards for training, an ImageFolder for evaluation) that every script's
defaults run on, generated here with no download.
"""
import io
import json
import math
import os
import random
import shutil
import tarfile

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms as T
import webdataset as wds
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder

from common import die

# -----------------------------------------------------------------------------
# Images

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def image_transform(image_size, augment=False):
    """CLIP preprocessing: resize + centre crop (or open_clip's mild random crop), then normalise."""
    resize = (T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC) if augment
              else T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]))
    return T.Compose([resize, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # image files, and the image keys of webdataset samples


def image_files(folder, recursive=False):
    """Sorted paths of the images (by extension) in `folder`, or under it with recursive=True."""
    suffixes = tuple("." + e for e in IMAGE_EXTENSIONS)
    if not recursive:
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(suffixes))
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder)
                  for f in files if f.lower().endswith(suffixes))


def load_image(file):
    """Any mode (RGBA, greyscale, palette) and EXIF orientation -> upright RGB."""
    with Image.open(file) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def image_folder(path, transform, flag):
    """An ImageFolder (one sub-folder of images per class), or one line saying what is wrong with it."""
    if not os.path.isdir(path):
        die(f"{flag} {path} is not a folder; give an ImageFolder (one sub-folder of images per class)")
    try:
        return ImageFolder(path, transform=transform, loader=load_image)
    except (FileNotFoundError, OSError) as e:
        die(f"{flag} {path} is not an ImageFolder ({e})")


# -----------------------------------------------------------------------------
# Webdataset shards: key.jpg (or .jpeg/.png/.webp) with key.txt (caption) and/or key.cls (label)


def expand_shards(pattern, flag):
    """'dir/{00000..00099}.tar' -> the shard list; refuses a pattern with a missing or empty local shard."""
    try:
        urls = wds.shardlists.expand_urls(pattern)
    except ValueError as e:
        die(f"{flag} {pattern}: {e}")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u) or os.path.getsize(u) == 0]
    if not urls or missing:
        die(f"{flag}: shard missing or empty: {missing[0] if missing else pattern}")
    return urls


def decode_batches(samples, batch_size, transform, target, num_classes=0, keep_last=False):
    """Raw webdataset samples -> (images B x 3 x H x W, targets, skipped) batches.

    target "txt": targets is the list of captions; "cls": a LongTensor of labels. A sample
    without a readable image, or whose target is missing, not text, not an integer or not
    below num_classes (when given), is skipped and counted in the next batch's `skipped`:
    one bad sample neither stops a run nor goes unnoticed, and images and targets never
    go out of step.
    """
    images, targets, skipped = [], [], 0
    for sample in samples:
        try:
            data = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
            value = sample[target].decode("utf-8")
            if target == "cls":
                value = int(value)
                if value < 0 or (num_classes and value >= num_classes):
                    raise ValueError(f"label {value} out of range")
            image = transform(load_image(io.BytesIO(data)))
        except Exception:  # StopIteration, KeyError, UnicodeDecodeError, ValueError, PIL's errors
            skipped += 1
            continue
        images.append(image)
        targets.append(value)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(targets) if target == "cls" else targets, skipped
            images, targets, skipped = [], [], 0
    if keep_last and images:
        yield torch.stack(images), torch.tensor(targets) if target == "cls" else targets, skipped


# -----------------------------------------------------------------------------
# The built-in shapes dataset: one coloured shape per image, 6 colours x 6 shapes

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230),
           "yellow": (240, 220, 30), "purple": (140, 40, 190), "orange": (250, 140, 20)}
R_MIN, R_MAX = 0.30, 0.42
SHAPES = ["circle", "ring", "triangle", "cross", "rectangle", "crescent"]
VAL_SEED_OFFSET = 1_000_003  # the held-out split's own seed
CLASSES = sorted((colour, shape) for colour in COLOURS for shape in SHAPES)  # label = index; also the ImageFolder order

CAPTION_TEMPLATES = [
    "a {colour} {shape}.", "a photo of a {colour} {shape}.", "a {size} {colour} {shape}.",
    "a {colour} {shape} on a {background} background.", "a {colour} {shape} in the {place} of the picture.",
    "there is a {size} {colour} {shape} here.", "an image showing one {colour} {shape}.",
    "{colour} {shape}, {size}, {place}.", "a drawing of a {shape} coloured {colour}.",
    "the {shape} is {colour}.", "a {size} {shape} in {colour} near the {place}.",
    "one {colour} {shape} against a {background} backdrop.",
]


def shape_polygon(shape, cx, cy, r):
    """Outline of a shape centred at (cx, cy) with radius r, as a list of points."""
    if shape == "square":
        r *= 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "rectangle":
        return [(cx - r, cy - 0.4 * r), (cx + r, cy - 0.4 * r), (cx + r, cy + 0.4 * r), (cx - r, cy + 0.4 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    if shape == "cross":
        w = 0.33 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(shape)


def draw_shape(draw, shape, cx, cy, r, fill, background):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(0.35 * r)))
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        draw.ellipse([cx - 0.3 * r, cy - r, cx + 1.4 * r, cy + r], fill=background)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r), fill=fill)


def make_shape_image(rng, label, size=64, with_mask=False):
    """One image of class `label`, the words a caption can use to describe it, and (if asked) the object's mask."""
    colour, shape = CLASSES[label]
    grey = rng.randint(20, 235)
    background = tuple(int(np.clip(grey + rng.randint(-15, 15), 0, 255)) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    r = rng.uniform(R_MIN, R_MAX) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = tuple(int(np.clip(c + rng.randint(-20, 20), 0, 255)) for c in COLOURS[colour])
    draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, fill, background)
    mask = None
    if with_mask:
        mask = Image.new("L", (size, size), 0)
        draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, 255, 0)
    pixels = np.asarray(image, dtype=np.float32)
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 6, pixels.shape)
    image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    words = {"colour": colour, "shape": shape,
             "size": "small" if r < 0.34 * size else "large" if r > 0.38 * size else "medium",
             "background": "dark" if grey < 90 else "light" if grey > 170 else "grey",
             "place": ("top " if cy < size / 3 else "bottom " if cy > 2 * size / 3 else "")
             + ("left" if cx < size / 3 else "right" if cx > 2 * size / 3 else "middle")}
    return (image, words, np.asarray(mask) > 0) if with_mask else (image, words)


def write_shapes_dataset(root, train_samples=12000, val_per_class=25, shard_size=1000, size=64, seed=0):
    """Write the shapes data under root, if it is not there already:

        root/train-00000.tar ...   webdataset shards of key.jpg, key.txt (caption), key.cls
        root/val/<colour>_<shape>/*.jpg   held-out images (own seed), ImageFolder layout
        root/classnames.txt        "red circle", ... in folder order
        root/captions.txt          all training captions (for training a tokenizer)

    Deterministic given the seed. Written to root.tmp and renamed, so an interrupted
    run never leaves a half-written dataset behind.
    """
    if os.path.exists(os.path.join(root, "classnames.txt")):
        return
    if os.path.exists(root):
        die(f"{root} exists but is not a complete shapes dataset; delete it and run again")
    print(f"writing the built-in shapes data to {root} ({train_samples} training pairs, {val_per_class * len(CLASSES)} "
          f"held-out images, {size} px; once, about 10 s)", flush=True)
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rng = random.Random(seed)
    captions = []
    for first in range(0, train_samples, shard_size):
        with tarfile.open(os.path.join(tmp, f"train-{first // shard_size:05d}.tar"), "w") as tar:
            for key in range(first, min(first + shard_size, train_samples)):
                label = rng.randrange(len(CLASSES))
                image, words = make_shape_image(rng, label, size)
                caption = rng.choice(CAPTION_TEMPLATES).format(**words)
                captions.append(caption)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                for ext, data in (("jpg", buffer.getvalue()), ("txt", caption.encode()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    val_rng = random.Random(seed + VAL_SEED_OFFSET)
    folders = [f"{colour}_{shape}" for colour, shape in CLASSES]
    for label, (colour, shape) in enumerate(CLASSES):
        folder = os.path.join(tmp, "val", folders[label])
        os.makedirs(folder, exist_ok=True)
        for i in range(val_per_class):
            make_shape_image(val_rng, label, size)[0].save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)
    with open(os.path.join(tmp, "captions.txt"), "w") as f:
        f.write("\n".join(captions) + "\n")
    with open(os.path.join(tmp, "classnames.txt"), "w") as f:
        f.write("\n".join(folder.replace("_", " ") for folder in folders) + "\n")
    with open(os.path.join(tmp, "info.json"), "w") as f:
        json.dump({"train_samples": train_samples, "val_per_class": val_per_class, "size": size, "seed": seed}, f)
    os.replace(tmp, root)


def folder_batches(dataset, batch_size, seed, epoch, workers):
    """Shuffled training batches of a map-style dataset (an ImageFolder): each rank its own share
    of the images (DistributedSampler, seeded alike) and its own random transforms (crops,
    flips: the loader's generator, and with it the workers' seeds, differs per rank), both
    repeating with the same seed and epoch."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = DistributedSampler(dataset, seed=seed, drop_last=True) if dist.is_initialized() else None
    if sampler:
        sampler.set_epoch(epoch)
    transforms = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True,
                      num_workers=workers, generator=transforms)


def builtin_shapes(data_dir, image_size):
    """The shapes data under data_dir/shapes, written by rank 0 if it is not there yet.

    Returns (training shard paths, held-out ImageFolder dir, classnames file, training samples).
    """
    root = os.path.join(data_dir, "shapes")
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_shapes_dataset(root, size=image_size)
    if dist.is_initialized():
        dist.barrier()
    with open(os.path.join(root, "info.json")) as f:
        info = json.load(f)
    if info["size"] != image_size:
        die(f"{root} holds {info['size']} px images, the model wants {image_size}; delete it or use another data folder")
    shards = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".tar"))
    return shards, os.path.join(root, "val"), os.path.join(root, "classnames.txt"), info["train_samples"]

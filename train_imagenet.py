"""Image classification with a DRIP (or plain) ViT: from scratch, linear probe, or fine-tuning.

    python train_imagenet.py                                                 # built-in shapes, from scratch
    python train_imagenet.py --init_from out/clip_tiny_c1/ckpt.pt --freeze   # linear probe of a CLIP image tower
    python train_imagenet.py --init_from out/clip_tiny_c4/ckpt.pt --lr_find  # learning-rate range test
    torchrun --nproc_per_node=8 train_imagenet.py --train_data imagenet/train --val_data imagenet/val \\
        --init_from clip.pt --model ViT-B-16 --batch_size 256

--train_data and --val_data are ImageFolders (ImageNet's train/ and val/ layout) or
webdataset shards with .cls labels. Without them, the built-in shapes data (36 colour x
shape classes: training shards with .cls labels and a held-out ImageFolder) is written
to --data_dir and used. --init_from loads the image tower of a train_clip.py checkpoint
(which brings its own configuration) or of open_clip weights; --freeze trains only the
linear head (the boundary predictor stays frozen too), otherwise the backbone trains at
lr * backbone_lr_scale. A shard sample whose image or label cannot be read is skipped
and counted (skipped_samples). Options are the defaults below, overridden as
--key=value or --key value.
"""
import os
import time
from dataclasses import asdict
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import webdataset as wds
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from common import (EpochMeter, Progress, all_reduce_sum, all_rng_states, autocast_context, check_boundaries, check_options,
                    check_shared_folder, check_writable, classification_accuracy, cosine_lr, die, load_weights_file,
                    log_record, mean_over_ranks, parse_overrides, read_resume_checkpoint, reducer_tag, restore_checkpoint,
                    save_checkpoint, seed_per_rank, setup_distributed)
from data import (CLIP_MEAN, CLIP_STD, builtin_shapes, decode_batches, expand_shards, folder_batches, image_folder,
                  image_transform)
from model import CLIP, CONFIGS, CLIPConfig, decay_groups, load_clip_weights, make_config
from plots import plot_curves, plot_lr_find
from reducers import REDUCERS, describe_reducer

_before = set(globals())  # what the defaults block below adds are the script's options
# -----------------------------------------------------------------------------
# defaults: the tiny model on the built-in shapes data, a few minutes on a 2-core CPU
model = ""                  # tiny | ViT-B-32 | ViT-B-16 | ViT-L-14 | ViT-L-14-336; empty = the --init_from checkpoint's, else tiny
compress = 0.0              # DRIP compression; 0 = the --init_from checkpoint's, else 1 (plain ViT)
reducer = ""                # drip | uniform | tome | dynamicvit | tokenlearner | group (at DRIP's MACs); empty = the checkpoint's, else drip
boundaries = ""             # DRIP's predictor: gumbel | entropy (trained on entropy spikes); empty = the checkpoint's, else gumbel
train_data = ""             # ImageFolder (e.g. imagenet/train) or webdataset shards with .cls labels, e.g. 'train/{0000..1023}.tar'; empty = built-in shapes
val_data = ""               # ImageFolder or shards, for evaluation; required with --train_data
train_num_samples = 0       # samples per epoch, with training shards
num_classes = 0             # with training shards
data_dir = "data"           # where the built-in data is written (shared with train_clip.py)
init_from = ""              # train_clip.py checkpoint or open_clip weights for the image tower
freeze = False              # linear probe: train only the head
backbone_lr_scale = 0.1     # fine-tuning: backbone lr = lr * backbone_lr_scale
out_dir = ""                # empty = out/imagenet_<model>_c<compress>, of the configuration actually used
epochs = 3
batch_size = 128            # per rank
lr = 1e-3
warmup_steps = 20
weight_decay = 0.05
label_smoothing = 0.0
mixup = 0.0                 # Beta(mixup, mixup) mixing of image pairs; 0 = off
boundary_loss_weight = 1.0
workers = 1
seed = 0
dtype = "auto"              # auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float32
log_every = 20
checkpoint_every = 200
resume = False
max_steps = 0               # stop after this many steps (0 = all epochs)
lr_find = False             # learning-rate range test instead of training
lr_find_steps = 100
config = parse_overrides(globals(), _before)
globals().update(config)
# -----------------------------------------------------------------------------


class Classifier(nn.Module):
    """The image tower and a linear head on its image embedding (CLS after ln_post and proj)."""

    def __init__(self, visual, num_classes):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(visual.cfg.embed_dim, num_classes)

    def forward(self, images):
        vision = self.visual(images)
        return self.head(vision.embedding), vision

    def param_groups(self, weight_decay, backbone_lr_scale):
        """AdamW groups (decay on matrices only), each with the scale of the lr it trains at."""
        return ([g | {"lr_scale": 1.0} for g in decay_groups(self.head.parameters(), weight_decay)]
                + [g | {"lr_scale": backbone_lr_scale} for g in decay_groups(self.visual.parameters(), weight_decay)])


def train_transform(image_size):
    return T.Compose([T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def same_seed_on_every_rank():
    return 0


def make_train_batches(source, image_size, steps, epoch):
    """Exactly `steps` (images, labels, skipped) training batches on this rank for `epoch`."""
    if isinstance(source, ImageFolder):
        loader = folder_batches(source, batch_size, seed, epoch, workers)
        return ((images, labels, 0) for _, (images, labels) in zip(range(steps), loader))
    # shards: one resampled stream, split over ranks and workers, cut at the same step everywhere
    pipeline = wds.DataPipeline(
        wds.ResampledShards(source, seed=seed + epoch, worker_seed=same_seed_on_every_rank, deterministic=True),
        wds.split_by_node, wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(1000, seed=seed + epoch + int(os.environ.get("RANK", 0))),
        # the built-in shapes are random in size and place already; a random crop would cut the object out
        partial(decode_batches, batch_size=batch_size, target="cls", num_classes=num_classes,
                transform=train_transform(image_size) if train_data else image_transform(image_size)))
    return iter(wds.WebLoader(pipeline, batch_size=None, num_workers=workers).with_epoch(steps))


@torch.no_grad()
def evaluate(classifier, dataset, device, autocast):
    """Top-1/top-5 and boundary rate; each rank evaluates its share (every world_size-th image, or its
    shards), then the sums are reduced."""
    classifier.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if isinstance(dataset, ImageFolder):
        loader = DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=batch_size, num_workers=workers)
    else:
        loader = wds.DataPipeline(wds.SimpleShardList(dataset), wds.split_by_node,
                                  wds.tarfile_to_samples(handler=wds.warn_and_continue),
                                  partial(decode_batches, batch_size=batch_size, target="cls", num_classes=num_classes,
                                          transform=image_transform(classifier.visual.cfg.image_size), keep_last=True))
    result = classification_accuracy(loader, classifier, device, autocast)
    classifier.train()
    if freeze:
        classifier.visual.eval()
    return result


# ----------------------------------------------------------------------------- set-up

# every option checked before anything is written or built
check_options(config, positive=["epochs", "batch_size", "lr", "backbone_lr_scale", "log_every", "checkpoint_every",
                                "lr_find_steps"],
              non_negative=["compress", "train_num_samples", "num_classes", "warmup_steps", "weight_decay", "mixup",
                            "boundary_loss_weight", "workers", "seed", "max_steps"],
              fractions=["label_smoothing"], choices={"model": [""] + list(CONFIGS), "reducer": ("",) + REDUCERS,
                                                               "boundaries": ["", "gumbel", "entropy"]})
if bool(train_data) != bool(val_data):
    die("--train_data and --val_data go together (ImageFolders or shards with .cls labels)")
if not train_data and os.path.isdir(os.path.join(data_dir, "train")) and os.path.isdir(os.path.join(data_dir, "val")):
    die(f"--data_dir is where the built-in data is written; for the ImageFolders in {data_dir} give "
        f"--train_data {os.path.join(data_dir, 'train')} --val_data {os.path.join(data_dir, 'val')}")
train_shards = expand_shards(train_data, "--train_data") if train_data and not os.path.isdir(train_data) else None
val_shards = expand_shards(val_data, "--val_data") if val_data and not os.path.isdir(val_data) else None
if train_shards and (train_num_samples <= 0 or num_classes <= 0):
    die("training shards need --train_num_samples (per epoch) and --num_classes")
if not train_data:
    check_writable(data_dir, "--data_dir")

# the model configuration: a train_clip.py checkpoint brings its own, which --model/--compress must not contradict
weights = load_weights_file(init_from) if init_from else None
if weights is not None and "model_config" in weights:
    model_config = CLIPConfig(**weights["model_config"])
    saved_model = weights.get("run_config", {}).get("model", model)
    if compress and compress != model_config.compress:
        die(f"--compress {compress:g} contradicts {init_from}, a compress-{model_config.compress:g} tower; "
            "drop --compress or give another --init_from")
    if reducer and reducer != model_config.reducer:
        die(f"--reducer {reducer} contradicts {init_from}, a {model_config.reducer} tower; "
            "drop --reducer or give another --init_from")
    if boundaries and boundaries != model_config.boundaries:
        die(f"--boundaries {boundaries} contradicts {init_from}, a {model_config.boundaries} tower; "
            "drop --boundaries or give another --init_from")
    if model and model != saved_model:
        die(f"--model {model} contradicts {init_from}, a {saved_model} tower; drop --model or give another --init_from")
    model = saved_model
else:
    model = model or "tiny"
    check_boundaries(boundaries, reducer, compress or 1.0)
    try:
        model_config = make_config(model, compress=compress or 1.0, reducer=reducer or "drip",
                                   boundaries=boundaries or "gumbel")
    except ValueError as e:
        die(f"{e}; check --compress")
config |= {"model": model, "compress": model_config.compress, "reducer": model_config.reducer,
           "boundaries": model_config.boundaries}
tag = "" if model_config.compress == 1 else reducer_tag(model_config.reducer, model_config.boundaries)
out_dir = config["out_dir"] = out_dir or f"out/imagenet_{model}{tag}_c{model_config.compress:g}"
ckpt_path = os.path.join(out_dir, "ckpt.pt")
check_writable(out_dir, "--out_dir")
checkpoint = (read_resume_checkpoint(ckpt_path, model_config, "--init_from/--model/--compress/--reducer/--boundaries")
              if resume else None)

rank, world_size, device = setup_distributed()
check_shared_folder(out_dir, "--out_dir")
if not train_data:
    check_shared_folder(data_dir, "--data_dir")
master = rank == 0
seed_per_rank(seed)  # augmentations and mixup weights: DDP makes the weights alike
dtype, autocast = autocast_context(device, dtype)

# starting weights loaded before any data is written: weights of another model size stop the run here
clip = CLIP(model_config)
if weights is not None:
    try:
        missing, unexpected = load_clip_weights(clip, weights)
    except ValueError as e:
        die(f"--init_from {init_from}: {e}; choose the matching --model")
    missing = [k for k in missing if k.startswith("visual.")]
    if master:
        print(f"image tower from {init_from}; missing (start fresh): {', '.join(missing) or 'none'}")

size = model_config.image_size
if train_data:
    train_source = train_shards or image_folder(train_data, train_transform(size), "--train_data")
    val_set = val_shards or image_folder(val_data, image_transform(size), "--val_data")
    if not train_shards:
        if not val_shards and train_source.classes != val_set.classes:
            die("--train_data and --val_data hold different class folders")
        num_classes = len(train_source.classes)
    train_samples = train_num_samples if train_shards else len(train_source)
else:
    train_source, val_dir, _, train_samples = builtin_shapes(data_dir, size)
    val_set = image_folder(val_dir, image_transform(size), "--val_data")
    num_classes = len(val_set.classes)
if checkpoint is not None and checkpoint["num_classes"] != num_classes:
    die(f"{ckpt_path} was trained on {checkpoint['num_classes']} classes, this data has {num_classes}")

classifier = Classifier(clip.visual, num_classes).to(device)
del clip, weights
if freeze:  # before DDP wraps the model, so DDP never waits for a gradient that cannot come
    classifier.visual.requires_grad_(False)
    classifier.visual.eval()
optimizer = torch.optim.AdamW([g for g in classifier.param_groups(weight_decay, backbone_lr_scale) if g["params"]],
                              lr=lr, fused=device.type == "cuda")
steps_per_epoch = train_samples // (batch_size * world_size)
if steps_per_epoch == 0:
    die(f"{train_samples} training images are less than one batch ({batch_size} x {world_size} ranks)")
total_steps = epochs * steps_per_epoch
step = 0
if checkpoint is not None:
    step = restore_checkpoint(checkpoint, classifier, optimizer)
    if master:
        print(f"resumed from {ckpt_path} at step {step}")
model_ddp = DDP(classifier, device_ids=[device.index] if device.type == "cuda" else None) if dist.is_initialized() else classifier


def train_step(images, labels, step_lr):
    """One optimizer step; returns the loss, the classification part and the VisionOutput."""
    for group in optimizer.param_groups:
        group["lr"] = step_lr * group["lr_scale"]
    images, labels = images.to(device), labels.to(device)
    mix = torch.distributions.Beta(mixup, mixup).sample().item() if mixup > 0 else 1.0
    order = torch.randperm(len(images), device=device)
    with autocast:
        logits, vision = model_ddp(mix * images + (1 - mix) * images[order] if mixup > 0 else images)
        logits = logits.float()
        task = (mix * F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
                + (1 - mix) * F.cross_entropy(logits, labels[order], label_smoothing=label_smoothing))
        loss = task + (0 if freeze else boundary_loss_weight * vision.aux_loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if not freeze:
        classifier.visual.track_rate(mean_over_ranks(vision.boundary_rate))  # DRIP's rate controller, on every rank alike
    return loss, task, vision


def write_checkpoint():
    states = all_rng_states()
    if master:
        save_checkpoint({"model": classifier.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "model_config": asdict(model_config), "num_classes": num_classes, "run_config": config,
                         "rng": states}, ckpt_path)


if master:
    os.makedirs(out_dir, exist_ok=True)

# ----------------------------------------------------------------------------- LR range test

if lr_find:
    lrs, losses, smoothed, best = [], [], 0.0, float("inf")
    for i, (images, labels, _) in enumerate(make_train_batches(train_source, model_config.image_size, lr_find_steps, 0)):
        step_lr = 1e-7 * (10 / 1e-7) ** (i / max(1, lr_find_steps - 1))  # 1e-7 -> 10, exponentially
        loss = all_reduce_sum([train_step(images, labels, step_lr)[0].item()], device)[0] / world_size
        smoothed = 0.98 * smoothed + 0.02 * loss
        lrs.append(step_lr)
        losses.append(smoothed / (1 - 0.98 ** (i + 1)))  # bias-corrected moving average
        best = min(best, losses[-1])
        if losses[-1] > 4 * best and i > 10:
            break
    slopes = np.gradient(np.array(losses), np.log10(lrs))
    suggestion = lrs[int(np.argmin(slopes[: int(np.argmin(losses)) + 1]))]  # steepest descent before the minimum
    if master:
        plot_lr_find(lrs, losses, suggestion, os.path.join(out_dir, "lr_find.png"),
                     title=f"LR range test: {init_from or 'random init'}, {'linear probe' if freeze else 'full training'}")
        print(f"suggested lr {suggestion:.2e} (steepest descent of the smoothed loss); plot: {out_dir}/lr_find.png")
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(0)

# ----------------------------------------------------------------------------- training loop

progress = Progress(step, min(total_steps, max_steps or total_steps), steps_per_epoch, "images")
if master:
    print(f"{model_config.image_size}px compress {model_config.compress:g}, {num_classes} classes, "
          f"{'linear probe' if freeze else 'full training'}, {world_size} rank(s), {progress.plan()}", flush=True)
    print(describe_reducer(model_config))
summary, skipped_total = {}, 0
while step < total_steps and (not max_steps or step < max_steps):
    epoch = step // steps_per_epoch
    steps_left = min(steps_per_epoch - step % steps_per_epoch, (max_steps or total_steps) - step)
    meter = EpochMeter()
    t_data = time.perf_counter()
    for images, labels, skipped in make_train_batches(train_source, model_config.image_size, steps_left,
                                                      epoch * 10_007 + step):
        t_start = time.perf_counter()
        loss, task, vision = train_step(images, labels, cosine_lr(step, total_steps, warmup_steps, lr))
        step += 1
        progress.advance(len(images) * world_size)
        skipped_total += skipped
        t_end = time.perf_counter()
        meter.add(t_end - t_data, t_start - t_data, train_loss=task, train_boundary_rate=vision.boundary_rate)
        if step % log_every == 0 and master:
            print(f"step {step}/{progress.end} {progress.report()} loss {loss.item():.4f} "
                  f"rate {vision.boundary_rate.item():.3f}/{1 / model_config.compress:.3f} "
                  f"step {1000 * (t_end - t_data):.0f}ms", flush=True)
        if step % checkpoint_every == 0:
            write_checkpoint()
        t_data = time.perf_counter()
    summary = {"epoch": step / steps_per_epoch, "step": step, **evaluate(classifier, val_set, device, autocast),
               "target_rate": 1 / model_config.compress, **meter.record(batch_size * world_size, device),
               "skipped_samples": int(all_reduce_sum([skipped_total], device)[0])}
    log_record(summary, out_dir)
write_checkpoint()
if master and summary:
    plot_curves([out_dir], os.path.join(out_dir, "curves.png"))
    print(f"curves: {out_dir}/curves.png")
if dist.is_initialized():
    dist.destroy_process_group()

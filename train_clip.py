"""CLIP contrastive pretraining with a DRIP (or plain) image tower.

    python train_clip.py                                  # tiny model on built-in shapes data, CPU
    python train_clip.py --compress 4                     # the same with DRIP at 4x
    python train_clip.py --compress 4 --reducer tome      # ToMe at DRIP's 4x MACs (uniform, dynamicvit, tokenlearner, group)
    torchrun --nproc_per_node=8 train_clip.py --model ViT-B-16 --compress 4 \\
        --train_data 'laion/{00000..01023}.tar' --train_num_samples 10000000 \\
        --val_data imagenet/val --batch_size 256 --epochs 10  # CLIP's 1000 class names, 80 templates
    python train_clip.py --eval_only --init_from out/clip_ViT-B-16_c4/ckpt.pt --val_data imagenet/val  # zero-shot only

Options are the module-level defaults below, overridden as --key=value or --key value.
Without --train_data, a shapes dataset is written to data/shapes (webdataset shards for
training, an ImageFolder for zero-shot evaluation) and a BPE tokenizer is trained on its
captions. Every epoch reports zero-shot top-1/top-5, the boundary rate against its
target, step and data time, images/s and peak memory, to the console and to
out_dir/metrics.jsonl, drawn at the end as out_dir/curves.png (plots.py); every log line
shows the percentage done, images/s and the time left. out_dir/ckpt.pt is written
atomically every checkpoint_every steps and at the end; --resume continues from it.
"""
import math
import os
import time
from dataclasses import asdict
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
import webdataset as wds
from tokenizers import Tokenizer
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (Progress, all_reduce_sum, all_rng_states, autocast_context, check_boundaries, check_file, check_options,
                    EpochMeter, check_shared_folder, check_writable, classification_accuracy, clip_run_dir, cosine_lr,
                    die, gather_with_grad, load_weights_file, log_record, mean_over_ranks, parse_overrides,
                    read_resume_checkpoint, restore_checkpoint, save_checkpoint, seed_per_rank, setup_distributed)
from data import builtin_shapes, decode_batches, expand_shards, image_folder, image_transform
from text import (IMAGENET_CLASSNAMES, load_tokenizer, read_lines, tokenize, train_tokenizer, zero_shot_classifier,
                  zero_shot_templates)
from model import CLIP, CONFIGS, CLIPConfig, image_tower_macs, load_clip_weights, make_config
from plots import plot_curves
from reducers import REDUCERS, describe_reducer

_before = set(globals())  # what the defaults block below adds are the script's options
# -----------------------------------------------------------------------------
# defaults (the built-in data and the tiny model: a 2-core CPU run of a few minutes)
model = "tiny"              # tiny | ViT-B-32 | ViT-B-16 | ViT-L-14 | ViT-L-14-336
compress = 1.0              # DRIP compression; 1 = plain ViT
reducer = "drip"            # drip | uniform | tome | dynamicvit | tokenlearner | group (the others at DRIP's MACs)
boundaries = "gumbel"       # DRIP's predictor: gumbel (trained through the task) | entropy (trained on entropy spikes, DTP)
pre_layers = 0              # blocks before pooling; 0 = the model's default
train_data = ""             # webdataset shards, e.g. 'shards/{00000..01023}.tar'; empty = built-in shapes
train_num_samples = 0       # samples per epoch (required with --train_data)
val_data = ""               # ImageFolder for zero-shot evaluation, e.g. ImageNet val
classnames = ""             # one class name per line, in the val folders' order; empty with 1000 folders = CLIP's ImageNet names
templates = ""              # zero-shot prompts: 80 (CLIP's ImageNet templates) | 7 (their subset) | a file; empty = 80 (shapes' own for the built-in data)
tokenizer = ""              # tokenizer.json or bpe_simple_vocab_16e6.txt.gz; empty = train a BPE
init_from = ""              # open_clip / OpenAI CLIP weights or a train_clip.py checkpoint (.pt/.bin/.safetensors)
quick_gelu = False          # True for OpenAI's CLIP weights
data_dir = "data"           # where the built-in data is written
out_dir = ""                # empty = out/clip_<model>_c<compress>; _<reducer> or _entropy before _c<compress> for those
epochs = 6
batch_size = 128            # per rank
lr = 1e-3
warmup_steps = 50
weight_decay = 0.2          # on matrices only
beta1, beta2, eps = 0.9, 0.98, 1e-6
boundary_loss_weight = 1.0  # lambda of the binomial prior (DynamicViT's keep-ratio loss, the entropy predictor's loss)
grad_clip = 1.0             # 0 = off
workers = 1                 # data loader processes per rank
seed = 0
dtype = "auto"              # auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float32
compile = False
grad_checkpointing = False
log_every = 20
checkpoint_every = 200      # steps
resume = False
max_steps = 0               # stop after this many steps (0 = run all epochs); for tests and smoke runs
eval_only = False           # zero-shot evaluation of --init_from (or out_dir's checkpoint with --resume), no training
config = parse_overrides(globals(), _before)
globals().update(config)
# -----------------------------------------------------------------------------

SHAPES_TEMPLATES = ["a {}.", "a photo of a {}.", "an image showing one {}.", "a drawing of a {}."]


# ----------------------------------------------------------------------------- data

def same_seed_on_every_rank():
    return 0


def train_loader(urls, image_size, steps, stream_seed):
    """Exactly `steps` (images, captions, skipped) batches on every rank, however the shards are sized.

    Shards are drawn with replacement (resampled) from one stream that every rank
    seeds alike; split_by_node and split_by_worker then hand each rank and worker its
    own share of that stream. Since the stream never ends, with_epoch(steps) cuts
    every rank at the same step: no rank waits in an all-reduce for one that ran dry.
    """
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=stream_seed, worker_seed=same_seed_on_every_rank, deterministic=True),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(1000, seed=stream_seed + int(os.environ.get("RANK", 0))),
        # real data gets open_clip's mild random crop; the shapes are already random in size and place,
        # and a crop's aspect change would turn circles into ellipses
        partial(decode_batches, batch_size=batch_size, target="txt",
                transform=image_transform(image_size, augment=bool(train_data))),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers).with_epoch(steps)


# ----------------------------------------------------------------------------- zero-shot evaluation

@torch.no_grad()
def zero_shot(model, tok, dataset, names, prompts, device, autocast):
    """Top-1/top-5 accuracy and boundary rate; each rank evaluates every world_size-th image."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=workers)
    with autocast:
        classifier = zero_shot_classifier(model, tok, names, prompts, device)             # C x E

    def classify(images):
        vision = model.encode_image(images)
        return F.normalize(vision.embedding.float(), dim=-1) @ classifier.t(), vision    # B x C

    result = classification_accuracy(loader, classify, device, autocast)
    model.train()
    return {"zero_shot_top1": result["top1"], "zero_shot_top5": result["top5"],
            "eval_boundary_rate": result["eval_boundary_rate"], "eval_tokens": result["eval_tokens"],
            "eval_images": result["eval_images"]}


# ----------------------------------------------------------------------------- loss

def contrastive_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE over the features of all ranks; local rows, gathered columns (open_clip's local loss)."""
    if dist.is_initialized():
        all_image, all_text = gather_with_grad(image_features), gather_with_grad(text_features)  # world*B x E
        offset = dist.get_rank() * len(image_features)
    else:
        all_image, all_text, offset = image_features, text_features, 0
    labels = torch.arange(len(image_features), device=image_features.device) + offset
    logits_per_image = logit_scale * image_features @ all_text.t()  # B x world*B
    logits_per_text = logit_scale * text_features @ all_image.t()
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


# ----------------------------------------------------------------------------- set-up

# every option checked before anything is written or built
check_options(config, positive=["epochs", "batch_size", "lr", "eps", "log_every", "checkpoint_every"],
              non_negative=["pre_layers", "train_num_samples", "warmup_steps", "weight_decay", "boundary_loss_weight",
                            "grad_clip", "workers", "seed", "max_steps"],
              fractions=["beta1", "beta2"], choices={"model": list(CONFIGS), "reducer": REDUCERS,
                                                     "boundaries": ["gumbel", "entropy"]})
check_boundaries(boundaries, reducer, compress)
overrides = ({"compress": compress, "reducer": reducer, "quick_gelu": quick_gelu, "boundaries": boundaries}
             | ({"pre_layers": pre_layers} if pre_layers else {}))
try:
    model_config = make_config(model, **overrides)
except ValueError as e:
    die(f"{e}; check --compress/--pre_layers")
out_dir = out_dir or clip_run_dir(model, model_config.compress, reducer, boundaries)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
check_writable(out_dir, "--out_dir")
if eval_only and not init_from and not resume:
    die("--eval_only evaluates --init_from weights (or out_dir's checkpoint with --resume); give one")
if train_data and not eval_only:
    if train_num_samples <= 0:
        die("--train_num_samples is required with --train_data (samples per epoch)")
    if not val_data:
        die("--val_data DIR is required with --train_data for zero-shot evaluation (e.g. ImageNet's val/)")
    urls = expand_shards(train_data, "--train_data")
use_builtin = not (train_data and not eval_only) and not (eval_only and val_data)
if use_builtin:
    check_writable(data_dir, "--data_dir")
check_file(classnames, "--classnames", "class name file")
check_file(tokenizer, "--tokenizer", "tokenizer file")
if templates not in ("", "80", "7"):
    zero_shot_templates(templates)
# starting weights, read once: a train_clip.py checkpoint also brings its tokenizer (and, to evaluate, its config)
init_weights = load_weights_file(init_from) if init_from and not resume else None
if eval_only and init_weights is not None and "model_config" in init_weights:
    model_config = CLIPConfig(**init_weights["model_config"])
    if compress != 1 and compress != model_config.compress:
        die(f"--compress {compress:g} contradicts {init_from}, a compress-{model_config.compress:g} checkpoint, which "
            "--eval_only evaluates as it is; drop --compress")
rank, world_size, device = setup_distributed()
check_shared_folder(out_dir, "--out_dir")
if use_builtin:
    check_shared_folder(data_dir, "--data_dir")
master = rank == 0
seed_per_rank(seed)  # DDP makes the weights alike
dtype, autocast = autocast_context(device, dtype)
checkpoint = (read_resume_checkpoint(ckpt_path, model_config, "--model/--compress/--pre_layers/--reducer/--boundaries")
              if resume else None)
# the model and its starting weights before any data is written: weights of another size stop the run here
raw_model = CLIP(model_config).to(device)
raw_model.visual.transformer.grad_checkpointing = grad_checkpointing
raw_model.transformer.grad_checkpointing = grad_checkpointing
if init_weights is not None:
    try:
        missing, unexpected = load_clip_weights(raw_model, init_weights)
    except ValueError as e:
        die(f"--init_from {init_from}: {e}; choose the matching --model")
    if master:
        print(f"initialised from {init_from}; missing (start fresh): {', '.join(missing) or 'none'}; "
              f"unexpected (ignored): {', '.join(unexpected) or 'none'}")
val_transform = image_transform(model_config.image_size, augment=False)
val_set = image_folder(val_data, val_transform, "--val_data") if val_data else None

if use_builtin:
    urls, shapes_val, shapes_classnames, shapes_samples = builtin_shapes(data_dir, model_config.image_size)
    train_num_samples = train_num_samples or shapes_samples
    if val_set is None:
        val_data, classnames = shapes_val, classnames or shapes_classnames
        templates = templates or "shapes"
        val_set = image_folder(val_data, val_transform, "--val_data")
if not classnames and len(val_set.classes) != 1000:
    die(f"--classnames FILE is required: {val_data} has {len(val_set.classes)} class folders, not ImageNet's 1000")
names_source = classnames or f"CLIP's ImageNet class names ({os.path.relpath(IMAGENET_CLASSNAMES)})"
names = read_lines(classnames or IMAGENET_CLASSNAMES)
if len(names) != len(val_set.classes):
    die(f"--classnames {classnames} has {len(names)} names but {val_data} has {len(val_set.classes)} class folders")
templates = templates or "80"
prompts = SHAPES_TEMPLATES if templates == "shapes" else zero_shot_templates(templates)
kind = {"shapes": "the shapes prompts", "80": "CLIP's ImageNet templates", "7": "a subset of CLIP's"}.get(templates, templates)
zero_shot_note = f"zero-shot on {val_data}: {len(names)} classes, names from {names_source}, {len(prompts)} templates ({kind})"

# tokenizer: from the checkpoint, a file, or trained here on the training captions
if checkpoint is not None:
    tok = Tokenizer.from_str(checkpoint["tokenizer"])
elif tokenizer:
    tok = load_tokenizer(tokenizer, model_config.context_length)
elif init_weights is not None and "tokenizer" in init_weights:  # the ids its text tower was trained on
    tok = Tokenizer.from_str(init_weights["tokenizer"])
elif eval_only:
    die("--eval_only needs the tokenizer of the --init_from weights: give --tokenizer "
        "(bpe_simple_vocab_16e6.txt.gz for open_clip / OpenAI weights)")
else:
    tok_path = os.path.join(out_dir, "tokenizer.json")
    if master:
        if train_data:
            captions = (s["txt"].decode("utf-8", "replace") for s in
                        wds.DataPipeline(wds.SimpleShardList(urls[:8]), wds.tarfile_to_samples(handler=wds.warn_and_continue)))
        else:
            captions = open(os.path.join(data_dir, "shapes", "captions.txt")).read().splitlines()
        os.makedirs(out_dir, exist_ok=True)
        train_tokenizer(captions, model_config.vocab_size, model_config.context_length).save(tok_path)
    if dist.is_initialized():
        dist.barrier()
    tok = Tokenizer.from_file(tok_path)
if tok.get_vocab_size() > model_config.vocab_size:
    die(f"tokenizer has {tok.get_vocab_size()} tokens, more than the model's vocabulary of {model_config.vocab_size}")

if eval_only:
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
    if master:
        print(zero_shot_note, flush=True)
    result = zero_shot(raw_model, tok, val_set, names, prompts, device, autocast)
    if master:
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(0)
optimizer = torch.optim.AdamW(raw_model.param_groups(weight_decay), lr=lr, betas=(beta1, beta2), eps=eps,
                              fused=device.type == "cuda")
steps_per_epoch = train_num_samples // (batch_size * world_size)
if steps_per_epoch == 0:
    die(f"--train_num_samples {train_num_samples} is less than one batch ({batch_size} x {world_size} ranks)")
total_steps = epochs * steps_per_epoch
step = 0
if checkpoint is not None:
    step = restore_checkpoint(checkpoint, raw_model, optimizer)
    if master:
        print(f"resumed from {ckpt_path} at step {step}")
ddp_model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None) if dist.is_initialized() else raw_model
train_step_model = torch.compile(ddp_model) if compile else ddp_model


def write_checkpoint():
    states = all_rng_states()
    if master:
        save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "model_config": asdict(model_config), "run_config": config, "tokenizer": tok.to_str(),
                         "rng": states}, ckpt_path)


# ----------------------------------------------------------------------------- training loop

progress = Progress(step, min(total_steps, max_steps or total_steps), steps_per_epoch, "images")
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"{model_config.image_size}px {model} compress {compress:g}: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f}M "
          f"parameters, {world_size} rank(s), {progress.plan()}, {device} {dtype}", flush=True)
    print(zero_shot_note, flush=True)
    print(describe_reducer(model_config))
target_rate = 1 / compress
skipped_total = 0
epoch_summary = {}
while step < total_steps and (not max_steps or step < max_steps):
    epoch = step // steps_per_epoch
    steps_left = min(steps_per_epoch - step % steps_per_epoch, (max_steps or total_steps) - step)
    # a fresh data stream for each (epoch, start step): a resumed run draws the rest of its epoch
    loader = train_loader(urls, model_config.image_size, steps_left, seed * 1_000_003 + epoch * 10_007 + step)
    meter = EpochMeter()
    t_data = time.perf_counter()
    for images, captions, skipped in loader:
        t_start = time.perf_counter()
        images, text = images.to(device, non_blocking=True), tokenize(tok, captions).to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total_steps, warmup_steps, lr)
        with autocast:
            image_features, text_features, logit_scale, vision = train_step_model(images, text)
            contrastive = contrastive_loss(image_features.float(), text_features.float(), logit_scale.float())
            loss = contrastive + boundary_loss_weight * vision.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        optimizer.step()
        with torch.no_grad():
            raw_model.logit_scale.clamp_(0, math.log(100))
        raw_model.visual.track_rate(mean_over_ranks(vision.boundary_rate))  # DRIP's rate controller, on every rank alike
        step += 1
        progress.advance(len(images) * world_size)
        skipped_total += skipped
        t_end = time.perf_counter()
        meter.add(t_end - t_data, t_start - t_data, train_boundary_rate=vision.boundary_rate,
                  contrastive_loss=contrastive, boundary_loss=vision.aux_loss)
        if step % log_every == 0 and master:
            print(f"step {step}/{progress.end} {progress.report()} loss {loss.item():.4f} "
                  f"contrastive {contrastive.item():.4f} boundary {vision.aux_loss.item():.4f} "
                  f"rate {vision.boundary_rate.item():.3f}/{target_rate:.3f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"step {1000 * (t_end - t_data):.0f}ms"
                  + (f" skipped {skipped_total}" if skipped_total else ""), flush=True)
        if step % checkpoint_every == 0:
            write_checkpoint()
        t_data = time.perf_counter()
    epoch_summary = {"epoch": step / steps_per_epoch, "step": step,
                     **zero_shot(raw_model, tok, val_set, names, prompts, device, autocast), "target_rate": target_rate,
                     **meter.record(batch_size * world_size, device),
                     "skipped_samples": int(all_reduce_sum([skipped_total], device)[0]),
                     "logit_scale": raw_model.logit_scale.exp().item()}
    log_record(epoch_summary, out_dir)

write_checkpoint()
if master and epoch_summary:
    plot_curves([out_dir], os.path.join(out_dir, "curves.png"))
    print(f"curves: {out_dir}/curves.png")
    s = epoch_summary
    name_suffix = "" if reducer == "drip" else f" {reducer}"
    print("| model | GFLOPs (analytic) | resolution | patch size | #epochs | Top-1 Acc (%) | Top-5 Acc (%) "
          "| peak memory (GB) | avg training step time (s) |")
    print(f"| {model}{'' if compress == 1 else f'{name_suffix} {compress:g}x comp'} | {image_tower_macs(model_config) / 1e9:.2f} "
          f"| {model_config.image_size} | {model_config.patch_size} | {s['epoch']:g} | {s['zero_shot_top1']:.2f}% "
          f"| {s['zero_shot_top5']:.2f}% | {s['peak_memory_gb']:.1f} | {s['step_time_s']:.3f} |")
if dist.is_initialized():
    dist.destroy_process_group()

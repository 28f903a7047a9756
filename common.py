"""Process, flags and checkpoints, shared by every script: command-line overrides of the
defaults block (and --help), option checks that stop with one line, DDP set-up, autocast,
the LR schedule, top-1/top-5 accuracy, peak memory, progress and time left for log lines,
atomic checkpoints, resuming, weight files and image towers, RNG states.

Images, shard decoding and the built-in data live in data.py; tokenizers, the conversation
template and Hugging Face LLM folders in text.py.
"""
import argparse
import datetime
import difflib
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

try:  # the all-gather with gradient that replaces torch.distributed.nn's
    from torch.distributed._functional_collectives import all_gather_single_autograd
except ImportError:
    import torch.distributed.nn.functional
    all_gather_single_autograd = None

import reducers  # noqa: F401  registers the comparison reducers, so a checkpoint of any tower loads
from model import CLIP, CLIPConfig, load_clip_weights, make_config

def die(message):
    """Stop with one clear sentence instead of a traceback."""
    raise SystemExit(f"error: {message}")


# -----------------------------------------------------------------------------
# nanoGPT-style configuration: module-level defaults, overridden by --key=value or --key value


def defaults_block(path):
    """The source lines of a script's defaults block, from its `# defaults` comment to the
    `config = parse_overrides(...)` line: what --help prints, comments included."""
    with open(path) as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("# defaults")), None)
    end = next((i for i, line in enumerate(lines) if "parse_overrides(" in line and i > (start or 0)), None)
    if start is None or end is None:
        raise RuntimeError(f"{path} has no '# defaults' block ending in config = parse_overrides(...)")
    return lines[start:end]


def parse_overrides(namespace, before, argv=None):
    """Return a dict of the script's defaults with command-line overrides applied.

    namespace is the calling script's globals() and `before` the names it held before its
    defaults block: the options are the names the block added (those starting with _ aside),
    so an imported constant is never an option. --help prints the block with its comments.
    Types follow the defaults: `--compress 4` on a float default gives 4.0, a bool accepts
    `--flag`, `--flag=true` and `--flag=false`.
    """
    argv = sys.argv[1:] if argv is None else argv
    config = {k: v for k, v in namespace.items() if k not in before and not k.startswith("_")}
    if "--help" in argv or "-h" in argv:
        doc = (namespace.get("__doc__") or "").strip().split("\n\n")[0]
        print(f"{doc}\n\nusage: python {os.path.basename(namespace['__file__'])} [--key=value | --key value] ...\n")
        print("\n".join(defaults_block(namespace["__file__"])))
        raise SystemExit(0)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            die(f"unexpected argument {arg!r}; options look like --key=value (--help lists them)")
        key, has_value, value = arg[2:].partition("=")
        if key not in config:
            close = difflib.get_close_matches(key, config, n=1)
            die(f"unknown option --{key}" + (f"; did you mean --{close[0]}?" if close else "; --help lists the options"))
        default = config[key]
        if not has_value and isinstance(default, bool):
            value = "true"
        elif not has_value:
            if i + 1 >= len(argv):
                die(f"option --{key} needs a value")
            i += 1
            value = argv[i]
        config[key] = _convert(key, value, default)
        i += 1
    return config


def _convert(key, value, default):
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a finite number"}[type(default)]
        die(f"--{key} expects {expected}, got {value!r}")
    return value


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help, except where there is none to show."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the tools that take lists (flops.py, visualize.py, gpu_check.py): --help shows every
    default, no abbreviated flags, and a bad flag stops with one line, as parse_overrides does."""

    def __init__(self, description):
        super().__init__(description=description, allow_abbrev=False, formatter_class=DefaultsHelpFormatter)

    def error(self, message):
        die(f"{message} (--help lists the options)")


def check_options(config, positive=(), non_negative=(), fractions=(), choices=None):
    """Refuse an out-of-range option with one line, before any work: `positive` names must be > 0,
    `non_negative` ones >= 0, `fractions` in [0, 1); `choices` maps a name to its allowed values."""
    for key in positive:
        if not config[key] > 0:
            die(f"--{key} must be > 0, got {config[key]}")
    for key in non_negative:
        if not config[key] >= 0:
            die(f"--{key} must be >= 0, got {config[key]}")
    for key in fractions:
        if not 0 <= config[key] < 1:
            die(f"--{key} must be in [0, 1), got {config[key]}")
    for key, allowed in (choices or {}).items():
        if config[key] not in allowed:
            names = ", ".join('"" (empty)' if a == "" else str(a) for a in allowed)
            die(f"--{key} must be one of {names}, got {config[key]!r}")


def check_writable(path, flag):
    """Refuse a folder that cannot be created or written, for whatever reason, leaving nothing behind:
    a trial folder is made (and removed) under its deepest existing parent."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        die(f"{flag} {path}: cannot write under {parent} (a file)")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent))
    except OSError as e:
        die(f"{flag} {path}: cannot write under {parent} ({e.strerror})")


def reducer_tag(reducer, boundaries="gumbel"):
    """The reducer's part of a default run folder name: nothing for DRIP (or none given), _entropy for
    DRIP with --boundaries entropy, else _<reducer>."""
    if reducer in ("", "drip"):
        return "_entropy" if boundaries == "entropy" else ""
    return "_" + reducer


def clip_run_dir(model, compress, reducer, boundaries="gumbel"):
    """train_clip.py's default --out_dir, where train_llava.py looks for its tower by default."""
    return f"out/clip_{model}{reducer_tag(reducer, boundaries)}_c{compress:g}"


def check_boundaries(boundaries, reducer, compress):
    """--boundaries entropy trains DRIP's own predictor: one line if there is none to train."""
    if boundaries == "entropy" and (reducer not in ("", "drip") or compress == 1):
        die("--boundaries entropy trains DRIP's boundary predictor: it needs --compress > 1 and --reducer drip")


def check_file(path, flag, what="file"):
    if path and not os.path.isfile(path):
        die(f"{flag}: no {what} at {path}")


# -----------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)


# collectives wait this long for a rank: rank 0 writing a 7B model's full checkpoint (~100 GB) while the
# others wait in the next collective takes longer than NCCL's default of 10 minutes
DIST_TIMEOUT = datetime.timedelta(minutes=60)


def setup_distributed():
    """Returns (rank, world_size, device). Single process when RANK is not set.

    On GPUs the process group takes NCCL for CUDA tensors and gloo for CPU tensors: FSDP's
    CPU offload reduces CPU shards (gradient clipping) and loads checkpoints on the CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, timeout=DIST_TIMEOUT)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), device


def seed_per_rank(seed):
    """From here on each rank draws its own random numbers (augmentations, dropout masks, mixup),
    the same again with the same seed. Call it once the weights that must be alike on every
    rank are made (FSDP, unlike DDP, does not broadcast rank 0's)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def gather_with_grad(x):
    """B x E on each rank -> world*B x E, rank after rank; each rank's block keeps its gradient."""
    if all_gather_single_autograd is not None:
        return all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
    return torch.cat(torch.distributed.nn.functional.all_gather(x))  # older torch


def mean_over_ranks(value):
    """A tensor's mean over all ranks (the tensor itself in a single process)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def check_shared_folder(path, flag):
    """Under torchrun, stop unless every rank sees what rank 0 writes in `path`: several nodes need
    out_dir and data_dir on a filesystem they share (rank 0 writes data, tokenizers, checkpoints)."""
    if not dist.is_initialized():
        return
    token = [f"{os.getpid()}-{time.time_ns()}"]
    dist.broadcast_object_list(token)
    marker = os.path.join(path, f".shared-check-{token[0]}")
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        open(marker, "w").close()
    dist.barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, os.path.isfile(marker))
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(marker)
    if not all(seen):
        blind = ", ".join(str(r) for r, s in enumerate(seen) if not s)
        die(f"{flag} {path}: rank(s) {blind} do not see what rank 0 writes there; "
            "on several nodes put it on a filesystem every node shares")


def autocast_context(device, dtype, choices=("bfloat16", "float32")):
    """--dtype -> (the dtype name, an autocast context). "auto" is bfloat16 on GPU and float32
    on CPU; float32 runs without autocast."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in choices:
        die(f"--dtype must be auto or one of {', '.join(choices)}, got {dtype!r}")
    return dtype, (torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext())


def all_reduce_sum(values, device):
    """Sum a list of numbers over ranks (a no-op in a single process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def classification_accuracy(batches, classify, device, autocast):
    """Top-1/top-5 accuracy (%), mean boundary rate and mean image tokens out of the tower over
    (images, labels) batches, summed over ranks (each rank passes its own share).
    classify(images) -> (B x C logits, VisionOutput)."""
    top1 = top5 = count = rate = tokens = 0
    for images, labels, *_ in batches:
        images, labels = images.to(device), labels.to(device)
        with autocast:
            logits, vision = classify(images)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices           # B x 5
        top1 += (top[:, 0] == labels).sum().item()
        top5 += (top == labels[:, None]).any(1).sum().item()
        count += len(labels)
        rate += vision.boundary_rate.item() * len(labels)
        tokens += vision.valid.sum().item()
    top1, top5, count, rate, tokens = all_reduce_sum([top1, top5, count, rate, tokens], device)
    if count == 0:
        die("the evaluation data held no readable image")
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "eval_boundary_rate": rate / count,
            "eval_tokens": tokens / count, "eval_images": int(count)}


def cosine_lr(step, total_steps, warmup_steps, lr):
    """Linear warm-up, then cosine decay to zero (open_clip's schedule)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, progress)))


def peak_memory_gb(device):
    """torch.cuda.max_memory_allocated on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class EpochMeter:
    """An epoch's running sums for its record: `add` once a step, `record` at the end of the epoch."""

    def __init__(self):
        self.values, self.steps, self.step_time, self.data_time = {}, 0, 0.0, 0.0

    def add(self, step_time, data_time, **values):
        """One step's wall and data-loading time and its values (0-dim tensors stay on the device: no sync)."""
        self.steps += 1
        self.step_time += step_time
        self.data_time += data_time
        for key, value in values.items():
            self.values[key] = self.values.get(key, 0.0) + (value.detach() if torch.is_tensor(value) else value)

    def record(self, images_per_step, device):
        """Each value's mean over steps and ranks, the step and data time, images/s and peak memory."""
        n, world = max(1, self.steps), dist.get_world_size() if dist.is_initialized() else 1
        totals = all_reduce_sum([float(v) for v in self.values.values()], device)
        return {**{key: total / (n * world) for key, total in zip(self.values, totals)},
                "step_time_s": self.step_time / n, "data_time_s": self.data_time / n,
                "images_per_s": images_per_step * n / max(self.step_time, 1e-9), "peak_memory_gb": peak_memory_gb(device)}


def log_record(record, out_dir, echo=True):
    """On rank 0: a record (an epoch's, or a log line's) as one JSON line in out_dir/metrics.jsonl
    and, with echo, one console line."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    if echo:
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


class Progress:
    """How far a training stage is, how fast it goes and when it will end, for log lines.

    The percentage is of the stage's last step; throughput is measured since the previous
    report; the time left extrapolates the wall time per step since the stage started (or
    resumed), evaluations and data loading included.
    """

    def __init__(self, start_step, end_step, steps_per_epoch, unit="images"):
        self.start, self.end, self.steps_per_epoch, self.unit = start_step, end_step, steps_per_epoch, unit
        self.step, self.items = start_step, 0
        self.t0 = self.t_last = time.perf_counter()

    def plan(self):
        """What will run, for the first line: steps and epochs, and where a resumed run starts."""
        steps = self.end - self.start
        resumed = f"from step {self.start} to {self.end}: " if self.start else ""
        return f"{resumed}{steps} steps = {steps / self.steps_per_epoch:.3g} epochs of {self.steps_per_epoch} steps"

    def advance(self, items):
        """One step done, processing `items` images (or tokens) over all ranks."""
        self.step += 1
        self.items += items

    def report(self):
        """e.g. "12.5% 245 images/s 3m05s left"; the throughput window restarts here."""
        now = time.perf_counter()
        rate = self.items / max(now - self.t_last, 1e-9)
        left = (now - self.t0) / max(1, self.step - self.start) * (self.end - self.step)
        self.items, self.t_last = 0, now
        return f"{100 * self.step / self.end:.1f}% {rate:.0f} {self.unit}/s {format_duration(left)} left"


def format_duration(seconds):
    """3725 -> "1h02m", 185 -> "3m05s", 42 -> "42s"."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


# -----------------------------------------------------------------------------
# Checkpoints and weight files


def load_clip_checkpoint(path, checkpoint=None):
    """A train_clip.py checkpoint -> (CLIP model in eval mode, the checkpoint dict)."""
    if checkpoint is None:
        if not os.path.isfile(path):
            die(f"no checkpoint at {path}")
    try:
        if checkpoint is None:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        model = CLIP(CLIPConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except Exception as e:
        die(f"{path} is not a train_clip.py checkpoint ({type(e).__name__}: {e})")
    return model.eval(), checkpoint


def load_image_tower(path, model_name="tiny", compress=1.0, quick_gelu=False, reducer="drip", flag="--init_from"):
    """The image tower of a train_clip.py checkpoint (built from its own config), or of
    open_clip / OpenAI CLIP weights loaded into make_config(model_name, compress, quick_gelu, reducer).
    Returns (tower, its CLIPConfig)."""
    weights = load_weights_file(path)
    if "model_config" in weights:
        clip = load_clip_checkpoint(path, weights)[0]
        return clip.visual, clip.cfg
    try:
        clip = CLIP(make_config(model_name, compress=compress, quick_gelu=quick_gelu, reducer=reducer))
    except ValueError as e:
        die(str(e))
    try:
        missing, _ = load_clip_weights(clip, weights)
    except ValueError as e:
        die(f"{flag} {path}: {e}; choose the matching model")
    tower_missing = [k for k in missing if k.startswith("visual.")
                     and not k.startswith(("visual.boundary_predictor.", "visual.entropy_model.", "visual.reducer."))]
    if tower_missing:
        die(f"{flag} {path} lacks image tower weights ({tower_missing[0]}, ...)")
    if compress > 1 and reducer not in ("uniform", "tome") and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: the {reducer} layers of {path} are untrained; train the tower with train_clip.py --init_from first")
    return clip.visual, clip.cfg


def load_weights_file(path):
    """A state dict from .pt / .bin (torch) or .safetensors."""
    if not os.path.isfile(path):
        die(f"no weights file at {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        weights = torch.load(path, map_location="cpu", weights_only=False)
        weights = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    except Exception as e:
        die(f"cannot read weights {path} ({type(e).__name__}: {e})")
    if not isinstance(weights, dict):
        die(f"{path} holds a {type(weights).__name__}, not a state dict or checkpoint")
    return weights


def read_resume_checkpoint(path, model_config, flags):
    """The checkpoint at path for --resume; stops if there is none or it holds another model
    configuration (naming the fields that differ and the flags that set them)."""
    if not os.path.isfile(path):
        die(f"--resume: no checkpoint at {path}; run without --resume first, or give its --out_dir")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    saved = CLIPConfig(**checkpoint["model_config"])
    if saved != model_config:
        diff = ", ".join(f"{k}={v} (now {getattr(model_config, k)})" for k, v in asdict(saved).items()
                         if getattr(model_config, k) != v)
        die(f"{path} is a checkpoint of another configuration: {diff}; use the same {flags} or another --out_dir")
    return checkpoint


def restore_checkpoint(checkpoint, model, optimizer):
    """Model, optimizer and this rank's RNG state (when the world size is the same) from a
    checkpoint; returns its step."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(checkpoint["rng"]) == world_size:
        set_rng_state(checkpoint["rng"][rank])
    return checkpoint["step"]


def save_checkpoint(checkpoint, path):
    """Write to a temporary file, then rename: a crash never leaves half a checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def all_rng_states():
    """Every rank's RNG state, indexed by rank (a collective: call it on every rank), so that a
    resumed run draws on each rank as the interrupted one would have."""
    if not dist.is_initialized():
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

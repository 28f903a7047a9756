"""The efficiency table: GFLOPs (fvcore multiply-adds, checked against the analytic count),
and with --bench the measured training-step time and memory, per compression.

    python flops.py --model ViT-B-32 --compress 1 2 4 10
    python flops.py --model tiny --compress 2 4 10 --reducer drip uniform tome dynamicvit tokenlearner group
    python flops.py --model ViT-B-16 --compress 1 4 --bench --batch_size 256 --device cuda
    python flops.py --model tiny --compress 1 4 --bench --batch_size 128          # CPU
    python flops.py --ckpt out/clip_tiny_c4/ckpt.pt --images data/shapes/val/red_cross
    python flops.py --runs out/clip_tiny_c4 out/clip_tiny_tome_c4 --plot accuracy_vs_gflops.png
    python flops.py --model ViT-L-14-336 --compress 1 2 4 10 --llm_model vicuna-7b   # + LLaVA's LLM side

fvcore counts one multiply-add as one flop, as DynamicViT, ToMe and timm tables do. It
has no handle for F.scaled_dot_product_attention, so one is registered here (without
it the whole attention product is silently dropped, as in the seed README's table), and
every op fvcore still skips is printed. For compress > 1 the count uses DynamicViT's
convention: boundaries evenly spaced at exactly the target rate. With --ckpt and
--images the model's own predicted boundaries are counted too, averaged over images.

With --llm_model (a named Llama config) or --llm (a Hugging Face directory's config.json) the
LLaVA cost per image is added: the image tokens the language model reads (the valid
segment tokens of --feature_layer, CLS dropped), the tower up to that layer, the
projector, and the LLM prefill over those image tokens plus --prompt_tokens text tokens
(all analytic; the LLM and projector formulas are checked against fvcore in the tests).
--reducer counts the other ways to shorten the tower, each set to DRIP's analytic MACs
at that compression (ToMe's r and DynamicViT's keep rate are solved and printed), in eval.
"""
import json
import os
import statistics
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

with warnings.catch_warnings():  # fvcore applies torch.jit.script at import, which torch deprecates
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from common import ArgumentParser, die, load_clip_checkpoint
from data import image_files, image_transform, load_image
from llama import LLAMA_CONFIGS, LlamaConfig, llama_config_from_hf
from model import PATCH_WORDS, CLIP, CLIPConfig, even_boundaries, expected_segments, image_tower_macs, make_config
from plots import plot_accuracy_vs_gflops
from reducers import REDUCERS, describe_reducer


def sdpa_macs(inputs, outputs):
    """aten::scaled_dot_product_attention: Q K^T and A V, each B*H*L*S*Dh multiply-adds."""
    q, k = get_shape(inputs[0]), get_shape(inputs[1])  # B x H x L x Dh, B x H x S x Dh
    B, H, L, Dh = q
    return 2 * B * H * L * k[-2] * Dh


class ImageTower(nn.Module):
    """The image tower as a plain tensor -> tensor function for tracing, with fixed or predicted boundaries."""

    def __init__(self, visual, boundaries=None):
        super().__init__()
        self.visual, self.boundaries = visual, boundaries

    def forward(self, images):
        return self.visual(images, sample=False, boundaries=self.boundaries).embedding


class TextTower(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, text):
        return self.clip.encode_text(text)


def fvcore_macs(module, inputs, skipped):
    """Total multiply-adds of module(inputs); ops fvcore has no handle for are added to `skipped`."""
    analysis = FlopCountAnalysis(module.eval(), inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_macs)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with torch.no_grad():
        total = analysis.total()
    skipped.update(analysis.unsupported_ops())
    return total


def text_tower_macs(cfg: CLIPConfig):
    """Analytic multiply-adds of the causal text tower, counting the full L x L attention as fvcore does."""
    L, W = cfg.context_length, cfg.text_width
    return cfg.text_layers * (12 * L * W * W + 2 * L * L * W) + W * cfg.embed_dim


def settings(compresses, reducers):
    """(compress, reducer) pairs: every reducer at each compress > 1; compress 1, the plain ViT, once."""
    return [(c, r) for c in compresses for r in (reducers[:1] if c == 1 else reducers)]


def entropy_training_macs(cfg: CLIPConfig):
    """--boundaries entropy's extra multiply-adds per image in training only: the entropy model's
    causal block on the N patch tokens (counted as a full block, as fvcore counts attention) and
    its head over the 64 patch words. Eval does not run it."""
    N, D = cfg.num_patches, cfg.width
    return N * (4 * D * D + 2 * D * cfg.mlp_dim) + 2 * N * N * D + N * D * PATCH_WORDS


def tower_config(model_name, compress, reducer, pre_layers, predictor="gumbel"):
    """The config of one row: --boundaries (`predictor`) applies to DRIP's rows."""
    return make_config(model_name, compress=compress, reducer=reducer,
                       boundaries=predictor if reducer == "drip" and compress > 1 else "gumbel",
                       **({"pre_layers": pre_layers} if pre_layers else {}))


def reducer_label(cfg: CLIPConfig):
    return "none" if cfg.compress == 1 else "drip-entropy" if cfg.boundaries == "entropy" else cfg.reducer


def flops_rows(model_name, compresses, pre_layers, skipped, reducers=("drip",), predictor="gumbel"):
    """One row per (compress, reducer); compress 1 is the plain ViT, one row whatever the reducer."""
    rows = []
    for compress, reducer in settings(compresses, reducers):
        cfg = tower_config(model_name, compress, reducer, pre_layers, predictor)
        torch.manual_seed(0)
        clip = CLIP(cfg).eval()
        N = cfg.num_patches
        boundaries = even_boundaries(1, N, expected_segments(cfg)) if clip.visual.boundary_predictor is not None else None
        images = torch.randn(1, 3, cfg.image_size, cfg.image_size)
        image = fvcore_macs(ImageTower(clip.visual, boundaries), (images,), skipped)
        if boundaries is not None:  # the trace drops the predictor when its logits go unused: count it alone
            image += fvcore_macs(clip.visual.boundary_predictor, (torch.randn(1, N, cfg.width),), skipped)
        with torch.no_grad():
            tokens = int(clip.visual(images, boundaries=boundaries).valid.sum())
        text = fvcore_macs(TextTower(clip), (torch.ones(1, cfg.context_length, dtype=torch.long),), skipped)
        entropy = entropy_training_macs(cfg) / 1e9 if clip.visual.entropy_model is not None else None
        rows.append({"model": model_name, "compress": compress, "reducer": reducer_label(cfg),
                     "setting": describe_reducer(cfg), "tokens_last_block": tokens, "entropy_training_gflops": entropy,
                     "image_gflops_fvcore": image / 1e9, "image_gflops_analytic": image_tower_macs(cfg) / 1e9,
                     "text_gflops_fvcore": text / 1e9, "text_gflops_analytic": text_tower_macs(cfg) / 1e9,
                     "image_text_gflops": (image + text) / 1e9})
    base = rows[0] if rows[0]["compress"] == 1 else None
    for row in rows:
        row["image_ratio"] = row["image_gflops_fvcore"] / base["image_gflops_fvcore"] if base else None
        row["end_to_end_ceiling"] = base["image_text_gflops"] / row["image_text_gflops"] if base else None
    return rows


def checkpoint_row(ckpt, image_dir, max_images, skipped):
    """fvcore count with the checkpoint's own (eval-rule) boundaries, averaged over real images."""
    clip, checkpoint = load_clip_checkpoint(ckpt)
    cfg = clip.cfg
    transform = image_transform(cfg.image_size)
    files = image_files(image_dir)[:max_images]
    macs, rates = [], []
    for path in files:
        image = transform(load_image(path))[None]
        macs.append(fvcore_macs(ImageTower(clip.visual), (image,), skipped))
        with torch.no_grad():
            rates.append(clip.visual(image).boundary_rate.item())
    return {"checkpoint": ckpt, "compress": cfg.compress, "images": len(files),
            "image_gflops_predicted": statistics.mean(macs) / 1e9, "measured_rate": statistics.mean(rates),
            "target_rate": 1 / cfg.compress, "image_gflops_target_rate": image_tower_macs(cfg) / 1e9}


def runs_rows(run_dirs):
    """The last zero-shot record of train_clip.py runs with their tower's analytic GFLOPs, one row per
    (reducer, compress): top-1 of each run (its seed), their mean, and the other columns averaged."""
    groups = {}
    for run in run_dirs:
        try:
            checkpoint = torch.load(os.path.join(run, "ckpt.pt"), map_location="cpu", weights_only=False)
            with open(os.path.join(run, "metrics.jsonl")) as f:
                last = [json.loads(line) for line in f][-1]
            cfg = CLIPConfig(**checkpoint["model_config"])
        except (OSError, KeyError, IndexError, TypeError, ValueError) as e:
            die(f"--runs: {run} is not a finished train_clip.py run ({type(e).__name__}: {e})")
        key = (reducer_label(cfg) if cfg.compress > 1 else "plain ViT", cfg.compress)
        groups.setdefault(key, []).append({"seed": checkpoint["run_config"].get("seed"), "config": cfg, **last})
    rows = []
    for (reducer, compress), runs in groups.items():
        def mean(key):
            return statistics.mean(r[key] for r in runs)
        rows.append({"reducer": reducer, "compress": compress, "setting": describe_reducer(runs[0]["config"]),
                     "image_gflops_analytic": image_tower_macs(runs[0]["config"]) / 1e9,
                     "zero_shot_top1": mean("zero_shot_top1"), "top1_by_seed": {r["seed"]: r["zero_shot_top1"] for r in runs},
                     "zero_shot_top1_std": statistics.stdev(r["zero_shot_top1"] for r in runs) if len(runs) > 1 else 0.0,
                     "eval_tokens": mean("eval_tokens"), "eval_rate": mean("eval_boundary_rate"),
                     "train_rate": mean("train_boundary_rate"), "step_time_s": mean("step_time_s")})
    order = ("plain ViT",) + REDUCERS + ("drip-entropy",)
    return sorted(rows, key=lambda r: (r["compress"], order.index(r["reducer"])))


# ----------------------------------------------------------------------------- the LLaVA side

def llm_prefill_macs(cfg: LlamaConfig, length):
    """Analytic multiply-adds of `Llama.forward` over `length` tokens (fvcore's "flop").

    Per layer: the q and o projections (H x heads*d each), k and v (H x kv_heads*d each,
    narrower under grouped-query attention), the SwiGLU MLP (three H x I matrices), and
    Q K^T and A V over the full L x L (fvcore's count of a causal SDPA; a causal kernel
    skips about half of it). Then the LM head at every position, as Llama.forward computes.
    Norms, rotary positions and activations are elementwise and not counted.
    """
    H, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.dim_per_head, cfg.num_key_value_heads * cfg.dim_per_head
    layer = length * (2 * H * q + 2 * H * kv + 3 * H * cfg.intermediate_size) + 2 * length * length * q
    return cfg.num_hidden_layers * layer + length * H * cfg.vocab_size


def projector_macs(width, hidden, projector, tokens):
    """LLaVA's projector on `tokens` image tokens: linear (D x H) or mlp2x_gelu (D x H, then H x H)."""
    return tokens * (width * hidden + (hidden * hidden if projector == "mlp2x_gelu" else 0))


def llm_config(name, directory):
    """--llm_model: a named Llama config (model.LLAMA_CONFIGS), or --llm: a Hugging Face directory's config.json."""
    if directory:
        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"--llm {directory} has no config.json; give a Hugging Face Llama directory")
        with open(path) as f:
            return llama_config_from_hf(json.load(f))
    if name not in LLAMA_CONFIGS:
        raise ValueError(f"unknown --llm_model {name!r}; choose one of {', '.join(LLAMA_CONFIGS)}, or give --llm DIR")
    return LLAMA_CONFIGS[name]


def llava_rows(model_name, compresses, pre_layers, llm, llm_name, prompt_tokens, projector, feature_layer):
    """Per image, for each compression: image tokens into the LLM and the analytic multiply-adds of
    the tower up to `feature_layer`, the projector and the LLM prefill of prompt_tokens + image tokens."""
    rows = []
    for compress in compresses:
        cfg = make_config(model_name, compress=compress, **({"pre_layers": pre_layers} if pre_layers else {}))
        tokens = cfg.num_patches if compress == 1 else expected_segments(cfg)  # the target rate, as in the tower table
        blocks = range(cfg.layers)[feature_layer] + 1                 # LLaVA stops the tower at its feature layer
        tower = image_tower_macs(replace(cfg, layers=blocks), tokens) - cfg.width * cfg.embed_dim  # no ln_post / proj
        rows.append({"model": model_name, "image_size": cfg.image_size, "compress": compress, "llm": llm_name,
                     "image_tokens": tokens, "prompt_tokens": prompt_tokens,
                     "tower_gflops": tower / 1e9,
                     "projector_gflops": projector_macs(cfg.width, llm.hidden_size, projector, tokens) / 1e9,
                     "llm_prefill_gflops": llm_prefill_macs(llm, prompt_tokens + tokens) / 1e9})
        rows[-1]["total_gflops"] = rows[-1]["tower_gflops"] + rows[-1]["projector_gflops"] + rows[-1]["llm_prefill_gflops"]
    base = rows[0] if rows[0]["compress"] == 1 else None
    for row in rows:
        row["llm_ratio"] = row["llm_prefill_gflops"] / base["llm_prefill_gflops"] if base else None
        row["total_ratio"] = row["total_gflops"] / base["total_gflops"] if base else None
    return rows


# ----------------------------------------------------------------------------- benchmark

def timed(fns, steps, device):
    """Median seconds of each function in `fns`, called in turn `steps` times (CUDA events on GPU).

    Interleaving the calls shares out whatever else the machine is doing, so ratios
    between the functions hold even where absolute times are noisy.
    """
    times = [[] for _ in fns]
    for _ in range(steps):
        for fn, record in zip(fns, times):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                record.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                record.append(time.perf_counter() - t0)
    return [statistics.median(record) for record in times]


def bench_row(model_name, compress, pre_layers, tower, batch_size, device, use_compile, steps, warmup, reducer="drip",
              predictor="gumbel"):
    """Training-step time (forward, backward, AdamW step), inference throughput and memory for one compression.

    For compress > 1 the same model is also timed with its ceiling, boundaries fixed evenly at
    exactly round(N / compress): every image has the same length and nothing is padded, the
    speed of a fixed cut of the same length. The two alternate step by step. Other reducers
    are timed alone.
    """
    cfg = tower_config(model_name, compress, reducer, pre_layers, predictor)
    torch.manual_seed(0)
    model = CLIP(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    # compile the module that is stepped: model.visual of a compiled CLIP would be the eager tower
    step_model = model if tower == "clip" else model.visual
    step_model = torch.compile(step_model) if use_compile else step_model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    text = torch.randint(1, cfg.vocab_size, (batch_size, cfg.context_length), device=device)
    labels = torch.arange(batch_size, device=device)
    drip = model.visual.boundary_predictor is not None
    even = even_boundaries(batch_size, cfg.num_patches, expected_segments(cfg), device) if drip else None
    saved_bytes = [0]

    def count_saved(t):
        saved_bytes[0] += t.numel() * t.element_size()
        return t

    def train_step(boundaries=None, measure_activations=False):
        hooks = torch.autograd.graph.saved_tensors_hooks(count_saved, lambda t: t) if measure_activations else nullcontext()
        with autocast, hooks:
            if tower == "clip":
                image_features, text_features, logit_scale, vision = step_model(images, text, boundaries=boundaries)
                logits = logit_scale * image_features.float() @ text_features.float().t()
                loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
            else:
                vision = step_model(images, boundaries=boundaries)
                loss = vision.embedding.float().pow(2).mean()
            loss = loss + vision.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step(boundaries=None):
        with autocast, torch.no_grad():
            (step_model.visual if tower == "clip" else step_model)(images, boundaries=boundaries)

    variants = [None] if even is None else [None, even]  # predicted boundaries, then the ceiling's
    for _ in range(warmup):
        for boundaries in variants:
            train_step(boundaries)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    train_step(measure_activations=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    step_s = timed([lambda b=b: train_step(b) for b in variants], steps, device)

    # tokens the blocks after pooling compute (rows of their input) against the real ones
    computed = []
    hook = model.visual.transformer.resblocks[cfg.pre_layers].register_forward_pre_hook(
        lambda module, args: computed.append(args[0].shape[:-1].numel()))
    with autocast, torch.no_grad():
        vision = model.visual(images, sample=True)
    hook.remove()
    real_token_fraction = (vision.valid.sum().item() + batch_size) / computed[0] if drip else 1.0

    model.eval()
    for _ in range(warmup):
        for boundaries in variants:
            infer_step(boundaries)
    infer_s = timed([lambda b=b: infer_step(b) for b in variants], steps, device)
    row = {"model": model_name, "compress": compress, "reducer": reducer_label(cfg), "tower": tower, "batch_size": batch_size, "device": str(device),
           "step_ms": 1000 * step_s[0], "images_per_s": batch_size / step_s[0], "infer_images_per_s": batch_size / infer_s[0],
           "peak_memory_gib": peak, "saved_activations_gib": saved_bytes[0] / 2**30,
           "real_token_fraction": real_token_fraction}
    if even is not None:
        row |= {"ceiling_step_ms": 1000 * step_s[1], "ceiling_infer_images_per_s": batch_size / infer_s[1],
                "of_ceiling": step_s[1] / step_s[0]}
    return row


def bench_rows(args, device):
    rows = [bench_row(args.model, c, args.pre_layers, args.tower, args.batch_size, device, args.compile,
                      args.steps, args.warmup, reducer, args.boundaries)
            for c, reducer in settings(args.compress, args.reducer)]
    base = rows[0] if rows[0]["compress"] == 1 else None
    memory = "peak_memory_gib" if device.type == "cuda" else "saved_activations_gib"
    for row in rows:
        row["speedup"] = base["step_ms"] / row["step_ms"] if base else None
        row["memory_ratio"] = row[memory] / base[memory] if base else None
    return rows


def parse_args():
    """The command line, every flag checked before any work."""
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="a named CLIP config: tiny, ViT-B-32, ViT-B-16, ViT-L-14, "
                        "ViT-L-14-336")
    parser.add_argument("--compress", type=float, nargs="+", default=[1, 2, 4, 10], help="compressions, 1 = plain ViT")
    parser.add_argument("--pre_layers", type=int, default=0, help="0 = the model's default")
    parser.add_argument("--reducer", nargs="+", default=["drip"], choices=REDUCERS,
                        help="ways to shorten the tower, each at DRIP's analytic MACs")
    parser.add_argument("--boundaries", choices=["gumbel", "entropy"], default="gumbel",
                        help="DRIP's predictor: gumbel, or entropy (its entropy model's training-only cost said apart)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--ckpt", help="a train_clip.py checkpoint: also count with its predicted boundaries")
    parser.add_argument("--runs", nargs="+", help="instead: finished train_clip.py run folders, accuracy against GFLOPs")
    parser.add_argument("--plot", help="with --runs: a PNG of top-1 against analytic image-tower GFLOPs, a line per reducer")
    parser.add_argument("--images", help="folder of images for --ckpt")
    parser.add_argument("--max_images", type=int, default=50, help="images of --images counted with --ckpt")
    parser.add_argument("--llm_model", help="LLaVA's language model, a named Llama config (e.g. vicuna-7b): "
                        "adds the LLaVA cost per image")
    parser.add_argument("--llm", help="... or a Hugging Face Llama directory (its config.json)")
    parser.add_argument("--prompt_tokens", type=int, default=64, help="text tokens of the prompt besides the image: "
                        "Vicuna's system prompt (~32), a short question and LLaVA-1.5's answer-format line")
    parser.add_argument("--projector", choices=["mlp2x_gelu", "linear"], default="mlp2x_gelu", help="LLaVA's projector")
    parser.add_argument("--feature_layer", type=int, default=-2, help="the block LLaVA reads image tokens from")
    parser.add_argument("--bench", action="store_true", help="also time training steps and measure memory")
    parser.add_argument("--tower", choices=["image", "clip"], default="image",
                        help="--bench times the image tower, or the CLIP step (image and text tower)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per --bench step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where --bench runs")
    parser.add_argument("--compile", action="store_true", help="--bench with torch.compile")
    parser.add_argument("--steps", type=int, default=20, help="timed --bench steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first: on GPU each new padded length "
                        "builds a cuDNN attention plan once, which a long run pays only at its start")
    args = parser.parse_args()
    # every flag checked before any work
    if any(not c >= 1 for c in args.compress):
        die("--compress values must be >= 1 (1 = plain ViT)")
    for flag, value, least in (("--pre_layers", args.pre_layers, 0), ("--max_images", args.max_images, 1),
                               ("--prompt_tokens", args.prompt_tokens, 0), ("--batch_size", args.batch_size, 1),
                               ("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            die(f"{flag} must be >= {least}, got {value}")
    if bool(args.ckpt) != bool(args.images):
        die("--ckpt and --images go together")
    if args.ckpt and not os.path.isfile(args.ckpt):
        die(f"--ckpt: no checkpoint at {args.ckpt}")
    if args.images and not os.path.isdir(args.images):
        die(f"--images {args.images} is not a folder")
    if args.images and not image_files(args.images):
        die(f"no .jpg/.jpeg/.png/.webp images in {args.images}")
    try:
        for c in args.compress:
            cfg = make_config(args.model, compress=c, **({"pre_layers": args.pre_layers} if args.pre_layers else {}))
        llm = llm_config(args.llm_model, args.llm) if args.llm_model or args.llm else None
    except ValueError as e:
        die(str(e))
    if not -cfg.layers <= args.feature_layer < cfg.layers:
        die(f"--feature_layer must index one of the tower's {cfg.layers} blocks, got {args.feature_layer}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        die(f"--device {args.device} is not a device; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        die("--device cuda, but no GPU is visible")
    return args, device, llm


def print_runs(args):
    """--runs: accuracy against GFLOPs of finished runs, a table (or JSON) and the plot."""
    rows = runs_rows(args.runs)
    if args.plot:
        lines = {}
        for r in rows:
            lines.setdefault(r["reducer"], []).append((r["image_gflops_analytic"], r["zero_shot_top1"], f"{r['compress']:g}x",
                                                       r["zero_shot_top1_std"]))
        plot_accuracy_vs_gflops(lines, args.plot, title="zero-shot top-1 against image-tower compute",
                                accuracy_label="zero-shot top-1 (%, mean and std over seeds)",
                                gflops_label="image-tower GFLOPs (analytic multiply-adds)")
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return
    print(f"{'reducer':>12} {'compress':>8} {'GFLOPs':>8} {'top-1 mean':>10} {'std':>5} {'by seed':>16} {'tokens':>6} "
          f"{'eval rate':>9} {'train rate':>10} {'step s':>7}")
    for r in rows:
        seeds = " ".join(f"{v:.2f}" for _, v in sorted(r["top1_by_seed"].items(), key=str))
        print(f"{r['reducer']:>12} {r['compress']:>8g} {r['image_gflops_analytic']:>8.4f} {r['zero_shot_top1']:>10.2f} "
              f"{r['zero_shot_top1_std']:>5.2f} {seeds:>16} {r['eval_tokens']:>6.2f} {r['eval_rate']:>9.3f} "
              f"{r['train_rate']:>10.3f} {r['step_time_s']:>7.3f}")


def main():
    args, device, llm = parse_args()
    if args.runs:
        return print_runs(args)
    skipped = Counter()
    result = {"flops": flops_rows(args.model, args.compress, args.pre_layers, skipped, args.reducer, args.boundaries)}
    if args.ckpt:
        result["checkpoint"] = checkpoint_row(args.ckpt, args.images, args.max_images, skipped)
    if llm:
        result["llava"] = llava_rows(args.model, args.compress, args.pre_layers, llm, args.llm or args.llm_model,
                                     args.prompt_tokens, args.projector, args.feature_layer)
    if args.bench:
        result["bench"] = bench_rows(args, device)
    result["fvcore_skipped_ops"] = dict(skipped)

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result, args, skipped)


def print_tables(result, args, skipped):
    """The tables of main's result: FLOPs, the checkpoint's count, the LLaVA side, the benchmark."""
    print(f"{'model':12} {'compress':>8} {'reducer':>12} {'tokens':>6} {'image GFLOPs':>12} {'analytic':>9} {'ratio':>6} "
          f"{'text':>6} {'image+text':>10} {'end-to-end ceiling':>18}")
    for r in result["flops"]:
        ratio = f"{r['image_ratio']:.2f}" if r["image_ratio"] else "-"
        ceiling = f"{r['end_to_end_ceiling']:.2f}x" if r["end_to_end_ceiling"] else "-"
        print(f"{r['model']:12} {r['compress']:>8g} {r['reducer']:>12} {r['tokens_last_block']:>6} "
              f"{r['image_gflops_fvcore']:>12.4f} {r['image_gflops_analytic']:>9.4f} {ratio:>6} "
              f"{r['text_gflops_fvcore']:>6.2f} {r['image_text_gflops']:>10.2f} {ceiling:>18}")
    print("\n".join(["", "tokens: the image's tokens after pooling (out of the last block, in eval); GFLOPs: fvcore's "
                          "multiply-adds,", "analytic: the formula's; image+text: one image and one caption (a CLIP pair); "
                          "end-to-end ceiling: compress 1's", "image+text / this row's, the speed-up if time followed "
                          "GFLOPs"]
                    + [r["setting"] for r in result["flops"] if r["reducer"] in ("tome", "dynamicvit")]
                    + [f"drip-entropy at {r['compress']:g}x: eval as above; training adds {r['entropy_training_gflops']:.4f} "
                       "GFLOPs an image (the entropy model)" for r in result["flops"] if r["entropy_training_gflops"]]))
    if args.ckpt:
        c = result["checkpoint"]
        print(f"\n{c['checkpoint']} over {c['images']} images: {c['image_gflops_predicted']:.3f} GFLOPs with predicted "
              f"boundaries (rate {c['measured_rate']:.3f}, target {c['target_rate']:.3f}; "
              f"{c['image_gflops_target_rate']:.3f} at the target rate)")
    if "llava" in result:
        r0 = result["llava"][0]
        print(f"\nLLaVA per image: {args.model} at {r0['image_size']} px, features of block {args.feature_layer}, "
              f"{args.projector} projector, {r0['llm']} prefill of {args.prompt_tokens} text tokens + the image tokens")
        print(f"{'compress':>8} {'image tokens':>12} {'tower':>7} {'projector':>9} {'LLM prefill':>11} {'ratio':>6} "
              f"{'total':>8} {'ratio':>6}  (GFLOPs)")
        for r in result["llava"]:
            llm_ratio = f"{r['llm_ratio']:.2f}" if r["llm_ratio"] else "-"
            total_ratio = f"{r['total_ratio']:.2f}" if r["total_ratio"] else "-"
            print(f"{r['compress']:>8g} {r['image_tokens']:>12} {r['tower_gflops']:>7.1f} {r['projector_gflops']:>9.1f} "
                  f"{r['llm_prefill_gflops']:>11.1f} {llm_ratio:>6} {r['total_gflops']:>8.1f} {total_ratio:>6}")
    if args.bench:
        memory = "peak GiB" if args.device.startswith("cuda") else "saved-activation GiB"
        print(f"\n{args.tower} tower training step, batch {args.batch_size}, {args.device}, "
              f"torch {torch.__version__}{', compiled' if args.compile else ''}")
        print(f"{'compress':>8} {'reducer':>12} {'step ms':>8} {'images/s':>9} {'speed-up':>8} {'of ceiling':>10} {memory:>20} "
              f"{'ratio':>6} {'real tokens':>11} {'inference images/s':>18}")
        for r in result["bench"]:
            m = r["peak_memory_gib"] if r["peak_memory_gib"] is not None else r["saved_activations_gib"]
            of_ceiling = f"{r['of_ceiling']:.2f}" if "of_ceiling" in r else "-"
            speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"  # no compress 1 row to compare with: "-"
            ratio = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] else "-"
            print(f"{r['compress']:>8g} {r['reducer']:>12} {r['step_ms']:>8.1f} {r['images_per_s']:>9.1f} {speedup:>8} "
                  f"{of_ceiling:>10} {m:>20.3f} {ratio:>6} {r['real_token_fraction']:>11.1%} "
                  f"{r['infer_images_per_s']:>18.1f}")
            if "ceiling_step_ms" in r:
                print(f"{'ceiling':>8} {'':>12} {r['ceiling_step_ms']:>8.1f} {args.batch_size * 1000 / r['ceiling_step_ms']:>9.1f} "
                      f"{'':>8} {'':>10} {'':>20} {'':>6} {'':>11} {r['ceiling_infer_images_per_s']:>18.1f}")
        print("ceiling: the same model with boundaries fixed evenly at round(N / compress), nothing padded; "
              "of ceiling = its step time / this row's")
    if skipped:  # as fvcore, DynamicViT and ToMe count: elementwise ops are O(N D), a block's matmuls O(N D^2)
        print(f"\nnot counted, as in fvcore's and the papers' tables: {sum(skipped.values())} elementwise and indexing "
              f"ops ({', '.join(op.removeprefix('aten::') for op, _ in skipped.most_common(4))}, ...; all in --json),\n"
              "a few operations per token feature each, against a block's 12 x width multiply-adds per feature")


if __name__ == "__main__":
    main()

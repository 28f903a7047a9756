"""LLaVA visual instruction tuning with a DRIP (or plain) CLIP image tower.

    python train_clip.py --compress 4 && python train_llava.py --compress 4   # built-in data, CPU, minutes
    python sample_llava.py --out_dir out/llava_c4 --image img.jpg --prompt "What colour is the shape?"
    torchrun --nproc_per_node=8 train_llava.py --stage 1 --init_from out/clip_ViT-B-16_c4/ckpt.pt \\
        --llm vicuna-7b-v1.5/ --pretrain_data blip_laion_cc_sbu_558k.json --image_folder LLaVA-Pretrain/images \\
        --fsdp --grad_checkpointing
    torchrun --nproc_per_node=8 train_llava.py --stage 2 --init_from ... --llm vicuna-7b-v1.5/ \\
        --instruct_data llava_v1_5_mix665k.json --image_folder playground/data --batch_size 16 \\
        --fsdp --grad_checkpointing [--lora_r 128 --lora_alpha 256]

Stage 1 trains only the projector on image-caption pairs (tower and LLM frozen, lr 1e-3);
stage 2 trains the projector and the LLM (lr 2e-5), or LoRA adapters on the LLM with
--lora_r, on conversations. The image tower is always frozen and runs under no_grad. Each
`<image>` placeholder becomes that image's valid DRIP tokens only, so at --compress 4 the
LLM reads about a quarter of the image tokens of the plain tower. A tower trained with
another `train_clip.py --reducer` (uniform, tome, dynamicvit, tokenlearner, group) gives
its own tokens the same way; --reducer picks its default checkpoint.

Under torchrun the model is replicated with DDP, or with --fsdp sharded with FSDP2 (one
unit per decoder layer plus the root; the frozen tower stays whole on every rank), which
a 7B LLM needs on 80 GB cards. --grad_accum N accumulates N micro-batches per step.

Data is LLaVA's JSON: [{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}], image paths relative to
--image_folder, Vicuna-v1's template, loss on the assistant's answers only.

Without data arguments a shapes conversation set is written to data/shapes_llava
(captions for stage 1; questions about colour, shape and position for stage 2; held-out
questions for the exact-match evaluation), and without --llm a tiny Llama and its
sentencepiece tokenizer are first trained on that set's text ("stage 0", standing in for
a pretrained LLM). --stage all (the default) runs every stage that is needed in order.
Each stage reports loss, image tokens per sample, step time, tokens/s and peak memory per
epoch (drawn at the end as out_dir/curves.png by plots.py; log lines show the percentage
of the stage done, tokens/s and the time left), writes out_dir/stage<N>/ckpt.pt
atomically, and continues from it with --resume.
"""
import inspect
import json
import os
import random
import shutil
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common import (Progress, all_reduce_sum, all_rng_states, autocast_context, check_file, check_options,
                    check_shared_folder, check_writable, clip_run_dir, cosine_lr, die, load_image_tower, log_record,
                    parse_overrides, peak_memory_gb, reducer_tag, save_checkpoint, seed_per_rank, set_rng_state,
                    setup_distributed)
from data import CAPTION_TEMPLATES, CLASSES, VAL_SEED_OFFSET, image_transform, load_image, make_shape_image
from text import (SYSTEM, TextTokenizer, answer_questions, exact_match, load_llama, save_llama, tokenize_conversation,
                  train_sentencepiece)
from llama import LLAMA_CONFIGS, Llama, LoRALinear, add_lora, merge_lora
from model import CONFIGS, IGNORE, LLaVA
from plots import plot_curves
from reducers import REDUCERS

_before = set(globals())  # what the defaults block below adds are the script's options
# -----------------------------------------------------------------------------
# defaults (the built-in data, a tiny LLM trained here: a few minutes on a 2-core CPU)
stage = "all"               # all (stage 0 if there is no --llm, then 1, then 2) | 0 | 1 | 2
init_from = ""              # the image tower: a train_clip.py checkpoint, or open_clip weights with --model; empty = train_clip.py's default out_dir
model = "tiny"              # the CLIP config open_clip weights fit, e.g. ViT-L-14-336 (LLaVA-1.5's); a train_clip.py checkpoint brings its own
compress = 0.0              # DRIP compression of the tower; 0 = the checkpoint's (1 for the default tower and open_clip weights)
reducer = ""                # the tower's reducer (drip | uniform | tome | dynamicvit | tokenlearner | group); empty = the checkpoint's (drip by default)
quick_gelu = False          # with OpenAI's CLIP weights
feature_layer = -2          # image tokens from this block (penultimate, LLaVA's choice), CLS dropped
projector = "mlp2x_gelu"    # mlp2x_gelu | linear
llm = ""                    # Hugging Face Llama directory; empty = out_dir/llm, trained in stage 0
llm_model = "tiny"          # config of the LLM trained in stage 0
pretrain_data = ""          # stage 1 JSON (captions); empty = built-in shapes
instruct_data = ""          # stage 2 JSON (conversations); empty = built-in shapes
eval_data = ""              # JSON whose first answer is compared with the greedy answer; empty = built-in held-out set
image_folder = ""           # image paths in the JSON are relative to it; empty = the built-in data's folder
data_dir = "data"           # where the built-in data is written
out_dir = ""                # empty = out/llava_c<the tower's compression>
steps_stage0 = 200          # text pretraining of the tiny LLM
lr_stage0 = 2e-3
epochs_stage1 = 1
lr_stage1 = 1e-3
epochs_stage2 = 1
lr_stage2 = 0.0             # 0 = LLaVA-1.5's 2e-5 (2e-4 with LoRA) for a pretrained --llm; 1e-3 for the tiny LLM of stage 0
lora_r = 0                  # > 0: stage 2 trains LoRA adapters (and the projector) instead of the whole LLM
lora_alpha = 16.0
lora_dropout = 0.05
batch_size = 32             # per rank, per micro-batch
grad_accum = 1              # micro-batches per optimizer step (gradients sync on the last one only); global batch = batch_size x grad_accum x ranks
max_length = 0              # context in tokens, image tokens included; 0 = the LLM's max_position_embeddings
warmup_ratio = 0.03
weight_decay = 0.0
grad_clip = 1.0
workers = 1
seed = 0
dtype = "auto"              # auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float16 | float32
grad_checkpointing = False
fsdp = False                # shard the LLM and projector across ranks with FSDP2 (torch >= 2.7) instead of DDP: for LLMs whose full copy per GPU does not fit
cpu_offload = False         # with --fsdp: sharded parameters, gradients and optimizer states live in host memory
log_every = 20
checkpoint_every = 200      # steps
resume = False
max_steps = 0               # per stage; 0 = all epochs (for tests and smoke runs)
eval_samples = 0            # 0 = all of eval_data
max_new_tokens = 32         # longest greedy answer in the evaluation
config = parse_overrides(globals(), _before)
globals().update(config)
# -----------------------------------------------------------------------------


# ----------------------------------------------------------------------------- LLaVA's JSON

def read_conversations(path):
    """LLaVA's JSON, every entry checked; a bad one stops the run with its id."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        die(f"cannot read {path} ({e}); give a LLaVA-format JSON list")
    if not isinstance(entries, list):
        die(f"{path} must hold a JSON list of conversations")
    for n, entry in enumerate(entries):
        name = f"{path}: entry {entry.get('id', n)!r}" if isinstance(entry, dict) else f"{path}: entry {n}"
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not turns or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            die(f"{name} has no list of {{'from', 'value'}} conversations")
        if any(t.get("from") != ("human" if i % 2 == 0 else "gpt") for i, t in enumerate(turns)):
            die(f"{name}: turns must alternate human, gpt, human, ... starting with human")
        placeholders = sum(t["value"].count("<image>") for t in turns)
        if "image" in entry and placeholders == 0:
            die(f"{name} has an image but no <image> in its conversation; put '<image>\\n' before its first question")
        if "image" not in entry and placeholders:
            die(f"{name} has <image> in its conversation but no \"image\" file")
        if placeholders > 1:
            die(f"{name} has {placeholders} <image> placeholders; one image per conversation is supported")
    return entries


class Conversations(Dataset):
    """(image or None, ids, labels) per entry; None for an entry whose image cannot be read.

    language_model=True (stage 0) drops the images and puts the loss on every token.
    """

    def __init__(self, entries, folder, tok, image_size, language_model=False):
        self.entries, self.folder, self.tok, self.language_model = entries, folder, tok, language_model
        self.transform = image_transform(image_size)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        entry = self.entries[i]
        if self.language_model:
            turns = [dict(t, value=t["value"].replace("<image>\n", "").replace("<image>", "")) for t in entry["conversations"]]
            ids, _ = tokenize_conversation(self.tok, turns)
            return None, ids, torch.cat([torch.tensor([IGNORE]), ids[1:]])
        ids, labels = tokenize_conversation(self.tok, entry["conversations"])
        if "image" not in entry:
            return None, ids, labels
        path = os.path.join(self.folder, entry["image"])
        try:
            return self.transform(load_image(path)), ids, labels
        except OSError as e:
            print(f"warning: skipping {entry.get('id', i)}: cannot read {path} ({type(e).__name__})", flush=True)
            return None  # counted as skipped by collate


def collate(batch):
    samples = [s for s in batch if s is not None]
    if not samples:
        die("no sample of a whole batch could be read; check --image_folder")
    images = [s[0] for s in samples if s[0] is not None]
    return (torch.stack(images) if images else None, [s[0] is not None for s in samples],
            [s[1] for s in samples], [s[2] for s in samples], len(batch) - len(samples))


# ----------------------------------------------------------------------------- the built-in shapes conversations

COLOUR_QUESTIONS = ["What colour is the shape?", "Which colour does the object have?", "What is the colour of the shape?"]
SHAPE_QUESTIONS = ["What shape is it?", "Which shape is in the picture?", "What kind of shape is shown?"]
PLACE_QUESTIONS = ["Where is the shape?", "Where in the picture is the object?"]
CAPTION_PROMPTS = ["Describe the image briefly.", "Give a short caption of the picture.", "What does the image show?"]


def questions(words):
    return [("colour", COLOUR_QUESTIONS, f"The shape is {words['colour']}."),
            ("shape", SHAPE_QUESTIONS, f"It is a {words['shape']}."),
            ("place", PLACE_QUESTIONS, f"It is in the {words['place']} of the picture.")]


def write_shapes_conversations(root, size, train_images=6000, val_images=300, seed=0):
    """root/images/{train,val}/*.jpg and LLaVA JSONs: pretrain.json (one caption per image),
    instruct.json (colour, shape and place questions in random order), val.json (one
    question of each kind per held-out image, with a "kind" field). Written to root.tmp,
    then renamed."""
    if os.path.exists(os.path.join(root, "info.json")):
        return
    print(f"writing the built-in LLaVA data to {root} ({train_images} training and {val_images} held-out images, "
          f"{size} px; once)", flush=True)
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pretrain, instruct, val = [], [], []
    for split, count, split_seed in (("train", train_images, seed), ("val", val_images, seed + VAL_SEED_OFFSET)):
        rng = random.Random(split_seed)
        os.makedirs(os.path.join(tmp, "images", split))
        for i in range(count):
            image, words = make_shape_image(rng, rng.randrange(len(CLASSES)), size)
            name = f"images/{split}/{i:05d}.jpg"
            image.save(os.path.join(tmp, name), quality=90)
            if split == "val":
                val += [{"id": f"val_{i:05d}_{kind}", "image": name, "kind": kind, "conversations": [
                    {"from": "human", "value": "<image>\n" + asked[0]}, {"from": "gpt", "value": answer}]}
                    for kind, asked, answer in questions(words)]
                continue
            caption = rng.choice(CAPTION_TEMPLATES).format(**words)
            pretrain.append({"id": f"train_{i:05d}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
                {"from": "gpt", "value": caption[0].upper() + caption[1:]}]})
            turns = []
            for kind, asked, answer in rng.sample(questions(words), 3):
                turns += [{"from": "human", "value": rng.choice(asked)}, {"from": "gpt", "value": answer}]
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
            instruct.append({"id": f"train_{i:05d}", "image": name, "conversations": turns})
    for name, entries in (("pretrain.json", pretrain), ("instruct.json", instruct), ("val.json", val)):
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(entries, f)
    with open(os.path.join(tmp, "info.json"), "w") as f:
        json.dump({"size": size, "train_images": train_images, "val_images": val_images, "seed": seed}, f)
    os.replace(tmp, root)


# ----------------------------------------------------------------------------- model set-up

def build_model(llm_path, lora):
    """LLaVA around the frozen image tower (loaded once at set-up) and the LLM at llm_path. Under
    --fsdp the LLM stays in the dtype it is stored in until shard() takes it layer by layer."""
    torch.manual_seed(seed)  # the same projector and adapters on every rank, whichever stages ran before
    language_model, tok = load_llama(llm_path, dtype=None if fsdp else torch.float32)
    if lora:
        add_lora(language_model, *lora)
    llava = LLaVA(visual, language_model, projector, feature_layer)
    seed_per_rank(seed)  # then each rank its own LoRA dropout masks
    return llava, tok


def shard(llava):
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm, head, projector).
    The frozen image tower stays out, whole on every rank. Each rank keeps its 1/N of every
    parameter in fp32 (the optimizer's master weights); a unit's full weights are gathered in
    --dtype for its forward and backward only, and gradients are reduced in fp32."""
    policy = dict(mp_policy=MixedPrecisionPolicy(param_dtype=None if dtype == "float32" else getattr(torch, dtype),
                                                 reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy())
    llava.visual.to(device)
    for layer in llava.llm.layers:
        fully_shard(layer.float(), **policy)  # one layer at a time in fp32: never a whole fp32 copy of the LLM
    fully_shard(llava.float(), ignored_params=set(llava.visual.parameters()), **policy)
    return llava


def parallel(llava):
    """The module that training steps call: sharded in place under --fsdp, wrapped in DDP under
    torchrun, itself in a single process. The trainable parameters are set before this."""
    if fsdp:
        return shard(llava)
    llava.to(device)
    return DDP(llava, device_ids=[device.index] if device.type == "cuda" else None) if dist.is_initialized() else llava


def shard_bytes(llava):
    """(bytes of the sharded parameters in full, bytes this rank holds of them): the storage under
    each rank's local shards, measured, padding included."""
    sharded = [p for p in llava.parameters() if isinstance(p, DTensor)]
    storages = {p.to_local().untyped_storage().data_ptr(): p.to_local().untyped_storage().nbytes() for p in sharded}
    return sum(p.numel() * p.element_size() for p in sharded), sum(storages.values())


@contextmanager
def unsharded(llava):
    """Under --fsdp, every unit's full weights on every rank while the block runs: generation takes
    as many forward passes as its answers need, a number that differs between ranks, so the
    passes cannot each gather the weights collectively. A no-op otherwise."""
    units = [m for m in llava.modules() if isinstance(m, FSDPModule)] if fsdp else []
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not llava, recurse=False)  # FSDP2's defaults: the root keeps its weights


def write_llm_directory(llava, lora, tok, path):
    """The trained LLM as a Hugging Face directory (LoRA merged), gathered on rank 0 (a collective)."""
    state = get_model_state_dict(llava, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if master:
        with torch.device("meta"):
            llm = Llama(llava.llm.cfg)
        if lora:
            add_lora(llm, *lora)
        llm.load_state_dict({k.removeprefix("llm."): v for k, v in state.items() if k.startswith("llm.")}, assign=True)
        save_llama(merge_lora(llm) if lora else llm, tok.path, path)
        print(f"the LLM{' with LoRA merged' if lora else ''} written to {path}", flush=True)


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, tok, entries, folder, path):
    """Exact match of the greedy answer to each entry's first question with its first answer,
    overall and per "kind" (text.exact_match); each rank answers every world_size-th entry.
    Every question with its answer goes to `path` (JSON lines), for reading what it got wrong."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = entries[:eval_samples or None][rank::world]
    answered = []
    model.eval()
    with unsharded(model):
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            asked = [(e["conversations"][0]["value"].replace("<image>", "").strip(), e.get("image")) for e in batch]
            answered += zip(batch, answer_questions(model, tok, asked, folder, device, autocast, max_new_tokens))
    model.train()
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, answered)
        answered = [a for part in parts for a in part]
    entries, answers = [e for e, _ in answered], [a for _, a in answered]
    expected = [e["conversations"][1]["value"] for e in entries]
    if master:
        with open(path + ".tmp", "w") as f:
            for entry, answer, right in zip(entries, answers, expected):
                f.write(json.dumps({"id": entry.get("id"), "kind": entry.get("kind"), "answer": answer, "expected": right,
                                    "question": entry["conversations"][0]["value"]}) + "\n")
        os.replace(path + ".tmp", path)
    return exact_match(answers, expected, [e.get("kind") for e in entries])


# ----------------------------------------------------------------------------- one training stage

def optimizer_step(model, step_model, optimizer, scaler, params, batches, context, sums):
    """One optimizer step over grad_accum micro-batches; returns this rank's mean loss, its LLM tokens and
    the last micro-batch's output. Counts go into `sums`."""
    loss_sum, supervised, tokens = 0.0, 0, 0
    for micro in range(grad_accum):
        images, has_image, ids, labels, skipped = next(batches)
        last = micro == grad_accum - 1
        if fsdp:
            model.set_requires_gradient_sync(last)
        with step_model.no_sync() if isinstance(step_model, DDP) and not last else nullcontext():
            with autocast:
                out = step_model([x.to(device) for x in ids], [y.to(device) for y in labels],
                                 images.to(device) if images is not None else None, has_image, context)
                logits = out.logits[:, :-1].float()                        # B x L-1 x vocab: predict token t+1
                targets = out.labels[:, 1:]                                 # B x L-1
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                       reduction="sum")
            scaler.scale(loss).backward()
        loss_sum += loss.item()
        supervised += int((targets != IGNORE).sum())
        sums["image_tokens"] += int(out.image_tokens.sum())
        sums["samples"] += len(ids)
        tokens += int(out.lengths.sum())
        sums["skipped"] += skipped
        sums["truncated"] += out.truncated
    # summed losses -> the mean over the step's supervised tokens on all ranks (DDP and FSDP average over
    # ranks); a step whose answers were all truncated away keeps zero gradients, not NaN
    all_supervised = all_reduce_sum([supervised], device)[0]
    scaler.unscale_(optimizer)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(world_size / max(1, all_supervised))
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / max(1, supervised), tokens, out


def stage_data(n, entries, folder, tok, image_size):
    """The stage's dataset, this rank's sampler (None in a single process) and the optimizer steps per epoch."""
    dataset = Conversations(entries, folder, tok, image_size, language_model=n == 0)
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True) if dist.is_initialized() else None
    steps_per_epoch = (len(sampler) if sampler is not None else len(dataset)) // batch_size // grad_accum
    if steps_per_epoch == 0:
        die(f"stage {n}: {len(entries)} samples are less than one step ({batch_size} x {grad_accum} micro-batches "
            f"x {world_size} ranks)")
    return dataset, sampler, steps_per_epoch


def write_stage_checkpoint(model, optimizer, fields, path):
    """The trainable parts and their optimizer state, gathered whole on rank 0 (a collective), with
    `fields` (step, stage, ...) and every rank's RNG state."""
    gather = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    states = all_rng_states()
    weights = get_model_state_dict(model, options=gather)  # the trained parts, and buffers: the frozen tower's left out
    weights = {k: v for k, v in weights.items() if not k.startswith("visual.")}
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=gather)
    if master:
        save_checkpoint({"model": weights, "optimizer": optimizer_state, **fields, "run_config": config, "rng": states},
                        path)


def epoch_loader(dataset, sampler, epoch, skip, steps_per_epoch):
    """This rank's micro-batches of `epoch` in its shuffled order, those of the first `skip` steps left
    out: a run resumed inside an epoch starts at its next step without reading what it trained on."""
    if sampler is not None:
        sampler.set_epoch(epoch)
        order = list(sampler)
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(skip * grad_accum, steps_per_epoch * grad_accum)]
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate)


def print_stage_plan(n, model, params, progress, lr, stage_dir):
    """The stage's first lines: what trains, for how long, on what; under FSDP what each rank holds."""
    if master:
        os.makedirs(stage_dir, exist_ok=True)
        print(f"stage {n}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters, {progress.plan()}, "
              f"lr {lr:g}, global batch {batch_size} x {grad_accum} micro-batches x {world_size} rank(s) = "
              f"{batch_size * grad_accum * world_size}, {'FSDP' if fsdp else 'DDP' if world_size > 1 else 'single process'}"
              f"{' + CPU offload' if cpu_offload else ''}, {device} {dtype}", flush=True)
    if fsdp:
        full, held = shard_bytes(model)
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, held)
        if master:
            print(f"FSDP: {full / 2**20:.2f} MiB of sharded parameters; held by rank " +
                  ", ".join(f"{r}: {b / 2**20:.2f} MiB" for r, b in enumerate(per_rank)), flush=True)


def epoch_report(n, step, steps_per_epoch, sums):
    """The epoch's record for the log and metrics.jsonl, summed over ranks."""
    k = max(1, sums["steps"])
    totals = all_reduce_sum([sums["loss"], sums["image_tokens"], sums["samples"], sums["tokens"], sums["skipped"],
                             sums["truncated"]], device)
    return {"stage": n, "epoch": step / steps_per_epoch, "step": step, "loss": totals[0] / (k * world_size),
            "image_tokens_per_sample": totals[1] / max(1, totals[2]), "step_time_s": sums["time"] / k,
            "tokens_per_s": totals[3] / max(1e-9, sums["time"]), "peak_memory_gb": peak_memory_gb(device),
            "skipped_samples": int(totals[4]), "truncated_samples": int(totals[5])}


def train_stage(n, model, tok, entries, folder, epochs, lr, stage_dir, sources, lora, total_steps=0):
    """Train the parameters that require grad; returns the last epoch's report (or None if already done).

    `model` is sharded (--fsdp) or wrapped (DDP) here; the optimizer is built after that,
    over the trainable parameters only. The loss of a step is the mean over every supervised
    token of its micro-batches on every rank, so --grad_accum 2 at batch b is batch 2b.
    """
    ckpt_path = os.path.join(stage_dir, "ckpt.pt")
    dataset, sampler, steps_per_epoch = stage_data(n, entries, folder, tok, model.visual.cfg.image_size)
    total_steps = total_steps or epochs * steps_per_epoch
    if max_steps:
        total_steps = min(total_steps, max_steps)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    step_model = parallel(model)
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: the sharded parameters
    optimizer = torch.optim.AdamW(model.param_groups(weight_decay), lr=lr, betas=(0.9, 0.999),
                                  fused=device.type == "cuda" and not cpu_offload)
    step = 0
    if resume and os.path.exists(ckpt_path):
        step = load_checkpoint(ckpt_path, model, optimizer, n, sources, lora, trainable)
        if master:
            print(f"stage {n}: resumed from {ckpt_path} at step {step}/{total_steps}")
        if step >= total_steps:
            return None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")  # fp16 needs loss scaling; bf16 does not
    context = max_length or model.llm.cfg.max_position_embeddings

    def write_checkpoint():
        write_stage_checkpoint(model, optimizer, {"step": step, "stage": n, "lora": lora, "sources": sources}, ckpt_path)

    progress = Progress(step, total_steps, steps_per_epoch, "tokens")
    print_stage_plan(n, model, params, progress, lr, stage_dir)
    report, warned = None, False
    model.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        sums = dict(loss=0.0, image_tokens=0, samples=0, tokens=0, skipped=0, truncated=0, time=0.0, steps=0)
        logged = dict(sums)  # the sums at the last log line
        batches = iter(epoch_loader(dataset, sampler, epoch, step % steps_per_epoch, steps_per_epoch))
        t0 = time.perf_counter()
        for _ in range(step % steps_per_epoch, steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total_steps, max(1, round(warmup_ratio * total_steps)), lr)
            loss, tokens, out = optimizer_step(model, step_model, optimizer, scaler, params, batches, context, sums)
            if sums["truncated"] and not warned and master:
                print(f"warning: {sums['truncated']} sample(s) longer than the context of {context} tokens were "
                      "truncated (their labels cut with them); raise --max_length or shorten the data", flush=True)
                warned = True
            step += 1
            progress.advance(tokens * world_size)  # this rank's tokens, times the ranks
            sums["tokens"] += tokens
            t1 = time.perf_counter()
            sums["loss"] += loss
            sums["time"] += t1 - t0
            sums["steps"] += 1
            if step % log_every == 0 and master:
                print(f"stage {n} step {step}/{total_steps} {progress.report()} loss {loss:.4f} "
                      f"lr {optimizer.param_groups[0]['lr']:.2e} "
                      f"image tokens/sample {int(out.image_tokens.sum()) / len(out.lengths):.1f} step {1000 * (t1 - t0):.0f}ms",
                      flush=True)
                window = {k: sums[k] - logged[k] for k in sums}  # rank 0's steps since the last log line
                log_record({"stage": n, "epoch": step / steps_per_epoch, "step": step, "log": True,
                            "loss": window["loss"] / window["steps"], "lr": optimizer.param_groups[0]["lr"],
                            "image_tokens_per_sample": window["image_tokens"] / max(1, window["samples"]),
                            "step_time_s": window["time"] / window["steps"],
                            "tokens_per_s": world_size * window["tokens"] / max(1e-9, window["time"])}, out_dir, echo=False)
                logged = dict(sums)
            if step % checkpoint_every == 0:
                write_checkpoint()
            t0 = time.perf_counter()
            if step >= total_steps:
                break
        report = epoch_report(n, step, steps_per_epoch, sums)
        if n > 0:
            report |= evaluate(model, tok, eval_entries, eval_folder, os.path.join(stage_dir, "eval_answers.jsonl"))
        log_record(report, out_dir)
    write_checkpoint()
    if dist.is_initialized():
        dist.barrier()  # the next stage reads this checkpoint on every rank
    return report


def load_checkpoint(path, model, optimizer, n, sources, lora, trainable):
    """Rank 0 reads the checkpoint and every rank takes its part (its shard under --fsdp); returns the step."""
    checkpoint, meta = {"model": {}, "optimizer": {}}, [None]
    if master:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        problem = (f"{path} was written by another run (stage, LoRA or model paths differ); use another --out_dir"
                   if (checkpoint["stage"], checkpoint["lora"], checkpoint["sources"]) != (n, lora, sources) else
                   f"{path} does not fit this model; use the same --projector/--lora_r or another --out_dir"
                   if sorted(checkpoint["model"]) != sorted(trainable) else None)
        meta = [(problem, checkpoint["step"], checkpoint["rng"])]
    if dist.is_initialized():
        dist.broadcast_object_list(meta)
    problem, step, rng = meta[0]
    if problem:
        die(problem)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized(), strict=False)
    if cpu_offload:  # the shards live on the CPU: the frozen tower (not in the checkpoint) joins them while
        model.visual.cpu()  # loading, since set_model_state_dict refuses a model on two devices
    set_model_state_dict(model, checkpoint["model"], options=options)
    set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"], options=options)
    model.visual.to(device)
    if len(rng) == world_size:
        set_rng_state(rng[rank])
    return step


# ----------------------------------------------------------------------------- set-up

# every option checked before anything is written or built
check_options(config, positive=["steps_stage0", "lr_stage0", "epochs_stage1", "lr_stage1", "epochs_stage2", "lora_alpha",
                                "batch_size", "grad_accum", "log_every", "checkpoint_every", "max_new_tokens"],
              non_negative=["compress", "lr_stage2", "lora_r", "max_length", "weight_decay", "grad_clip", "workers", "seed",
                            "max_steps", "eval_samples"],
              fractions=["lora_dropout", "warmup_ratio"],
              choices={"stage": ["all", "0", "1", "2"], "projector": ["mlp2x_gelu", "linear"], "model": list(CONFIGS),
                       "llm_model": list(LLAMA_CONFIGS), "reducer": ("",) + REDUCERS})
if 0 < compress < 1:
    die(f"--compress must be 0 (the tower's) or >= 1, got {compress}")
if llm and not os.path.isfile(os.path.join(llm, "config.json")):
    die(f"--llm {llm} is not a Hugging Face model directory (no config.json)")
if llm and stage == "0":
    die("--stage 0 trains a tiny LLM from scratch; with --llm there is nothing to do")
for flag, path in (("--pretrain_data", pretrain_data), ("--instruct_data", instruct_data), ("--eval_data", eval_data)):
    check_file(path, flag, "LLaVA JSON")
if any([pretrain_data, instruct_data, eval_data]) and not image_folder:
    die("--image_folder is required with --pretrain_data/--instruct_data/--eval_data")
if image_folder and not os.path.isdir(image_folder):
    die(f"--image_folder {image_folder} is not a folder")
if not (pretrain_data and instruct_data and eval_data):
    check_writable(data_dir, "--data_dir")
rank, world_size, device = setup_distributed()
master = rank == 0
random.seed(seed + rank)
torch.manual_seed(seed)  # the same initial weights on every rank
dtype, autocast = autocast_context(device, dtype, ("bfloat16", "float16", "float32"))
lora = [lora_r, lora_alpha, lora_dropout] if lora_r > 0 else None
if cpu_offload and not fsdp:
    die("--cpu_offload offloads FSDP's shards; add --fsdp")
if fsdp:
    if not dist.is_initialized():
        die("--fsdp shards the model across ranks; launch with torchrun --nproc_per_node N")
    if dtype == "float16":
        die("--fsdp trains in bfloat16 or float32; fp16 loss scaling is not supported with it")
    try:
        from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy,
                                            fully_shard)
        from torch.distributed.tensor import DTensor
    except ImportError:
        fully_shard = None
    if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
        die(f"--fsdp needs torch 2.7 or newer (FSDP2's fully_shard with ignored_params); this is torch {torch.__version__}")
lr_stage2 = lr_stage2 or (1e-3 if not llm else 2e-4 if lora else 2e-5)

# the frozen image tower, and the names that follow from the configuration it actually has
init_from = init_from or os.path.join(clip_run_dir("tiny", compress or 1, reducer), "ckpt.pt")
if not os.path.isfile(init_from):
    die(f"no CLIP image tower at {init_from}; run `python train_clip.py --compress {compress or 1:g}"
        f"{' --reducer ' + reducer if reducer_tag(reducer) else ''}` first, or give --init_from")
visual, tower_config = load_image_tower(init_from, model, compress or 1.0, quick_gelu, reducer or "drip")
if master:
    grid = tower_config.image_size // tower_config.patch_size
    print(f"image tower: {init_from} (compress {tower_config.compress:g}"
          f"{', ' + tower_config.reducer if tower_config.compress > 1 else ''}"
          f"{' (entropy boundaries)' if tower_config.boundaries == 'entropy' else ''}, {tower_config.image_size} px images, "
          f"{grid} x {grid} patches, width {tower_config.width})", flush=True)
if compress and compress != tower_config.compress:
    die(f"--compress {compress:g} contradicts {init_from}, a compress-{tower_config.compress:g} tower; drop --compress or give another --init_from")
if reducer and reducer != tower_config.reducer:
    die(f"--reducer {reducer} contradicts {init_from}, a {tower_config.reducer} tower; drop --reducer or give another --init_from")
config["compress"], config["reducer"] = compress, reducer = tower_config.compress, tower_config.reducer
tag = "" if compress == 1 else reducer_tag(reducer)
out_dir = config["out_dir"] = out_dir or f"out/llava{tag}_c{compress:g}"
check_writable(out_dir, "--out_dir")
check_shared_folder(out_dir, "--out_dir")
if not (pretrain_data and instruct_data and eval_data):
    check_shared_folder(data_dir, "--data_dir")
if not -tower_config.layers <= feature_layer < tower_config.layers:
    die(f"--feature_layer must index one of the tower's {tower_config.layers} blocks (-{tower_config.layers} to "
        f"{tower_config.layers - 1}), got {feature_layer}")

builtin = os.path.join(data_dir, "shapes_llava")
if not (pretrain_data and instruct_data and eval_data):
    visual_size = tower_config.image_size
    if master:
        write_shapes_conversations(builtin, visual_size)
    if dist.is_initialized():
        dist.barrier()
    with open(os.path.join(builtin, "info.json")) as f:
        if json.load(f)["size"] != visual_size:
            die(f"{builtin} holds images of another size than the tower's {visual_size} px; delete it")
folder = image_folder or builtin
pretrain_data = pretrain_data or os.path.join(builtin, "pretrain.json")
instruct_data = instruct_data or os.path.join(builtin, "instruct.json")
eval_folder = image_folder if eval_data else builtin
eval_entries = read_conversations(eval_data or os.path.join(builtin, "val.json"))
# read and checked up front: a bad entry stops the run before any training
pretrain_entries = read_conversations(pretrain_data) if stage in ("all", "0", "1") else []
instruct_entries = read_conversations(instruct_data) if stage in ("all", "0", "2") else []
if stage == "2" and not os.path.exists(os.path.join(out_dir, "stage1", "ckpt.pt")):
    die(f"stage 2 starts from the projector of stage 1, and {out_dir}/stage1/ckpt.pt does not exist; run --stage 1 first")
if master:
    os.makedirs(out_dir, exist_ok=True)

# ----------------------------------------------------------------------------- stage 0: a tiny LLM trained on the data's text

llm_dir = llm or os.path.join(out_dir, "llm")
if stage == "0" or (stage == "all" and not llm and not (resume and os.path.exists(os.path.join(llm_dir, "config.json")))):
    text_entries = pretrain_entries + instruct_entries
    tok_path = os.path.join(out_dir, "tokenizer.model")
    if master:
        texts = [SYSTEM] + [t["value"].replace("<image>", "") for e in text_entries for t in e["conversations"]]
        train_sentencepiece(texts, LLAMA_CONFIGS[llm_model].vocab_size, tok_path)
    if dist.is_initialized():
        dist.barrier()
    cfg = LLAMA_CONFIGS[llm_model]
    language_model = Llama(cfg)
    tok = TextTokenizer(tok_path, cfg.bos_token_id, cfg.eos_token_id)
    llava = LLaVA(visual, language_model, projector, feature_layer)
    llava.requires_grad_(False)
    llava.llm.requires_grad_(True)
    llava.llm.grad_checkpointing = grad_checkpointing
    train_stage(0, llava, tok, text_entries, folder, 0, lr_stage0, os.path.join(out_dir, "stage0"),
                {"vision": init_from, "llm": "scratch:" + llm_model}, None, total_steps=steps_stage0)
    write_llm_directory(llava, None, tok, llm_dir)
    if dist.is_initialized():
        dist.barrier()

# ----------------------------------------------------------------------------- stage 1: the projector alone

sources = {"vision": init_from, "llm": llm_dir}
stage1_ckpt = os.path.join(out_dir, "stage1", "ckpt.pt")
if stage in ("all", "1"):
    llava, tok = build_model(llm_dir, None)
    llava.requires_grad_(False)
    llava.projector.requires_grad_(True)  # frozen parts are set before DDP wraps or FSDP shards the model
    train_stage(1, llava, tok, pretrain_entries, folder, epochs_stage1, lr_stage1, os.path.dirname(stage1_ckpt),
                sources, None)

# ----------------------------------------------------------------------------- stage 2: projector + LLM (or LoRA)

if stage in ("all", "2"):
    llava, tok = build_model(llm_dir, lora)
    stage1_weights = torch.load(stage1_ckpt, map_location="cpu", weights_only=False)["model"]
    try:
        llava.projector.load_state_dict({k.removeprefix("projector."): v for k, v in stage1_weights.items()})
    except RuntimeError:
        die(f"{stage1_ckpt} holds another projector than --projector {projector}; use the one stage 1 was run with")
    llava.requires_grad_(False)
    llava.projector.requires_grad_(True)
    if lora:
        for module in llava.llm.modules():
            if isinstance(module, LoRALinear):
                module.lora_A.requires_grad_(True)
                module.lora_B.requires_grad_(True)
    else:
        llava.llm.requires_grad_(True)
    llava.llm.grad_checkpointing = grad_checkpointing
    train_stage(2, llava, tok, instruct_entries, folder, epochs_stage2, lr_stage2, os.path.join(out_dir, "stage2"),
                sources, lora)
    # a plain Llama directory to share, evaluate elsewhere or train on (LoRA folded into the weights)
    write_llm_directory(llava, lora, tok, os.path.join(out_dir, "stage2", "llm"))

if master and os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
    plot_curves([out_dir], os.path.join(out_dir, "curves.png"))
    print(f"curves: {out_dir}/curves.png")
if dist.is_initialized():
    dist.destroy_process_group()

"""Small helpers the scripts share: command-line overrides, DDP set-up, the LR schedule,
peak memory, CLIP image preprocessing, checkpoint and weight loading (atomic saves),
tokenizers (a BPE trained on captions, or CLIP's own), Hugging Face Llama directories
and Vicuna's conversation template (for LLaVA), and the built-in shapes dataset.

The scripts import this module and model.py, nothing else of the project.
"""
import gzip
import io
import json
import math
import os
import random
import resource
import shutil
import sys
import tarfile
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms as T
from PIL import Image, ImageDraw, ImageOps
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from model import CLIP, IGNORE, IMAGE_TOKEN, CLIPConfig, Llama, llama_config_from_hf, load_llama_state_dict


def die(message):
    """Stop with one clear sentence instead of a traceback."""
    raise SystemExit(f"error: {message}")


# -----------------------------------------------------------------------------
# nanoGPT-style configuration: module-level defaults, overridden by --key=value or --key value


def parse_overrides(defaults, argv=None):
    """Return a dict of the defaults with command-line overrides applied.

    Types follow the defaults: `--compress 4` on a float default gives 4.0, a bool
    accepts `--flag`, `--flag=true` and `--flag=false`.
    """
    argv = sys.argv[1:] if argv is None else argv
    config = dict(defaults)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            die(f"unexpected argument {arg!r}; options look like --key=value")
        key, _, value = arg[2:].partition("=")
        if key not in config:
            die(f"unknown option --{key}; known options: {', '.join('--' + k for k in config)}")
        default = config[key]
        if not _ and isinstance(default, bool):
            value = "true"
        elif not _:
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
            return float(value)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}[type(default)]
        die(f"--{key} expects {expected}, got {value!r}")
    return value


# -----------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)


def setup_distributed():
    """Returns (rank, world_size, device). Single process when RANK is not set."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


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


# -----------------------------------------------------------------------------
# Images and checkpoints

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def image_transform(image_size, augment=False):
    """CLIP preprocessing: resize + centre crop (or open_clip's mild random crop), then normalise."""
    resize = (T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC) if augment
              else T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]))
    return T.Compose([resize, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def load_image(file):
    """Any mode (RGBA, greyscale, palette) and EXIF orientation -> upright RGB."""
    with Image.open(file) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def load_clip_checkpoint(path):
    """A train_clip.py checkpoint -> (CLIP model in eval mode, the checkpoint dict)."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        model = CLIP(CLIPConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except Exception as e:
        die(f"{path} is not a train_clip.py checkpoint ({type(e).__name__}: {e})")
    return model.eval(), checkpoint



def load_weights_file(path):
    """A state dict from .pt / .bin (torch) or .safetensors."""
    if not os.path.isfile(path):
        die(f"no weights file at {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        weights = torch.load(path, map_location="cpu", weights_only=False)
        return weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    except Exception as e:
        die(f"cannot read weights {path} ({type(e).__name__}: {e})")


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


# -----------------------------------------------------------------------------
# Tokenizers: a BPE trained on captions, or CLIP's own

def byte_level_tokenizer(bpe):
    """CLIP's text normalisation and word split around a byte-level BPE model."""
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    # CLIP's word split, then bytes mapped to printable characters
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"), "removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def finish_tokenizer(tok, start, end, context_length):
    """Start/end-of-text tokens around every text, truncation to the context, zero padding."""
    tok.post_processor = processors.TemplateProcessing(single=f"{start} $A {end}",
                                                       special_tokens=[(t, tok.token_to_id(t)) for t in (start, end)])
    tok.enable_truncation(context_length)
    tok.enable_padding(pad_id=0, length=context_length)
    return tok


def train_tokenizer(captions, vocab_size, context_length):
    """A BPE trained on the captions; <pad> is id 0, as the text tower expects."""
    tok = byte_level_tokenizer(models.BPE())
    specials = ["<pad>", "<start_of_text>", "<end_of_text>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer)
    return finish_tokenizer(tok, "<start_of_text>", "<end_of_text>", context_length)


def bytes_to_unicode():
    """GPT-2/CLIP's map from the 256 bytes to printable characters, as ByteLevel uses it."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + extra, printable + [256 + i for i in range(len(extra))])}


def clip_tokenizer(path, context_length):
    """CLIP's own BPE from open_clip's bpe_simple_vocab_16e6.txt.gz, so token ids match pretrained towers."""
    merges = [tuple(line.split()) for line in gzip.open(path, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, end_of_word_suffix="</w>")
    tok = byte_level_tokenizer(bpe)
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    return finish_tokenizer(tok, "<|startoftext|>", "<|endoftext|>", context_length)


def load_tokenizer(path, context_length):
    try:
        if path.endswith(".gz"):
            return clip_tokenizer(path, context_length)
        tok = Tokenizer.from_file(path)
        tok.enable_truncation(context_length)
        tok.enable_padding(pad_id=0, length=context_length)
        return tok
    except Exception as e:  # the tokenizers library raises plain Exceptions
        die(f"cannot read tokenizer {path} ({e}); give a tokenizer.json or CLIP's bpe_simple_vocab_16e6.txt.gz")


def tokenize(tok, texts):
    return torch.tensor([e.ids for e in tok.encode_batch(texts)], dtype=torch.long)  # B x context_length


# -----------------------------------------------------------------------------
# Language models for LLaVA: Hugging Face Llama directories and their tokenizers

class TextTokenizer:
    """A language model's tokenizer: sentencepiece's tokenizer.model or a tokenizers tokenizer.json.

    encode() adds no special tokens; the conversation template places bos and eos itself.
    """

    def __init__(self, path, bos_token_id, eos_token_id):
        self.path, self.bos_token_id, self.eos_token_id = path, bos_token_id, eos_token_id
        if path.endswith(".model"):
            import sentencepiece
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        else:
            self.hf = Tokenizer.from_file(path)
            self.hf.no_padding()
            self.hf.no_truncation()

    def encode(self, text):
        if hasattr(self, "sp"):  # sentencepiece adds its own leading "▁": drop one space so it is not doubled
            return self.sp.encode(text[1:] if text.startswith(" ") else text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.sp.decode(ids) if hasattr(self, "sp") else self.hf.decode(ids)

    def __getstate__(self):  # data loader workers reopen the file
        return {"path": self.path, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}

    def __setstate__(self, state):
        self.__init__(state["path"], state["bos_token_id"], state["eos_token_id"])


def load_llama(path):
    """A Hugging Face Llama-family directory (config.json, *.safetensors or pytorch_model*.bin,
    sharded or not, tokenizer.model or tokenizer.json) -> (Llama, TextTokenizer)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        die(f"{path} is not a Hugging Face model directory (no config.json)")
    with open(os.path.join(path, "config.json")) as f:
        try:
            cfg = llama_config_from_hf(json.load(f))
        except ValueError as e:
            die(f"{path}: {e}")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) or \
        sorted(f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin"))
    if not files:
        die(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
    state_dict = {}
    for file in files:  # every shard of a sharded checkpoint
        state_dict.update(load_weights_file(os.path.join(path, file)))
    llm = Llama(cfg)
    try:
        load_llama_state_dict(llm, state_dict)
    except ValueError as e:
        die(f"{path}: weights do not fit its config.json ({e})")
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.isfile(os.path.join(path, name)):
            return llm, TextTokenizer(os.path.join(path, name), cfg.bos_token_id, cfg.eos_token_id)
    die(f"{path} has no tokenizer.model or tokenizer.json")


def save_llama(llm, tokenizer_path, path):
    """Write `llm` as a Hugging Face Llama directory that load_llama (and transformers) can read."""
    os.makedirs(path, exist_ok=True)
    cfg = asdict(llm.cfg)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
               head_dim=llm.cfg.dim_per_head, rope_scaling=llm.cfg.rope_scaling)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_checkpoint({"model." + k if not k.startswith("lm_head") else k: v.contiguous()
                     for k, v in llm.state_dict().items()}, os.path.join(path, "pytorch_model.bin"))
    if os.path.abspath(tokenizer_path) != os.path.abspath(os.path.join(path, os.path.basename(tokenizer_path))):
        shutil.copy(tokenizer_path, path)


def train_sentencepiece(texts, vocab_size, path):
    """A BPE tokenizer.model trained offline on `texts`, with Llama's ids: unk 0, bos 1, eos 2."""
    import sentencepiece
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                             model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                             pad_id=-1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())


# Vicuna v1's conversation template, as LLaVA-1.5 uses it
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def encode_with_image(tok, text):
    """Token ids of text, with IMAGE_TOKEN where "<image>" stood."""
    ids = []
    for i, piece in enumerate(text.split("<image>")):
        if i:
            ids.append(IMAGE_TOKEN)
        if piece.strip():
            ids += tok.encode(piece)
    return ids


def tokenize_conversation(tok, turns):
    """Vicuna v1: "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>".

    turns: LLaVA's [{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]. Returns ids
    and labels (1-D LongTensors): labels are the ids on each answer and its </s>, IGNORE on
    the system prompt and the user's turns. Pieces are tokenized one by one, so the mask
    is exact. Ending on a user turn gives a prompt to generate from.
    """
    ids, labels = [tok.bos_token_id], [IGNORE]
    for i in range(0, len(turns), 2):
        question = (SYSTEM + " " if i == 0 else "") + "USER: " + turns[i]["value"] + " ASSISTANT:"
        q = encode_with_image(tok, question)
        ids, labels = ids + q, labels + [IGNORE] * len(q)
        if i + 1 < len(turns):
            a = tok.encode(" " + turns[i + 1]["value"]) + [tok.eos_token_id]
            ids, labels = ids + a, labels + a
    return torch.tensor(ids), torch.tensor(labels)


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

"""Text: tokenizers for the CLIP text tower (a BPE trained on captions, or CLIP's own),
zero-shot prompts (CLIP's ImageNet class names and templates) and classifier, and for
LLaVA a language model's tokenizer, Hugging Face Llama directories (load and save), an
offline sentencepiece trainer, Vicuna's conversation template, and the one way a question
is asked and its answer scored (train_llava.py's evaluation and sample_llava.py).
"""
import gzip
import io
import json
import os
import shutil
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from common import die, load_weights_file, save_checkpoint
from data import image_transform, load_image
from llama import Llama, llama_config_from_hf, load_llama_state_dict
from model import IGNORE, IMAGE_TOKEN
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
# Zero-shot classification prompts (files generated once from open_clip's zero_shot_metadata.py)

ZERO_SHOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zero_shot")
IMAGENET_CLASSNAMES = os.path.join(ZERO_SHOT_DIR, "imagenet_classnames.txt")  # CLIP's curated names, class-index order
IMAGENET_TEMPLATES = os.path.join(ZERO_SHOT_DIR, "imagenet_templates.txt")    # CLIP's 80 prompt templates
# the 7-template subset of CLIP's prompt-engineering notebook (all among the 80)
SIMPLE_IMAGENET_TEMPLATES = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                             "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


def read_lines(path):
    """The non-empty lines of a text file, stripped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def zero_shot_templates(choice):
    """80 (CLIP's ImageNet templates, open_clip's default), 7 (their subset), or a file of templates, one a line with {}."""
    if choice == "80":
        return read_lines(IMAGENET_TEMPLATES)
    if choice == "7":
        return list(SIMPLE_IMAGENET_TEMPLATES)
    if not os.path.isfile(choice):
        die(f"--templates {choice}: give 80, 7 or a file with one template a line, {{}} where the class name goes")
    templates = read_lines(choice)
    if not templates or any(t.count("{}") != 1 for t in templates):
        die(f"--templates {choice}: every line needs exactly one {{}} where the class name goes")
    return templates


@torch.no_grad()
def zero_shot_classifier(model, tok, names, templates, device, texts_per_batch=1000):
    """C x E: per class, the normalised mean of its normalised prompt embeddings (CLIP's, open_clip's).

    Several classes' prompts go through the text tower together, about texts_per_batch at a time.
    """
    weights, per_batch = [], max(1, texts_per_batch // len(templates))
    for start in range(0, len(names), per_batch):
        chunk = names[start:start + per_batch]
        text = tokenize(tok, [t.format(name) for name in chunk for t in templates]).to(device)  # (C'*T) x L
        features = F.normalize(model.encode_text(text).float(), dim=-1)
        features = features.view(len(chunk), len(templates), -1)                         # C' x T x E
        weights.append(F.normalize(features.mean(1), dim=-1))
    return torch.cat(weights)


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


def load_llama(path, dtype=torch.float32):
    """A Hugging Face Llama-family directory (config.json, *.safetensors or pytorch_model*.bin,
    sharded or not, tokenizer.model or tokenizer.json) -> (Llama, TextTokenizer).

    The weights become the model's parameters as read (the model is built on the meta
    device, so there is no second, randomly initialised copy), converted tensor by tensor
    to `dtype`; dtype=None keeps the dtype they are stored in (2 bytes a parameter for
    fp16/bf16 files)."""
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
    for k in state_dict:  # replaced one at a time: at most one tensor exists twice
        state_dict[k] = state_dict[k].to(dtype or state_dict[k].dtype)
    with torch.device("meta"):
        llm = Llama(cfg)
    try:
        load_llama_state_dict(llm, state_dict, assign=True)
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


# ----------------------------------------------------------------------------- asking LLaVA, scoring its answers

@torch.no_grad()
def answer_questions(model, tok, questions, image_folder, device, autocast, max_new_tokens):
    """Greedy answers to a batch of questions [(text without "<image>", image path under
    image_folder, or None)], each asked as LLaVA asks it: "<image>\\n" + text as the user's turn
    of Vicuna-v1's template. The one path of train_llava.py's evaluation and of
    sample_llava.py. Returns stripped strings; None for a question whose image cannot be read
    (a warning names it)."""
    transform = image_transform(model.visual.cfg.image_size)
    kept, ids, pixels, has_image = [], [], [], []
    for i, (text, image) in enumerate(questions):
        if image:
            try:
                pixels.append(transform(load_image(os.path.join(image_folder, image))))
            except OSError as e:
                print(f"warning: cannot read {os.path.join(image_folder, image)} ({type(e).__name__}); not answered",
                      flush=True)
                continue
        ids.append(tokenize_conversation(tok, [{"from": "human", "value": ("<image>\n" if image else "") + text}])[0]
                   .to(device))
        kept.append(i)
        has_image.append(bool(image))
    answers = [None] * len(questions)
    if kept:
        with autocast:
            generated = model.generate(ids, torch.stack(pixels).to(device) if pixels else None, has_image, max_new_tokens)
        for i, tokens in zip(kept, generated):
            answers[i] = tok.decode(tokens).strip()
    return answers


def exact_match(answers, expected, kinds):
    """The evaluation's score: the percentage of answers equal to the expected answer (both
    stripped), overall and per kind (None: no kind); None answers (unreadable images) left out."""
    scored = [(a == e.strip(), k) for a, e, k in zip(answers, expected, kinds) if a is not None]
    result = {"exact_match": 100 * sum(c for c, _ in scored) / max(1, len(scored)), "eval_questions": len(scored)}
    for kind in sorted({k for _, k in scored if k is not None}):
        of_kind = [c for c, k in scored if k == kind]
        result[f"exact_match_{kind}"] = 100 * sum(of_kind) / len(of_kind)
    return result

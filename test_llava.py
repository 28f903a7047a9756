"""LLaVA: Hugging Face Llama loading (against transformers), the label mask, the image-token glue,
LoRA, and train_llava.py end to end (both stages under a 2-rank torchrun with compress 4)."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from data import image_transform, make_shape_image
from text import SYSTEM, TextTokenizer, load_llama, save_llama, tokenize_conversation, train_sentencepiece
from llama import LLAMA_CONFIGS, Llama, LoRALinear, add_lora, merge_lora
from model import CLIP, IGNORE, IMAGE_TOKEN, LLaVA, make_config

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["the shape is red", "it is a blue circle", "where is the green ring", "a photo of a yellow cross",
         "USER: ASSISTANT:", SYSTEM]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_sentencepiece(WORDS * 20, 120, path)
    return path


# ----------------------------------------------------------------------------- Hugging Face Llama checkpoints

@pytest.mark.parametrize("variant", ["untied, multi-head, sharded safetensors", "tied, grouped-query, llama3 rope"])
def test_hugging_face_llama_gives_the_same_logits(variant, tmp_path, tokenizer_file):
    tied = variant.startswith("tied")
    rope = dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16}, rope_theta=500000.0) if tied else {}
    torch.manual_seed(0)
    reference = LlamaForCausalLM(HFLlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2 if tied else 4,
                                               max_position_embeddings=64, tie_word_embeddings=tied, **rope)).eval()
    with torch.no_grad():  # random norms, so that a swapped or missing norm weight shows
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    reference.save_pretrained(tmp_path, max_shard_size="50KB" if not tied else "10GB")
    if not tied:
        assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    shutil.copy(tokenizer_file, tmp_path)
    ours, tok = load_llama(str(tmp_path))
    ids = torch.randint(0, 120, (2, 40))
    with torch.no_grad():
        expected, got = reference(ids).logits, ours.eval()(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert tok.decode(tok.encode("the shape is red")) == "the shape is red"

    # and back: what save_llama writes, transformers reads as the same model
    save_llama(ours, tokenizer_file, str(tmp_path / "ours"))
    again = LlamaForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,parameters", [("vicuna-7b", 6_738_415_616), ("TinyLlama-1.1B", 1_100_048_384),
                                             ("SmolLM2-135M", 134_515_008)])
def test_named_llama_configs_have_the_published_sizes(name, parameters):
    with torch.device("meta"):  # shapes only, no memory
        llm = Llama(LLAMA_CONFIGS[name])
    assert sum(p.numel() for p in llm.parameters()) == parameters


def test_llama_directory_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    result = subprocess.run([sys.executable, "-c", f"from text import load_llama; load_llama({str(tmp_path)!r})"],
                            capture_output=True, text=True, cwd=HERE)
    assert result.returncode != 0 and "only Llama-family checkpoints" in result.stderr


# ----------------------------------------------------------------------------- the label mask

def test_label_mask_covers_exactly_the_answers(tokenizer_file):
    tok = TextTokenizer(tokenizer_file, 1, 2)
    turns = [{"from": "human", "value": "<image>\nwhere is the green ring"}, {"from": "gpt", "value": "the shape is red"},
             {"from": "human", "value": "it is a blue circle"}, {"from": "gpt", "value": "a photo of a yellow cross"}]
    ids, labels = tokenize_conversation(tok, turns)
    # rebuild the sequence piece by piece, knowing which pieces are answers
    pieces = [([1], False), (tok.encode(SYSTEM + " USER: "), False), ([IMAGE_TOKEN], False),
              (tok.encode("\nwhere is the green ring ASSISTANT:"), False), (tok.encode(" the shape is red"), True),
              ([2], True), (tok.encode("USER: it is a blue circle ASSISTANT:"), False),
              (tok.encode(" a photo of a yellow cross"), True), ([2], True)]
    expected_ids = [i for piece, _ in pieces for i in piece]
    expected_labels = [i if answer else IGNORE for piece, answer in pieces for i in piece]
    assert ids.tolist() == expected_ids
    for position, (label, expected) in enumerate(zip(labels.tolist(), expected_labels)):
        assert label == expected, f"token {position}: label {label}, expected {expected}"
    answers = tok.decode([i for i, keep in zip(ids.tolist(), labels.tolist()) if keep != IGNORE and i != 2])
    assert answers.split() == "the shape is red a photo of a yellow cross".split()
    assert (labels == IGNORE).sum() == len(ids) - 2 - len(tok.encode(" the shape is red")) - len(tok.encode(" a photo of a yellow cross"))


# ----------------------------------------------------------------------------- image tokens into the LLM

def tiny_llava(compress=4):
    torch.manual_seed(0)
    llm = Llama(LLAMA_CONFIGS["tiny"])
    return LLaVA(CLIP(make_config("tiny", compress=compress)).visual, llm).eval()


def test_only_valid_drip_tokens_reach_the_llm_and_labels_follow():
    model = tiny_llava()
    rng = random.Random(0)
    images = torch.stack([image_transform(48)(make_shape_image(rng, label, 48)[0]) for label in (0, 7, 20)])
    ids = [torch.tensor([1, 5, IMAGE_TOKEN, 6, 7, 8]), torch.tensor([1, 9, 10, 11]), torch.tensor([1, IMAGE_TOKEN, 12, 13])]
    labels = [torch.tensor([IGNORE, IGNORE, IGNORE, IGNORE, 7, 8]), torch.tensor([IGNORE, IGNORE, 10, 11]),
              torch.tensor([IGNORE, IGNORE, 12, 13])]
    with torch.no_grad():
        features = model.visual.forward_features(images[[0, 2]], layer=-2, sample=False)
        counts = features.valid.sum(1).tolist()
        x, y, lengths, image_tokens, truncated = model.build_inputs(ids, labels, images[[0, 2]], [True, False, True], 256)
    assert counts[0] != 36 and image_tokens.tolist() == [counts[0], 0, counts[1]]
    assert lengths.tolist() == [5 + counts[0], 4, 3 + counts[1]] and truncated == 0
    embed = model.llm.embed_tokens.weight
    # sample 0: two text tokens, the valid segment tokens projected, then the rest
    n = counts[0]
    torch.testing.assert_close(x[0, 2:2 + n], model.projector(features.tokens[0, :n]))
    torch.testing.assert_close(x[0, 2 + n:5 + n], embed[[6, 7, 8]])
    assert y[0].tolist() == [IGNORE] * (2 + n) + [IGNORE, 7, 8] + [IGNORE] * (x.shape[1] - 5 - n)
    assert y[1].tolist()[:4] == [IGNORE, IGNORE, 10, 11] and (y[1, 4:] == IGNORE).all() and (x[1, 4:] == 0).all()
    assert y[2].tolist()[:1 + counts[1] + 2] == [IGNORE] * (1 + counts[1]) + [12, 13]
    # right padding and causal attention: a sample's logits do not depend on the batch
    with torch.no_grad():
        batch = model(ids, labels, images[[0, 2]], [True, False, True], 256).logits
        alone = model(ids[1:2], labels[1:2], None, [False], 256).logits
    torch.testing.assert_close(batch[1, :4], alone[0, :4], atol=1e-5, rtol=1e-4)
    # truncation cuts the labels with the tokens
    _, y_cut, lengths_cut, _, truncated = model.build_inputs(ids, labels, images[[0, 2]], [True, False, True], 4 + n)
    assert truncated == 1 + (3 + counts[1] > 4 + n) and lengths_cut.tolist() == [4 + n, 4, min(4 + n, 3 + counts[1])]
    assert y_cut[0].tolist() == [IGNORE] * (2 + n) + [IGNORE, 7]


def test_kv_cache_generation_matches_the_cache_free_loop():
    """A right-padded batch of prompts of different lengths (image token counts differ too, one
    prompt has no image) against re-running each whole sequence alone for every new token."""
    model = tiny_llava()
    with torch.no_grad():  # larger weights: the small init answers by repeating the last token, whatever came before
        for name, p in model.llm.named_parameters():
            if "norm" not in name:
                p.normal_(0, 1.0 if "embed" in name else 0.3)
    images = torch.randn(2, 3, 48, 48)
    ids = [torch.tensor([1, IMAGE_TOKEN, 5, 6]), torch.tensor([1, 7, 8, 9, 10, 11, 12, 13, 14, 15]),
           torch.tensor([1, 7, IMAGE_TOKEN])]
    has_image = [True, False, True]
    answers = model.generate(ids, images, has_image, max_new_tokens=8)
    image_of = {0: images[0:1], 2: images[1:2]}
    for b in range(3):
        sequence, expected = ids[b], []
        for _ in range(8):
            logits = model([sequence], [torch.full_like(sequence, IGNORE)], image_of.get(b), [has_image[b]], 256).logits
            token = int(logits[0, -1].argmax())
            if token == model.llm.cfg.eos_token_id:
                break
            expected.append(token)
            sequence = torch.cat([sequence, torch.tensor([token])])
        assert answers[b] == expected, f"prompt {b}"
    assert all(len(a) == 8 for a in answers) and len({a[0] for a in answers}) == 3  # the cached steps ran for every row


# ----------------------------------------------------------------------------- LoRA

def test_lora_starts_at_the_base_model_and_merges_exactly():
    torch.manual_seed(0)
    llm = Llama(LLAMA_CONFIGS["tiny"]).eval()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        base = llm(ids)
    add_lora(llm, r=4, alpha=8, dropout=0.1).eval()
    assert isinstance(llm.layers[0].self_attn.q_proj, LoRALinear) and isinstance(llm.layers[3].mlp.down_proj, LoRALinear)
    trainable = {n for n, p in llm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(llm(ids), base)  # B = 0
        for module in llm.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_()
        adapted = llm(ids)
    assert (adapted - base).abs().max() > 1e-3
    merge_lora(llm)
    assert not any(isinstance(m, LoRALinear) for m in llm.modules())
    assert set(llm.state_dict()) == set(Llama(LLAMA_CONFIGS["tiny"]).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(llm(ids), adapted, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- train_llava.py end to end

def run(args, nproc=1, check=True, timeout=300, script="train_llava.py"):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    result = subprocess.run(launcher + [os.path.join(HERE, script)] + args, capture_output=True, text=True,
                            timeout=timeout, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_file):
    """A compress-4 CLIP checkpoint, a tiny Llama directory, and LLaVA JSONs over a few images."""
    root = tmp_path_factory.mktemp("llava")
    cfg = make_config("tiny", compress=4)
    torch.manual_seed(0)
    torch.save({"model": CLIP(cfg).state_dict(), "model_config": cfg.__dict__}, root / "clip.pt")
    save_llama(Llama(replace(LLAMA_CONFIGS["tiny"], vocab_size=120)), tokenizer_file, str(root / "llm"))  # the tokenizer's size
    rng = random.Random(0)
    os.makedirs(root / "images")
    entries = []
    for i in range(24):
        image, words = make_shape_image(rng, rng.randrange(36), 48)
        image.save(root / "images" / f"{i}.jpg")
        entries.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nwhere is the green ring"}, {"from": "gpt", "value": f"the shape is {words['colour']}"},
            {"from": "human", "value": "it is a blue circle " * (20 if i == 3 else 1)}, {"from": "gpt", "value": "a yellow cross"}]})
    entries.append({"id": "gone", "image": "missing.jpg", "conversations": entries[0]["conversations"]})
    entries.append({"id": "text", "conversations": [{"from": "human", "value": "the shape is red"}, {"from": "gpt", "value": "red"}]})
    (root / "data.json").write_text(json.dumps(entries))
    (root / "eval.json").write_text(json.dumps(entries[:6]))
    return root


def common_args(root, out):
    return ["--init_from", str(root / "clip.pt"), "--llm", str(root / "llm"), "--pretrain_data", str(root / "data.json"),
            "--instruct_data", str(root / "data.json"), "--eval_data", str(root / "eval.json"),
            "--image_folder", str(root / "images"), "--out_dir", str(out), "--batch_size", "4", "--workers", "0",
            "--log_every", "1", "--max_new_tokens", "3", "--max_length", "100"]


def records(out, log=False):
    """The epoch records of a run's metrics.jsonl (with log=True, those of its log lines)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("log", False) == log]


# the 2-rank runs compare DDP with FSDP; --grad_accum 2 at batch 2 on one side, batch 4 on the other
STEPS = ["--max_steps", "3", "--lr_stage2", "1e-3"]
LORA = ["--lora_r", "4", "--lora_dropout", "0"]


@pytest.fixture(scope="module")
def ddp_lora_run(setup):
    """Both stages under DDP with LoRA and gradient checkpointing, accumulating 2 micro-batches of 2."""
    out = setup / "run"
    result = run(common_args(setup, out) + STEPS + LORA + ["--grad_checkpointing", "--batch_size", "2", "--grad_accum", "2"],
                 nproc=2)
    return out, result


def test_both_stages_two_ranks_compress_4_then_sample(setup, ddp_lora_run):
    out, result = ddp_lora_run
    assert "truncated" in result.stdout  # the 20x repeated question is longer than 100 tokens
    assert "stage 2: " in result.stdout and "3 steps = " in result.stdout.split("stage 2: ")[1].splitlines()[0]
    assert re.search(r"^stage 2 step 3/3 100\.0% \d+ tokens/s 0s left loss ", result.stdout, re.M)
    assert (out / "curves.png").exists()
    assert "global batch 2 x 2 micro-batches x 2 rank(s) = 8" in result.stdout
    stage1, stage2 = records(out)
    logged = records(out, log=True)  # a record per log line (every step here), for the curves
    assert [(r["stage"], r["step"]) for r in logged] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and 0 < r["image_tokens_per_sample"] < 18 for r in logged)
    assert (stage1["stage"], stage1["step"], stage2["stage"], stage2["step"]) == (1, 3, 2, 3)
    for r in (stage1, stage2):
        assert 0 < r["image_tokens_per_sample"] < 36 / 2  # compress 4: about 9 of 36 patches
        assert r["eval_questions"] == 6 and r["tokens_per_s"] > 0
    saved1 = torch.load(out / "stage1" / "ckpt.pt", weights_only=False)
    assert saved1["model"] and all(k.startswith("projector.") for k in saved1["model"])  # tower and LLM stayed frozen
    saved2 = torch.load(out / "stage2" / "ckpt.pt", weights_only=False)
    assert {k.split(".")[0] for k in saved2["model"]} == {"projector", "llm"}
    assert all("lora_" in k for k in saved2["model"] if k.startswith("llm."))
    merged, _ = load_llama(str(out / "stage2" / "llm"))  # LoRA folded into a plain Llama directory
    assert not torch.equal(merged.layers[0].self_attn.q_proj.weight,
                           load_llama(str(setup / "llm"))[0].layers[0].self_attn.q_proj.weight)

    image = setup / "images" / "5.jpg"
    answer = run(["--out_dir", str(out), "--image", str(image), "--prompt", "What colour is the shape?",
                  "--max_new_tokens", "3"], script="sample_llava.py")
    assert answer.stdout.strip() == answer.stdout.strip().splitlines()[-1]  # one line: the answer


def assert_same_weights(a, b, moved_from=None, atol=1e-5):
    """Two checkpoints' trained weights agree to float tolerance (and moved from the start far more than that)."""
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)
    if moved_from is not None:
        assert max((a[k] - moved_from[k]).abs().max() for k in a) > 100 * atol


def llm_weights(saved):
    return {k.removeprefix("llm."): v for k, v in saved["model"].items() if k.startswith("llm.")}


def assert_transformers_reads(directory, llm):
    """transformers loads the written directory and gives `llm`'s logits."""
    ids = torch.randint(0, 120, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(LlamaForCausalLM.from_pretrained(str(directory)).eval()(ids).logits, llm.eval()(ids),
                                   atol=1e-5, rtol=1e-4)


def shard_bytes(stdout, stage):
    """(full, [held by each rank]) in MiB, from the stage's FSDP line."""
    line = stdout.partition(f"stage {stage}: ")[2].partition("FSDP: ")[2].splitlines()[0]
    full = float(line.split(" MiB")[0])
    return full, [float(part.split(": ")[1].split(" MiB")[0]) for part in line.split("held by rank ")[1].split(", ")]


def test_fsdp_lora_equals_ddp_and_writes_the_merged_llm(setup, ddp_lora_run, tmp_path):
    """Stage 2 from the same stage-1 projector: FSDP (with CPU offload) at batch 4 == DDP accumulating 2 x 2."""
    ddp_out, _ = ddp_lora_run
    shutil.copytree(ddp_out / "stage1", tmp_path / "stage1")
    result = run(common_args(setup, tmp_path) + STEPS + LORA + ["--stage", "2", "--fsdp", "--cpu_offload",
                                                                 "--grad_checkpointing"], nproc=2)
    assert "FSDP + CPU offload" in result.stdout and "global batch 4 x 1 micro-batches x 2 rank(s) = 8" in result.stdout
    ours, ddp = (torch.load(out / "stage2" / "ckpt.pt", weights_only=False) for out in (tmp_path, ddp_out))
    lora_start = {k: torch.zeros_like(v) for k, v in ours["model"].items() if "lora_B" in k}  # B starts at zero
    assert_same_weights(ours["model"], ddp["model"])
    assert_same_weights({k: ours["model"][k] for k in lora_start}, {k: ddp["model"][k] for k in lora_start}, lora_start)
    # frozen parameters are neither saved nor optimized: only LoRA and the projector have state
    assert set(ours["optimizer"]["state"]) == set(ours["model"]) and all(
        "lora_" in k or k.startswith("projector.") for k in ours["model"])
    # each rank holds half of the sharded parameters (the LLM in fp32, LoRA, the projector)
    full, held = shard_bytes(result.stdout, 2)
    assert len(held) == 2 and all(abs(h - full / 2) < 0.02 * full for h in held), (full, held)
    # the written directory is the base LLM with the trained adapters merged; the base did not move
    llm, _ = load_llama(str(setup / "llm"))
    add_lora(llm, 4, 16.0)
    llm.load_state_dict(llm_weights(ours), strict=False)
    assert_transformers_reads(tmp_path / "stage2" / "llm", llm)


def process_tree(pid):
    """pid and every process below it (torchrun starts its workers in sessions of their own)."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return [pid] + [p for c in children for p in process_tree(c)]


def test_fsdp_offloaded_full_killed_and_resumed_equals_ddp(setup, ddp_lora_run, tmp_path):
    """Full fine-tune under FSDP with CPU offload, gradient checkpointing and --grad_accum 2 at batch 2: killed
    once stage 2 has written a checkpoint, then resumed; its stage 1 equals the DDP run's, and its
    stage 2 equals an uninterrupted DDP run at batch 4 from the same projector."""
    out = tmp_path / "fsdp"
    # 5 evaluation questions at batch 2: rank 0 runs two generate calls, rank 1 one (no collective may be left waiting)
    args = common_args(setup, out) + STEPS + ["--fsdp", "--cpu_offload", "--grad_checkpointing", "--batch_size", "2",
                                             "--grad_accum", "2", "--checkpoint_every", "1", "--eval_samples", "5"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    process = subprocess.Popen(launcher + [os.path.join(HERE, "train_llava.py")] + args, cwd=HERE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 200
    while not (out / "stage2" / "ckpt.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in process_tree(process.pid):
        os.kill(pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(out / "stage2" / "ckpt.pt", weights_only=False)["step"]
    assert killed_at < 3
    resumed = run(args + ["--resume"], nproc=2)
    assert f"resumed from {out / 'stage2' / 'ckpt.pt'} at step {killed_at}/3" in resumed.stdout
    shutil.copytree(out / "stage1", tmp_path / "ddp" / "stage1")
    run(common_args(setup, tmp_path / "ddp") + STEPS + ["--stage", "2", "--batch_size", "4"], nproc=2)
    fsdp, ddp = (torch.load(tmp_path / name / "stage2" / "ckpt.pt", weights_only=False) for name in ("fsdp", "ddp"))
    assert fsdp["step"] == 3
    ddp_lora_out, _ = ddp_lora_run  # stage 1 does not depend on LoRA: the same run under DDP
    assert_same_weights(torch.load(out / "stage1" / "ckpt.pt", weights_only=False)["model"],
                        torch.load(ddp_lora_out / "stage1" / "ckpt.pt", weights_only=False)["model"])
    base, _ = load_llama(str(setup / "llm"))
    assert_same_weights(fsdp["model"], ddp["model"], {"llm." + k: v for k, v in base.state_dict().items()} |
                        {k: v for k, v in fsdp["model"].items() if k.startswith("projector.")})
    for k, state in ddp["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fsdp["optimizer"]["state"][k][name], state[name], atol=1e-6, rtol=1e-4)
    full, held = shard_bytes(resumed.stdout, 2)
    assert all(abs(h - full / 2) < 0.02 * full for h in held), (full, held)
    llm = Llama(base.cfg)
    llm.load_state_dict(llm_weights(fsdp))
    assert_transformers_reads(out / "stage2" / "llm", llm)


def test_missing_image_is_skipped_and_counted_then_resume(setup):
    out = setup / "resume"
    args = common_args(setup, out) + ["--stage", "1", "--batch_size", "26", "--epochs_stage1", "3", "--projector", "linear"]
    # 26 entries in a batch of 26: one step an epoch
    run(args + ["--max_steps", "2"])
    assert [r["skipped_samples"] for r in records(out)] == [1, 1]
    result = run(args + ["--resume"])
    assert "resumed from" in result.stdout and "at step 2/3" in result.stdout
    assert records(out)[-1]["step"] == 3


@pytest.mark.parametrize("entry,message", [
    ({"id": "a", "image": "0.jpg", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
     "has an image but no <image>"),
    ({"id": "b", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]},
     "has <image> in its conversation but no \"image\""),
])
def test_bad_entries_stop_with_one_line(setup, tmp_path, entry, message):
    (tmp_path / "bad.json").write_text(json.dumps([entry]))
    args = common_args(setup, tmp_path / "out")
    args[args.index("--instruct_data") + 1] = str(tmp_path / "bad.json")
    result = run(args + ["--stage", "2"], check=False)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def varied_llava(tokenizer_file, llm_dir):
    """A compress-4 LLaVA whose random weights are large enough that its answers depend on the
    question and the image (the small init gives one answer whatever it is asked); its LLM
    written to llm_dir."""
    torch.manual_seed(1)
    llm = Llama(replace(LLAMA_CONFIGS["tiny"], vocab_size=120))  # the tokenizer's 120 pieces: every answer decodes
    model = LLaVA(CLIP(make_config("tiny", compress=4)).visual, llm)
    with torch.no_grad():
        for name, p in list(model.llm.named_parameters()) + list(model.projector.named_parameters()):
            if "norm" not in name:
                p.normal_(0, 1.0 if "embed" in name else 0.3)
    save_llama(model.llm, tokenizer_file, str(llm_dir))
    return model


def test_evaluation_and_sample_llava_answer_and_score_alike(setup, tokenizer_file, tmp_path):
    """train_llava.py's evaluation (2 ranks, batch 2) and sample_llava.py on the same questions
    (1 rank, batch 16) give the same answer to every question and the same exact match."""
    varied_llava(tokenizer_file, tmp_path / "llm")
    args = common_args(setup, tmp_path / "run")
    args[args.index("--llm") + 1] = str(tmp_path / "llm")
    run(args + ["--stage", "1", "--max_steps", "1", "--batch_size", "2"], nproc=2)
    evaluated = [json.loads(line) for line in (tmp_path / "run" / "stage1" / "eval_answers.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in evaluated) == [str(i) for i in range(6)]
    assert all(e["expected"].startswith("the shape is ") and e["question"] == "<image>\nwhere is the green ring"
               for e in evaluated)
    result = run(["--out_dir", str(tmp_path / "run"), "--question_file", str(setup / "eval.json"), "--image_folder",
                  str(setup / "images"), "--max_new_tokens", "3", "--answers_file", str(tmp_path / "sampled.jsonl")],
                 script="sample_llava.py")
    sampled = {a["question_id"]: a["text"] for a in map(json.loads, (tmp_path / "sampled.jsonl").read_text().splitlines())}
    assert {e["id"]: e["answer"] for e in evaluated} == sampled
    assert len(set(sampled.values())) > 1  # answers that depend on the image: a real comparison
    score = float(re.search(r"exact_match ([\d.]+) eval_questions 6", result.stdout).group(1))
    assert score == pytest.approx(records(tmp_path / "run")[-1]["exact_match"], abs=0.01)


# ----------------------------------------------------------------------------- benchmark answer files (sample_llava.py)

def test_question_file_answered_in_order_the_same_on_one_and_two_ranks(setup, tokenizer_file):
    """LLaVA's question file (JSON lines) on 1 rank and the same questions as ScienceQA's JSON list on
    2 ranks, batched differently: every question answered once, in order, LLaVA's fields, same answers."""
    root = setup / "answering"
    model = varied_llava(tokenizer_file, root / "llm")
    run_config = {"model": "tiny", "compress": 4.0, "quick_gelu": False, "projector": "mlp2x_gelu", "feature_layer": -2}
    os.makedirs(root / "run" / "stage2")
    torch.save({"model": {"projector." + k: v for k, v in model.projector.state_dict().items()}, "run_config": run_config,
                "sources": {"vision": str(setup / "clip.pt"), "llm": str(root / "llm")}, "lora": None},
               root / "run" / "stage2" / "ckpt.pt")
    questions = [{"question_id": i if i % 3 else f"q{i}", "image": f"{i}.jpg", "text": "where is the green ring"}
                 for i in range(8)]
    questions[2]["category"] = "colour"
    questions[5]["text"] = "it is a blue circle\nA. red\nB. blue\nC. a yellow cross"
    questions.insert(4, {"question_id": "text-only", "text": "the shape is red"})
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "science.json").write_text(json.dumps([
        {"id": q["question_id"], **({"image": q["image"]} if "image" in q else {}), "conversations": [
            {"from": "human", "value": ("<image>\n" if "image" in q else "") + q["text"]}, {"from": "gpt", "value": "A"}]}
        for q in questions]))
    common = ["--out_dir", str(root / "run"), "--image_folder", str(setup / "images"), "--single_pred_prompt",
              "--max_new_tokens", "4"]
    run(common + ["--question_file", str(root / "questions.jsonl"), "--batch_size", "4"], script="sample_llava.py")
    run(common + ["--question_file", str(root / "science.json"), "--batch_size", "3", "--answers_file",
                  str(root / "two.jsonl"), "--model_id", "two"], nproc=2, script="sample_llava.py")
    one = [json.loads(line) for line in (root / "run" / "answers" / "questions.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (root / "two.jsonl").read_text().splitlines()]
    for answers, model_id, image_mark in ((one, "run", ""), (two, "two", "<image>\n")):
        assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
        assert all(list(a) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"] for a in answers)
        assert all(a["model_id"] == model_id and a["metadata"] == {} and len(a["answer_id"]) == 32 for a in answers)
        # as LLaVA records them: model_vqa_loader the text, model_vqa_science "<image>\n" + text for an image
        assert [a["prompt"] for a in answers] == [(image_mark if "image" in q else "") + q["text"] +
                                                  "\nAnswer with the option's letter from the given choices directly."
                                                  for q in questions]
    assert [a["text"] for a in one] == [a["text"] for a in two]
    assert len({a["text"] for a in one}) > 2  # answers depend on the question and image

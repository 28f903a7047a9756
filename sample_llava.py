"""Answer a prompt about an image with a LLaVA trained by train_llava.py (greedy decoding),
or every question of a LLaVA benchmark question file into LLaVA's answers file.

    python sample_llava.py --out_dir out/llava_c4 --image data/shapes_llava/images/val/00000.jpg \\
        --prompt "What colour is the shape?"
    torchrun --nproc_per_node=8 sample_llava.py --out_dir out/llava_c4 --question_file llava_textvqa_val_v051_ocr.jsonl \\
        --image_folder textvqa/train_images --answers_file answers/textvqa.jsonl
    python sample_llava.py --out_dir out/llava_c4 --question_file llava_test_CQM-A.json \\
        --image_folder scienceqa/images/test --single_pred_prompt --answers_file answers/scienceqa.jsonl

The model is rebuilt from what its checkpoint records: the image tower and LLM paths it
was trained from, the projector, the feature layer and the LoRA settings.

Question files are LLaVA's: JSON lines {"question_id", "image" (optional), "text",
"category" (optional)} as its model_vqa / model_vqa_loader read them (POPE, GQA, TextVQA,
MME, MM-Vet, ...), or ScienceQA's JSON list {"id", "image" (optional), "conversations":
[{"from": "human", "value": ...}, ...]} as model_vqa_science reads it. Each question is
asked as LLaVA does ("<image>\\n" + text, Vicuna-v1's template); --single_pred_prompt adds
LLaVA's line "Answer with the option's letter from the given choices directly." for
multiple choice. Questions are split over ranks (rank r takes every world_size-th one),
answered batch_size at a time, and merged on rank 0 into one answers file in question
order, one JSON line per question as LLaVA writes them: {"question_id", "prompt", "text",
"answer_id", "model_id", "metadata": {}}, so the benchmarks' official scorers read it
unchanged (for ScienceQA's JSON the prompt starts with "<image>\\n" where there is an
image, as model_vqa_science writes it). answer_id is a UUID made from model_id and
question_id (LLaVA draws a random one), so a rerun writes the same file. A file of LLaVA's
conversations with answers (train_llava.py's --eval_data, data/shapes_llava/val.json) is also
scored by exact match with its first answers, as train_llava.py's evaluation scores it.
"""
import glob
import json
import os
import uuid

import torch
import torch.distributed as dist

from common import Progress, autocast_context, check_writable, die, load_image_tower, parse_overrides, setup_distributed
from llama import add_lora
from model import LLaVA
from text import answer_questions, exact_match, load_llama

_before = set(globals())  # what the defaults block below adds are the script's options
# -----------------------------------------------------------------------------
# defaults
out_dir = ""                # train_llava.py's output folder (its stage 2 checkpoint, else stage 1's); empty = the newest run under out/
ckpt = ""                   # a train_llava.py stage checkpoint instead of the newest one in out_dir
image = ""                  # the image asked about; empty = a text-only prompt
prompt = ""                 # the user's question
question_file = ""          # LLaVA's question file (JSON lines, or ScienceQA's JSON list): answer all of it instead
image_folder = ""           # the question file's image paths are relative to it
answers_file = ""           # where LLaVA's answers file goes; empty = out_dir/answers/<question file's name>.jsonl
single_pred_prompt = False  # multiple choice (ScienceQA): ask for the option's letter, as LLaVA's --single-pred-prompt
model_id = ""               # the answers' model_id; empty = the checkpoint's run folder name
batch_size = 16             # questions per generate call, per rank
max_new_tokens = 32
dtype = "auto"              # auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float16 | float32
config = parse_overrides(globals(), _before)
globals().update(config)
# -----------------------------------------------------------------------------

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."  # LLaVA's words


def read_questions(path):
    """LLaVA's question file -> [{"question_id", "image" or None, "text", "science", "kind", "expected"}],
    checked; a bad entry stops the run. science marks ScienceQA's JSON (LLaVA's conversations), whose
    answers' prompt LLaVA starts with "<image>\\n"; its first answer is `expected` (else None)."""
    try:
        with open(path) as f:
            content = f.read()
    except OSError as e:
        die(f"cannot read --question_file {path} ({e})")
    try:
        entries = json.loads(content) if content.lstrip().startswith("[") else \
            [json.loads(line) for line in content.splitlines() if line.strip()]
    except ValueError as e:
        die(f"{path} is neither JSON lines nor a JSON list ({e})")
    questions = []
    for n, entry in enumerate(entries):
        if isinstance(entry, dict) and "conversations" in entry:  # ScienceQA's LLaVA JSON: the first human turn
            turns = entry["conversations"]
            text = turns[0].get("value") if turns and isinstance(turns[0], dict) else None
            answer = turns[1].get("value") if len(turns) > 1 and isinstance(turns[1], dict) else None
            entry = {"question_id": entry.get("id"), "image": entry.get("image"), "science": True, "kind": entry.get("kind"),
                     "text": text.replace("<image>", "").strip() if isinstance(text, str) else None, "expected": answer}
        if not isinstance(entry, dict) or entry.get("question_id") is None or not isinstance(entry.get("text"), str):
            die(f"{path}: entry {n + 1} has no question_id and text (or id and conversations)")
        questions.append({"question_id": entry["question_id"], "image": entry.get("image"), "text": entry["text"],
                          "science": entry.get("science", False), "kind": entry.get("kind"),
                          "expected": entry.get("expected")})
    if not questions:
        die(f"{path} holds no questions")
    return questions


# ----------------------------------------------------------------------------- set-up

if not prompt and not question_file:
    die("give --prompt (and usually --image), or --question_file")
if max_new_tokens < 1:
    die(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
if batch_size < 1:
    die(f"--batch_size must be at least 1, got {batch_size}")
if image and not os.path.isfile(image):
    die(f"no image at {image}")
if answers_file:
    check_writable(os.path.dirname(answers_file) or ".", "--answers_file")
questions = read_questions(question_file) if question_file else []
missing = [q["image"] for q in questions if q["image"] and not os.path.isfile(os.path.join(image_folder, q["image"]))]
if missing:  # checked on every rank before any work: all stop together, nothing half-written
    die(f"{len(missing)} image(s) of {question_file} not found under --image_folder {image_folder or '.'}, e.g. {missing[0]}")
rank, world_size, device = setup_distributed()
dtype, autocast = autocast_context(device, dtype, ("bfloat16", "float16", "float32"))
if not out_dir and not ckpt:  # the run train_llava.py wrote last
    runs = sorted(glob.glob(os.path.join("out", "*", "stage[12]", "ckpt.pt")), key=os.path.getmtime)
    if not runs:
        die("no LLaVA checkpoint under out/; run `python train_llava.py` first, or give --out_dir or --ckpt")
    out_dir = os.path.dirname(os.path.dirname(runs[-1]))
    if rank == 0:
        print(f"the newest LLaVA run: {out_dir}", flush=True)
out_dir = out_dir or os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
ckpt = ckpt or next((p for p in (os.path.join(out_dir, f"stage{s}", "ckpt.pt") for s in (2, 1)) if os.path.isfile(p)), "")
if not os.path.isfile(ckpt):
    die(f"no LLaVA checkpoint under {out_dir}; run `python train_llava.py` first, or give --out_dir or --ckpt")
try:
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    run, sources, lora = saved["run_config"], saved["sources"], saved["lora"]
    tower = (sources["vision"], run["model"], run["compress"], run["quick_gelu"], run.get("reducer") or "drip")
    projector, feature_layer = run["projector"], run["feature_layer"]
except Exception as e:  # another file, or a checkpoint from before the flags were unified (--vision_model)
    die(f"{ckpt} is not a train_llava.py checkpoint of this version ({type(e).__name__}: {e})")

visual, _ = load_image_tower(*tower)
language_model, tok = load_llama(sources["llm"])
if lora:
    add_lora(language_model, *lora)
model = LLaVA(visual, language_model, projector, feature_layer)
if model.load_state_dict(saved["model"], strict=False).unexpected_keys:  # it holds the trained parts only
    die(f"{ckpt} does not fit the model its own run config describes")
model.to(device).eval()

# ----------------------------------------------------------------------------- one prompt

if not question_file:
    answer, = answer_questions(model, tok, [(prompt, image and os.path.abspath(image))], "", device, autocast,
                               max_new_tokens)
    if answer is None:
        die(f"cannot read the image {image}")
    print(answer)
    raise SystemExit(0)

# ----------------------------------------------------------------------------- a benchmark's question file

model_id = model_id or os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))))
answers_file = answers_file or os.path.join(out_dir, "answers", os.path.splitext(os.path.basename(question_file))[0] + ".jsonl")
for q in questions:  # the question asked, and the prompt recorded as LLaVA records it
    q["prompt"] = q["text"] + ("\n" + SINGLE_PRED_PROMPT if single_pred_prompt else "")
    q["recorded"] = ("<image>\n" if q["science"] and q["image"] else "") + q["prompt"]
mine = list(range(rank, len(questions), world_size))  # this rank's questions, by index
answered = []                                          # (index, answer text)
batches = -(-len(mine) // batch_size)
progress = Progress(0, max(1, batches), max(1, batches), "questions")
if rank == 0:
    print(f"{len(questions)} questions of {question_file}, {world_size} rank(s), {batches} batches of {batch_size} "
          f"a rank, {device} {dtype}", flush=True)
for start in range(0, len(mine), batch_size):
    batch = mine[start:start + batch_size]
    answers = answer_questions(model, tok, [(questions[i]["prompt"], questions[i]["image"]) for i in batch], image_folder,
                               device, autocast, max_new_tokens)
    if None in answers:
        die(f"question {questions[batch[answers.index(None)]]['question_id']}: cannot read its image under --image_folder")
    answered += zip(batch, answers)
    progress.advance(len(batch) * world_size)
    if rank == 0:
        print(f"batch {progress.step}/{batches} {progress.report()}", flush=True)
if world_size > 1:
    parts = [None] * world_size if rank == 0 else None
    dist.gather_object(answered, parts, dst=0)
    answered = [a for part in parts for a in part] if rank == 0 else []
if rank == 0:
    text_of = dict(answered)
    os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
    tmp = answers_file + ".tmp"
    with open(tmp, "w") as f:
        for i, q in enumerate(questions):  # question order, whatever rank answered
            f.write(json.dumps({"question_id": q["question_id"], "prompt": q["recorded"], "text": text_of[i],
                                "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{q['question_id']}").hex,
                                "model_id": model_id, "metadata": {}}) + "\n")
    os.replace(tmp, answers_file)  # a crash never leaves half an answers file
    print(f"{len(questions)} answers written to {answers_file}")
    if all(isinstance(q["expected"], str) for q in questions):  # LLaVA's training JSON: scored as train_llava.py scores it
        score = exact_match([text_of[i] for i in range(len(questions))], [q["expected"] for q in questions],
                            [q["kind"] for q in questions])
        print("against the file's first answers: " + " ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                              for k, v in score.items()))
if dist.is_initialized():
    dist.destroy_process_group()

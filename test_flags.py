"""Every script with bad flag values and paths: each case must stop with exit code != 0, exactly one
line of error text naming the problem, no traceback, and nothing written; --help prints the defaults.

Hundreds of runs that each import torch would take minutes on a small CPU, so one worker process
(this file run as a script) imports the project's modules once and runs every case in a fork of
itself (runpy.run_path with sys.argv set, in a fresh empty working directory), recording the exit
code, stdout, stderr and the files the case left behind.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["train_clip.py", "train_imagenet.py", "train_llava.py", "sample_llava.py", "flops.py", "visualize.py",
           "gpu_check.py", "grid.py"]
F = "{F}"  # stands for the fixtures folder in the table below


def defaults(script):
    """A script's defaults block (what --help prints) and its options: the names the block assigns, with values."""
    from common import defaults_block
    block, namespace = defaults_block(os.path.join(HERE, script)), {}
    exec("\n".join(block), namespace)
    return block, {k: v for k, v in namespace.items() if k != "__builtins__"}


def wrong_type_cases():
    """--flag=<a value of the wrong type> for every int, float and bool option of the defaults-block scripts."""
    cases = []
    for script in SCRIPTS[:4]:
        for name, value in defaults(script)[1].items():
            if isinstance(value, bool):
                cases.append((script, [f"--{name}=maybe"], f"--{name} expects true or false"))
            elif isinstance(value, int):
                cases.append((script, [f"--{name}", "1.5"], f"--{name} expects an integer"))
            elif isinstance(value, float):
                cases.append((script, [f"--{name}", "fast"], f"--{name} expects a finite number"))
    return cases


C4 = ["--init_from", f"{F}/clip_c4.pt"]  # a compress-4 train_clip.py checkpoint
CLIP_DATA = ["--val_data", f"{F}/folder", "--classnames", f"{F}/classnames.txt"]
LLAVA_DATA = ["--pretrain_data", f"{F}/conversations.json", "--instruct_data", f"{F}/conversations.json",
              "--eval_data", f"{F}/conversations.json", "--image_folder", f"{F}/folder"]
BAD_VALUES = [
    # the cases
    ("train_clip.py", ["--batch_size", "0"], "--batch_size must be > 0"),
    ("train_clip.py", ["--batch_size", "-4"], "--batch_size must be > 0"),
    ("train_clip.py", ["--lr", "-1"], "--lr must be > 0"),
    ("train_clip.py", ["--epochs", "0"], "--epochs must be > 0"),
    ("train_clip.py", ["--val_data", f"{F}/empty"], "is not an ImageFolder"),
    ("train_clip.py", ["--data_dir", f"{F}/notes.txt/data"], "--data_dir"),
    ("train_imagenet.py", ["--train_data", f"{F}/shard.tar"], "--train_data and --val_data go together"),
    ("train_llava.py", ["--IGNORE", "5"], "unknown option --IGNORE"),
    ("train_llava.py", ["--SYSTEM", "hi"], "unknown option --SYSTEM"),
    ("train_llava.py", ["--VAL_SEED_OFFSET", "1"], "unknown option --VAL_SEED_OFFSET"),
    ("train_llava.py", C4 + ["--compress", "2"], "--compress 2 contradicts"),
    ("train_imagenet.py", C4 + ["--compress", "2"], "--compress 2 contradicts"),
    ("train_imagenet.py", C4 + ["--model", "ViT-B-32"], "--model ViT-B-32 contradicts"),
    ("flops.py", ["--ckpt", f"{F}/clip_c4.pt"], "--ckpt and --images go together"),
    ("gpu_check.py", [], "no CUDA GPU is visible"),
    ("train_clip.py", ["--data_dir", "/proc/forbidden"], "--data_dir /proc/forbidden: cannot write under /proc"),
    ("grid.py", ["--compress", "1"], "--compress values must be > 1 (the plain ViT is --plain)"),
    ("grid.py", ["--jobs", "0"], "--jobs and --epochs must be >= 1"),
    ("grid.py", ["--seeds", "-1"], "--seeds >= 0"),
    ("grid.py", ["--reducer", "pool"], "argument --reducer: invalid choice"),
    ("grid.py", ["--boundaries", "entropy"], "--boundaries entropy is DRIP's predictor: give --reducer drip"),
    ("grid.py", ["--out_dir", "/proc/forbidden"], "--out_dir /proc/forbidden: cannot write under /proc"),
    ("train_imagenet.py", ["--reducer", "pooling"], '--reducer must be one of "" (empty), drip, uniform'),
    ("gpu_check.py", ["--batch_size", "0"], "--batch_size must be >= 1"),
    ("gpu_check.py", ["--batch_size", "many"], "--batch_size: invalid int value"),
    ("gpu_check.py", ["--out_dir", f"{F}/shard.tar/report"], "--out_dir"),
    # the flag parser itself
    ("train_clip.py", ["--bogus", "1"], "unknown option --bogus"),
    ("train_clip.py", ["--epoch", "1"], "did you mean --epochs?"),
    ("train_clip.py", ["epochs=1"], "unexpected argument"),
    ("train_clip.py", ["--epochs"], "--epochs needs a value"),
    ("train_clip.py", ["--lr", "nan"], "--lr expects a finite number"),
    # train_clip.py, every option
    ("train_clip.py", ["--model", "ViT-X"], "--model must be one of"),
    ("train_clip.py", ["--reducer", "pool"], "--reducer must be one of"),
    ("train_clip.py", ["--boundaries", "spikes"], "--boundaries must be one of gumbel, entropy"),
    ("train_clip.py", ["--boundaries", "entropy", "--reducer", "tome", "--compress", "4"],
     "--boundaries entropy trains DRIP's boundary predictor: it needs --compress > 1 and --reducer drip"),
    ("train_clip.py", ["--compress", "0.5"], "compress must be a number >= 1"),
    ("train_clip.py", ["--pre_layers", "-1"], "--pre_layers must be >= 0"),
    ("train_clip.py", ["--compress", "4", "--pre_layers", "9"], "pre_layers must be between 1 and layers-1"),
    ("train_clip.py", ["--train_data", f"{F}/missing-{{0..3}}.tar", "--train_num_samples", "10"] + CLIP_DATA,
     "--train_data: shard missing or empty"),
    ("train_clip.py", ["--train_data", f"{F}/shard.tar"] + CLIP_DATA, "--train_num_samples is required"),
    ("train_clip.py", ["--train_data", f"{F}/shard.tar", "--train_num_samples", "10"], "--val_data DIR is required"),
    ("train_clip.py", ["--train_num_samples", "-1"], "--train_num_samples must be >= 0"),
    ("train_clip.py", ["--val_data", f"{F}/notes.txt"], "is not a folder"),
    ("train_clip.py", ["--classnames", f"{F}/nothing.txt"], "--classnames: no class name file"),
    ("train_clip.py", ["--tokenizer", f"{F}/nothing.json"], "--tokenizer: no tokenizer file"),
    ("train_clip.py", ["--templates", f"{F}/nothing.txt"], "--templates"),
    ("train_clip.py", ["--templates", f"{F}/notes.txt"], "every line needs exactly one {}"),
    ("train_clip.py", ["--init_from", f"{F}/notes.txt"], "cannot read weights"),
    ("train_clip.py", ["--init_from", f"{F}/nothing.pt"], "no weights file"),
    ("train_clip.py", ["--init_from", f"{F}/wrong_size.pt"], "weights of another model size"),
    ("train_clip.py", ["--out_dir", f"{F}/notes.txt/out"], "--out_dir"),
    ("train_clip.py", ["--warmup_steps", "-1"], "--warmup_steps must be >= 0"),
    ("train_clip.py", ["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    ("train_clip.py", ["--beta1", "1.5"], "--beta1 must be in [0, 1)"),
    ("train_clip.py", ["--beta2", "-0.1"], "--beta2 must be in [0, 1)"),
    ("train_clip.py", ["--eps", "0"], "--eps must be > 0"),
    ("train_clip.py", ["--boundary_loss_weight", "-1"], "--boundary_loss_weight must be >= 0"),
    ("train_clip.py", ["--grad_clip", "-1"], "--grad_clip must be >= 0"),
    ("train_clip.py", ["--workers", "-1"], "--workers must be >= 0"),
    ("train_clip.py", ["--seed", "-1"], "--seed must be >= 0"),
    ("train_clip.py", ["--dtype", "float16"], "--dtype must be auto or one of"),
    ("train_clip.py", ["--log_every", "0"], "--log_every must be > 0"),
    ("train_clip.py", ["--checkpoint_every", "0"], "--checkpoint_every must be > 0"),
    ("train_clip.py", ["--resume"], "--resume: no checkpoint"),
    ("train_clip.py", ["--max_steps", "-1"], "--max_steps must be >= 0"),
    ("train_clip.py", ["--eval_only"], "--eval_only evaluates --init_from weights"),
    ("train_clip.py", C4 + ["--eval_only", "--compress", "2"], "--compress 2 contradicts"),
    # train_imagenet.py, every option
    ("train_imagenet.py", ["--model", "ViT-X"], "--model must be one of"),
    ("train_imagenet.py", ["--reducer", "pool"], "--reducer must be one of"),
    ("train_imagenet.py", ["--boundaries", "spikes"], '--boundaries must be one of "" (empty), gumbel, entropy'),
    ("train_imagenet.py", ["--boundaries", "entropy"], "--boundaries entropy trains DRIP's boundary predictor"),
    ("train_imagenet.py", ["--compress", "-1"], "--compress must be >= 0"),
    ("train_imagenet.py", ["--compress", "0.5"], "compress must be a number >= 1"),
    ("train_imagenet.py", ["--train_data", f"{F}/missing-{{0..3}}.tar", "--val_data", f"{F}/shard.tar"],
     "--train_data: shard missing or empty"),
    ("train_imagenet.py", ["--train_data", f"{F}/shard.tar", "--val_data", f"{F}/shard.tar"],
     "need --train_num_samples (per epoch) and --num_classes"),
    ("train_imagenet.py", ["--train_data", f"{F}/empty", "--val_data", f"{F}/folder"], "is not an ImageFolder"),
    ("train_imagenet.py", ["--train_data", f"{F}/folder", "--val_data", f"{F}/empty"], "is not an ImageFolder"),
    ("train_imagenet.py", ["--train_num_samples", "-1"], "--train_num_samples must be >= 0"),
    ("train_imagenet.py", ["--num_classes", "-1"], "--num_classes must be >= 0"),
    ("train_imagenet.py", ["--data_dir", f"{F}/notes.txt/data"], "--data_dir"),
    ("train_imagenet.py", ["--data_dir", f"{F}/imagenet"], "give --train_data"),
    ("train_imagenet.py", ["--init_from", f"{F}/notes.txt"], "cannot read weights"),
    ("train_imagenet.py", ["--init_from", f"{F}/wrong_size.pt"], "weights of another model size"),
    ("train_imagenet.py", ["--backbone_lr_scale", "0"], "--backbone_lr_scale must be > 0"),
    ("train_imagenet.py", ["--out_dir", f"{F}/notes.txt/out"], "--out_dir"),
    ("train_imagenet.py", ["--epochs", "0"], "--epochs must be > 0"),
    ("train_imagenet.py", ["--batch_size", "-4"], "--batch_size must be > 0"),
    ("train_imagenet.py", ["--lr", "-1"], "--lr must be > 0"),
    ("train_imagenet.py", ["--warmup_steps", "-1"], "--warmup_steps must be >= 0"),
    ("train_imagenet.py", ["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    ("train_imagenet.py", ["--label_smoothing", "1"], "--label_smoothing must be in [0, 1)"),
    ("train_imagenet.py", ["--mixup", "-1"], "--mixup must be >= 0"),
    ("train_imagenet.py", ["--boundary_loss_weight", "-1"], "--boundary_loss_weight must be >= 0"),
    ("train_imagenet.py", ["--workers", "-1"], "--workers must be >= 0"),
    ("train_imagenet.py", ["--seed", "-1"], "--seed must be >= 0"),
    ("train_imagenet.py", ["--dtype", "float16"], "--dtype must be auto or one of"),
    ("train_imagenet.py", ["--log_every", "0"], "--log_every must be > 0"),
    ("train_imagenet.py", ["--checkpoint_every", "0"], "--checkpoint_every must be > 0"),
    ("train_imagenet.py", ["--resume"], "--resume: no checkpoint at out/imagenet_tiny_c1/ckpt.pt"),
    ("train_imagenet.py", C4 + ["--resume"], "--resume: no checkpoint at out/imagenet_tiny_c4/ckpt.pt"),
    ("train_imagenet.py", ["--max_steps", "-1"], "--max_steps must be >= 0"),
    ("train_imagenet.py", ["--lr_find_steps", "0"], "--lr_find_steps must be > 0"),
    # train_llava.py, every option
    ("train_llava.py", ["--stage", "3"], "--stage must be one of"),
    ("train_llava.py", [], "no CLIP image tower at out/clip_tiny_c1/ckpt.pt"),
    ("train_llava.py", ["--init_from", f"{F}/notes.txt"], "cannot read weights"),
    ("train_llava.py", ["--init_from", f"{F}/text_tower_only.pt"], "lacks image tower weights (visual."),
    ("train_llava.py", ["--init_from", f"{F}/wrong_size.pt"], "weights of another model size"),
    ("train_llava.py", ["--model", "ViT-X"], "--model must be one of"),
    ("train_llava.py", ["--reducer", "pool"], "--reducer must be one of"),
    ("train_llava.py", ["--compress", "0.5"], "--compress must be 0 (the tower's) or >= 1"),
    ("train_llava.py", ["--compress", "-1"], "--compress must be >= 0"),
    ("train_llava.py", C4 + ["--feature_layer", "4"], "--feature_layer must index one of the tower's 4 blocks"),
    ("train_llava.py", ["--projector", "mlp3"], "--projector must be one of"),
    ("train_llava.py", ["--llm", f"{F}/empty"], "is not a Hugging Face model directory"),
    ("train_llava.py", ["--llm", f"{F}/llm", "--stage", "0"], "with --llm there is nothing to do"),
    ("train_llava.py", ["--llm_model", "huge"], "--llm_model must be one of"),
    ("train_llava.py", ["--pretrain_data", f"{F}/nothing.json", "--image_folder", f"{F}/folder"],
     "--pretrain_data: no LLaVA JSON"),
    ("train_llava.py", ["--instruct_data", f"{F}/nothing.json", "--image_folder", f"{F}/folder"],
     "--instruct_data: no LLaVA JSON"),
    ("train_llava.py", ["--eval_data", f"{F}/nothing.json", "--image_folder", f"{F}/folder"], "--eval_data: no LLaVA JSON"),
    ("train_llava.py", C4 + LLAVA_DATA[:-2] + ["--image_folder", f"{F}/folder", "--pretrain_data", f"{F}/notes.txt"],
     "give a LLaVA-format JSON list"),
    ("train_llava.py", ["--pretrain_data", f"{F}/conversations.json"], "--image_folder is required"),
    ("train_llava.py", LLAVA_DATA[:-1] + [f"{F}/notes.txt"], "--image_folder"),
    ("train_llava.py", ["--data_dir", f"{F}/notes.txt/data"], "--data_dir"),
    ("train_llava.py", C4 + ["--out_dir", f"{F}/notes.txt/out"], "--out_dir"),
    # the output folder is named from the tower's compression (4), not from --compress's default
    ("train_llava.py", C4 + LLAVA_DATA + ["--stage", "2"], "out/llava_c4/stage1/ckpt.pt does not exist; run --stage 1 first"),
    ("train_llava.py", ["--steps_stage0", "0"], "--steps_stage0 must be > 0"),
    ("train_llava.py", ["--lr_stage0", "0"], "--lr_stage0 must be > 0"),
    ("train_llava.py", ["--epochs_stage1", "0"], "--epochs_stage1 must be > 0"),
    ("train_llava.py", ["--lr_stage1", "-1"], "--lr_stage1 must be > 0"),
    ("train_llava.py", ["--epochs_stage2", "-1"], "--epochs_stage2 must be > 0"),
    ("train_llava.py", ["--lr_stage2", "-1"], "--lr_stage2 must be >= 0"),
    ("train_llava.py", ["--lora_r", "-1"], "--lora_r must be >= 0"),
    ("train_llava.py", ["--lora_alpha", "0"], "--lora_alpha must be > 0"),
    ("train_llava.py", ["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    ("train_llava.py", ["--batch_size", "0"], "--batch_size must be > 0"),
    ("train_llava.py", ["--max_length", "-1"], "--max_length must be >= 0"),
    ("train_llava.py", ["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1)"),
    ("train_llava.py", ["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    ("train_llava.py", ["--grad_clip", "-1"], "--grad_clip must be >= 0"),
    ("train_llava.py", ["--workers", "-1"], "--workers must be >= 0"),
    ("train_llava.py", ["--seed", "-1"], "--seed must be >= 0"),
    ("train_llava.py", ["--dtype", "int8"], "--dtype must be auto or one of"),
    ("train_llava.py", ["--log_every", "0"], "--log_every must be > 0"),
    ("train_llava.py", ["--checkpoint_every", "0"], "--checkpoint_every must be > 0"),
    ("train_llava.py", ["--max_steps", "-1"], "--max_steps must be >= 0"),
    ("train_llava.py", ["--eval_samples", "-1"], "--eval_samples must be >= 0"),
    ("train_llava.py", ["--max_new_tokens", "0"], "--max_new_tokens must be > 0"),
    ("train_llava.py", ["--grad_accum", "0"], "--grad_accum must be > 0"),
    ("train_llava.py", ["--fsdp"], "launch with torchrun"),
    ("train_llava.py", ["--cpu_offload"], "add --fsdp"),
    # sample_llava.py, every option
    ("sample_llava.py", ["--prompt", ""], "give --prompt"),
    ("sample_llava.py", ["--prompt", "hi"], "no LLaVA checkpoint under out/; run `python train_llava.py` first"),
    ("sample_llava.py", ["--prompt", "hi", "--out_dir", f"{F}/empty"], "no LLaVA checkpoint under"),
    ("sample_llava.py", ["--prompt", "hi", "--ckpt", f"{F}/notes.txt"], "is not a train_llava.py checkpoint"),
    ("sample_llava.py", ["--prompt", "hi", "--ckpt", f"{F}/clip_c4.pt"], "is not a train_llava.py checkpoint"),
    ("sample_llava.py", ["--prompt", "hi", "--image", f"{F}/nothing.jpg"], "no image at"),
    ("sample_llava.py", ["--prompt", "hi", "--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    ("sample_llava.py", ["--prompt", "hi", "--dtype", "int8"], "--dtype must be auto or one of"),
    ("sample_llava.py", ["--question_file", f"{F}/nothing.jsonl"], "cannot read --question_file"),
    ("sample_llava.py", ["--question_file", f"{F}/notes.txt"], "is neither JSON lines nor a JSON list"),
    ("sample_llava.py", ["--question_file", f"{F}/questions.jsonl", "--image_folder", f"{F}/empty"],
     "not found under --image_folder"),
    ("sample_llava.py", ["--question_file", f"{F}/questions.jsonl", "--image_folder", f"{F}/folder",
                         "--answers_file", f"{F}/notes.txt/answers.jsonl"], "--answers_file"),
    ("sample_llava.py", ["--prompt", "hi", "--batch_size", "0"], "--batch_size must be at least 1"),
    # flops.py (argparse: it takes lists), every option
    ("flops.py", ["--model", "ViT-X"], "unknown model"),
    ("flops.py", ["--compress", "0.5"], "--compress values must be >= 1"),
    ("flops.py", ["--compress", "four"], "argument --compress: invalid float value"),
    ("flops.py", ["--pre_layers", "-1"], "--pre_layers must be >= 0"),
    ("flops.py", ["--boundaries", "spikes"], "argument --boundaries: invalid choice"),
    ("flops.py", ["--pre_layers", "one"], "argument --pre_layers: invalid int value"),
    ("flops.py", ["--json=yes"], "ignored explicit argument"),
    ("flops.py", ["--ckpt", f"{F}/nothing.pt", "--images", f"{F}/folder/a"], "--ckpt: no checkpoint"),
    ("flops.py", ["--ckpt", f"{F}/clip_c4.pt", "--images", f"{F}/notes.txt"], "is not a folder"),
    ("flops.py", ["--ckpt", f"{F}/clip_c4.pt", "--images", f"{F}/empty"], "no .jpg/.jpeg/.png/.webp images"),
    ("flops.py", ["--max_images", "0"], "--max_images must be >= 1"),
    ("flops.py", ["--max_images", "all"], "argument --max_images: invalid int value"),
    ("flops.py", ["--llm_model", "huge"], "unknown --llm_model 'huge'"),
    ("flops.py", ["--llm", f"{F}/empty"], "has no config.json"),
    ("flops.py", ["--prompt_tokens", "-1"], "--prompt_tokens must be >= 0"),
    ("flops.py", ["--prompt_tokens", "many"], "argument --prompt_tokens: invalid int value"),
    ("flops.py", ["--projector", "mlp3"], "argument --projector: invalid choice"),
    ("flops.py", ["--feature_layer", "12"], "--feature_layer must index one of the tower's 12 blocks"),
    ("flops.py", ["--feature_layer", "last"], "argument --feature_layer: invalid int value"),
    ("flops.py", ["--bench=no"], "ignored explicit argument"),
    ("flops.py", ["--tower", "text"], "argument --tower: invalid choice"),
    ("flops.py", ["--batch_size", "0"], "--batch_size must be >= 1"),
    ("flops.py", ["--batch_size", "big"], "argument --batch_size: invalid int value"),
    ("flops.py", ["--device", "gpu0"], "--device gpu0 is not a device"),
    ("flops.py", ["--compile=1"], "ignored explicit argument"),
    ("flops.py", ["--steps", "0"], "--steps must be >= 1"),
    ("flops.py", ["--steps", "ten"], "argument --steps: invalid int value"),
    ("flops.py", ["--warmup", "-1"], "--warmup must be >= 0"),
    ("flops.py", ["--warmup", "ten"], "argument --warmup: invalid int value"),
    ("flops.py", ["--bogus"], "unrecognized arguments: --bogus"),
    # visualize.py (argparse: it takes several images and checkpoints), every option
    ("visualize.py", [], "give images, --stats DIR or --object_ratio N"),
    ("visualize.py", [f"{F}/folder/a/0.jpg"], "no DRIP checkpoint under out/"),
    ("visualize.py", [f"{F}/folder/a/0.jpg", "--boundaries", "entropy"],
     "no DRIP entropy checkpoint under out/: train one with `python train_clip.py --compress 4 --boundaries entropy`"),
    ("visualize.py", [f"{F}/folder/a/0.jpg", "--ckpt", f"{F}/nothing.pt"], "--ckpt: no checkpoint"),
    ("visualize.py", [f"{F}/folder/a/0.jpg", "--ckpt", f"{F}/notes.txt"], "is not a train_clip.py checkpoint"),
    ("visualize.py", [f"{F}/folder/a/0.jpg", "--ckpt", f"{F}/clip_c1.pt"], "is a plain ViT"),
    ("visualize.py", [f"{F}/folder/a/0.jpg", "--ckpt", f"{F}/clip_c4.pt", "--out_dir", f"{F}/notes.txt/vis"], "--out_dir"),
    ("visualize.py", ["--out", "vis", f"{F}/folder/a/0.jpg"], "unrecognized arguments: --out"),
    ("visualize.py", ["--sample=yes"], "ignored explicit argument"),
    ("visualize.py", ["--seed", "x"], "argument --seed: invalid int value"),
    ("visualize.py", ["--stats", f"{F}/notes.txt"], "--stats"),
    ("visualize.py", ["--object_ratio", "0"], "--object_ratio must be >= 1"),
    ("visualize.py", ["--object_ratio", "many"], "argument --object_ratio: invalid int value"),
]
CASES = BAD_VALUES + wrong_type_cases()


def make_fixtures(root):
    """The files the table points at: an empty folder, a text file, CLIP checkpoints and weights, an ImageFolder, a shard, a
    LLaVA JSON, an LLM folder's config, and train/ + val/ ImageFolders where the built-in data would go."""
    import io
    import tarfile

    import torch
    from PIL import Image

    from model import CLIP, make_config
    os.makedirs(f"{root}/empty")
    with open(f"{root}/notes.txt", "w") as f:
        f.write("not a checkpoint, not JSON\n")
    for compress in (1, 4):
        cfg = make_config("tiny", compress=compress)
        torch.save({"model": CLIP(cfg).state_dict(), "model_config": cfg.__dict__, "run_config": {"model": "tiny"},
                    "tokenizer": ""}, f"{root}/clip_c{compress}.pt")
    torch.save({k: v for k, v in CLIP(make_config("tiny")).state_dict().items() if not k.startswith("visual.")},
               f"{root}/text_tower_only.pt")
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, f"{root}/wrong_size.pt")  # not the tiny model's 128 x 3 x 8 x 8
    for folder in ("folder/a", "folder/b", "imagenet/train/a", "imagenet/val/a"):
        os.makedirs(f"{root}/{folder}")
        Image.new("RGB", (48, 48), "red").save(f"{root}/{folder}/0.jpg")
    with open(f"{root}/classnames.txt", "w") as f:
        f.write("a\nb\n")
    with tarfile.open(f"{root}/shard.tar", "w") as tar:
        buffer = io.BytesIO()
        Image.new("RGB", (48, 48), "red").save(buffer, format="JPEG")
        for name, data in (("0.jpg", buffer.getvalue()), ("0.txt", b"a red square"), ("0.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(f"{root}/questions.jsonl", "w") as f:
        f.write(json.dumps({"question_id": 1, "image": "a/0.jpg", "text": "Colour?"}) + "\n")
    with open(f"{root}/conversations.json", "w") as f:
        json.dump([{"id": "0", "image": "a/0.jpg", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                      {"from": "gpt", "value": "Red."}]}], f)
    os.makedirs(f"{root}/llm")
    with open(f"{root}/llm/config.json", "w") as f:
        f.write("{}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case (and --help of every script) run once, by one worker process."""
    root = tmp_path_factory.mktemp("flags")
    fixtures = str(root / "fixtures")
    make_fixtures(fixtures)
    cases = [{"script": s, "args": [a.replace(F, fixtures) for a in args]} for s, args, _ in CASES]
    cases += [{"script": s, "args": ["--help"]} for s in SCRIPTS]
    (root / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, __file__, str(root / "cases.json"), str(root / "results.json"), str(root / "runs")],
                   check=True, timeout=400, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{s}:{' '.join(a)}" for s, a, _ in CASES])
def test_bad_input_stops_with_one_line_and_writes_nothing(results, index):
    script, args, message = CASES[index]
    result = results[index]
    lines = result["stderr"].strip().splitlines()
    assert result["returncode"] not in (0, None), result
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result
    assert "Traceback" not in result["stderr"] + result["stdout"]
    assert result["left_behind"] == [], result


@pytest.mark.parametrize("index", range(len(SCRIPTS)), ids=SCRIPTS)
def test_help_prints_every_option_with_its_default(results, index):
    result = results[len(CASES) + index]
    assert result["returncode"] == 0 and result["left_behind"] == [], result
    if SCRIPTS[index] in SCRIPTS[:4]:
        assert "\n".join(defaults(SCRIPTS[index])[0]) in result["stdout"]  # the defaults block, comments included
    else:
        assert any(flag in result["stdout"] for flag in ("--batch_size", "--ckpt", "--compress"))


@pytest.mark.parametrize("index", range(4, len(SCRIPTS)), ids=SCRIPTS[4:])
def test_every_option_of_the_argparse_scripts_has_help(results, index):
    """Each option's entry in --help has help text after its name (on its line or the next), and no
    '(default: None)' is printed."""
    lines = results[len(CASES) + index]["stdout"].split("options:")[1].splitlines()
    entries = [i for i, line in enumerate(lines) if line.startswith("  -") or line.startswith("  images")]
    assert len(entries) >= 3  # --help and at least two options
    for i in entries:
        has_help = "  " in lines[i].strip() or (i + 1 < len(lines) and lines[i + 1].startswith(" " * 10))
        assert has_help, lines[i]
    assert "(default: None)" not in results[len(CASES) + index]["stdout"]


ANY_VALUE = {"sample_llava.py": {"model_id"}}  # options for which no value is wrong


def test_every_option_has_a_bad_value_case():
    for script in SCRIPTS[:4]:
        tried = {arg.split("=")[0][2:] for s, args, _ in BAD_VALUES if s == script for arg in args if arg.startswith("--")}
        tried |= {args[0].split("=")[0][2:] for s, args, _ in wrong_type_cases() if s == script}
        assert set(defaults(script)[1]) - ANY_VALUE.get(script, set()) <= tried, script


# ----------------------------------------------------------------------------- the worker

def run_cases(cases_path, results_path, runs):
    import runpy
    import shutil
    import signal
    import time
    import traceback
    import warnings

    import ast

    import torch
    with warnings.catch_warnings():  # every script's imports, once here rather than in every case
        warnings.simplefilter("ignore", FutureWarning)
        for script in SCRIPTS:
            tree = ast.parse(open(os.path.join(HERE, script)).read())
            imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(body=imports, type_ignores=[]), script, "exec"), {})
    torch.set_num_threads(1)
    results = []
    for i, case in enumerate(json.load(open(cases_path))):
        cwd = os.path.join(runs, str(i))
        os.makedirs(cwd)
        out, err = os.path.join(runs, f"{i}.out"), os.path.join(runs, f"{i}.err")
        start = time.time()
        pid = os.fork()
        if pid == 0:  # the child: run the script as `python script args` would, from an empty folder
            code = 1
            try:
                os.chdir(cwd)
                for fd, path in ((1, out), (2, err)):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                script = os.path.join(HERE, case["script"])
                sys.argv = [script] + case["args"]
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.time() + 60
        while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.time() < deadline:
            time.sleep(0.005)
        if status[0] == 0:  # ran past a minute: it did real work instead of refusing the input
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            returncode = None
        else:
            returncode = os.waitstatus_to_exitcode(status[1])
        left = sorted(os.path.relpath(os.path.join(d, f), cwd) for d, dirs, files in os.walk(cwd) for f in files + dirs)
        results.append({"returncode": returncode, "stdout": open(out).read(), "stderr": open(err).read(),
                        "left_behind": left, "seconds": time.time() - start})
        shutil.rmtree(cwd)
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    run_cases(*sys.argv[1:])


def documented_commands():
    """Every `python X.py ...` / `torchrun ... X.py ...` command of the README and docs/, joined across
    backslash line continuations, as (file, command)."""
    import glob
    import re
    found = []
    for path in [os.path.join(HERE, "README.md")] + sorted(glob.glob(os.path.join(HERE, "docs", "*.md"))):
        with open(path) as f:
            text = f.read().replace("\\\n", " ")
        for line in text.splitlines():
            for command in re.findall(r"(?:python|torchrun)\s[^`#|&]*?\b\w+\.py[^`#|&]*", line):
                found.append((os.path.basename(path), command.strip()))
    return found


def test_no_documented_command_writes_outside_out_or_data():
    """Output flags of every command the docs show point under out/ or data/ (or into a folder of the
    user's own, like a benchmark's answers/), never into the repository's root or its own folders."""
    commands = documented_commands()
    assert len(commands) > 20  # the README and docs/ show many commands: the pattern finds them
    repository = set(os.listdir(HERE)) - {"out", "data"}
    for source, command in commands:
        words = command.split()
        for flag, value in zip(words, words[1:]):
            if flag in ("--out", "--out_dir", "--answers_file", "--data_dir", "--plot"):
                assert "/" in value and value.split("/")[0] not in repository, f"{source}: `{command}` writes {value}"

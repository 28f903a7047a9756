"""Answer a prompt about an image with a LLaVA trained by train_llava.py (greedy decoding).

    python sample_llava.py --out_dir out/llava_c4 --image data/shapes_llava/images/val/00000.jpg \\
        --prompt "What colour is the shape?"

The model is rebuilt from what its checkpoint records: the image tower and LLM paths it
was trained from, the projector, the feature layer and the LoRA settings.
"""
import os

import torch

from common import autocast_context, die, load_image_tower, parse_overrides
from data import image_transform, load_image
from model import LLaVA, add_lora
from text import load_llama, tokenize_conversation

# -----------------------------------------------------------------------------
# defaults
out_dir = "out/llava_c1"    # train_llava.py's output folder: its stage 2 checkpoint is used, else stage 1's
ckpt = ""                   # a train_llava.py stage checkpoint instead of the newest one in out_dir
image = ""                  # the image asked about; empty = a text-only prompt
prompt = ""                 # the user's question
max_new_tokens = 32
dtype = "auto"              # auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float16 | float32
config = parse_overrides(globals())
globals().update(config)
# -----------------------------------------------------------------------------

if not prompt:
    die("give --prompt (and usually --image)")
if max_new_tokens < 1:
    die(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
if image and not os.path.isfile(image):
    die(f"no image at {image}")
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dtype, autocast = autocast_context(device, dtype, ("bfloat16", "float16", "float32"))
ckpt = ckpt or next((p for p in (os.path.join(out_dir, f"stage{s}", "ckpt.pt") for s in (2, 1)) if os.path.isfile(p)), "")
if not os.path.isfile(ckpt):
    die(f"no LLaVA checkpoint under {out_dir}; run `python train_llava.py` first, or give --out_dir or --ckpt")
try:
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    run, sources, lora = saved["run_config"], saved["sources"], saved["lora"]
except Exception as e:
    die(f"{ckpt} is not a train_llava.py checkpoint ({type(e).__name__}: {e})")

visual, _ = load_image_tower(sources["vision"], run["model"], run["compress"], run["quick_gelu"])
language_model, tok = load_llama(sources["llm"])
if lora:
    add_lora(language_model, *lora)
model = LLaVA(visual, language_model, run["projector"], run["feature_layer"])
if model.load_state_dict(saved["model"], strict=False).unexpected_keys:  # it holds the trained parts only
    die(f"{ckpt} does not fit the model its own run config describes")
model.to(device).eval()

ids, _ = tokenize_conversation(tok, [{"from": "human", "value": ("<image>\n" if image else "") + prompt}])
pixels = None
if image:
    try:
        pixels = image_transform(visual.cfg.image_size)(load_image(image))[None].to(device)  # 1 x 3 x H x W
    except OSError as e:
        die(f"cannot read image {image} ({e})")
with torch.no_grad(), autocast:
    answer = model.generate([ids.to(device)], pixels, [bool(image)], max_new_tokens)[0]
print(tok.decode(answer).strip())

"""FLOP counting: fvcore with the attention handle agrees with the analytic formula."""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from flops import ImageTower, TextTower, fvcore_macs, llm_config, llm_prefill_macs, projector_macs, text_tower_macs
from llama import LLAMA_CONFIGS, Llama, LlamaConfig
from model import CLIP, LLaVA, even_boundaries, image_tower_macs, make_config


def formula(image_size, patch, width=768, layers=12, embed_dim=512):
    """12*N*D^2 + 2*N^2*D per layer plus the patch embedding (DESIGN.md section 3), final projection to embed_dim."""
    N = (image_size // patch) ** 2
    L = N + 1
    return N * 3 * patch * patch * width + layers * (12 * L * width ** 2 + 2 * L * L * width) + width * embed_dim


@pytest.mark.parametrize("name,image_size", [("ViT-L-14", 224), ("ViT-L-14-336", 336)])
def test_analytic_count_of_the_large_towers(name, image_size):
    assert image_tower_macs(make_config(name)) == formula(image_size, 14, 1024, 24, 768)


@pytest.mark.parametrize("name,patch,published", [("ViT-B-32", 32, 4.41), ("ViT-B-16", 16, 17.56)])
def test_fvcore_counts_attention(name, patch, published):
    clip = CLIP(make_config(name))
    skipped = Counter()
    counted = fvcore_macs(ImageTower(clip.visual), (torch.randn(1, 3, 224, 224),), skipped)
    assert counted == pytest.approx(formula(224, patch), rel=0.01)
    assert counted / 1e9 == pytest.approx(published, rel=0.01)
    assert "aten::scaled_dot_product_attention" not in skipped


@pytest.mark.parametrize("compress", [2, 4, 10])
def test_fvcore_matches_analytic_at_target_rate(compress):
    cfg = make_config("ViT-B-32", compress=compress)
    clip = CLIP(cfg)
    segments = round(49 / compress)
    tower = ImageTower(clip.visual, even_boundaries(1, 49, segments))
    counted = fvcore_macs(tower, (torch.randn(1, 3, 224, 224),), Counter())
    counted += fvcore_macs(clip.visual.boundary_predictor, (torch.randn(1, 49, 768),), Counter())
    assert counted == pytest.approx(image_tower_macs(cfg, segments), rel=0.01)
    # with the predictor's own boundaries, forced to the same count, fvcore sees the predictor in the graph
    clip.visual.boundary_predictor.out.weight.data.zero_()
    with torch.no_grad():
        clip.visual.boundary_predictor.out.bias.data[...] = torch.logit(torch.tensor((segments - 1) / 48))
    predicted = fvcore_macs(ImageTower(clip.visual), (torch.randn(1, 3, 224, 224),), Counter())
    assert predicted == pytest.approx(image_tower_macs(cfg, segments), rel=0.01)


def test_text_tower_count():
    cfg = make_config("ViT-B-32")
    counted = fvcore_macs(TextTower(CLIP(cfg)), (torch.ones(1, 77, dtype=torch.long),), Counter())
    assert counted == pytest.approx(text_tower_macs(cfg), rel=0.01)
    assert counted / 1e9 == pytest.approx(2.98, rel=0.01)


def test_cli_json_and_cpu_bench():
    result = subprocess.run([sys.executable, "flops.py", "--model", "tiny", "--compress", "1", "4", "--json",
                             "--bench", "--batch_size", "8", "--steps", "2", "--warmup", "1",
                             "--llm_model", "tiny", "--prompt_tokens", "20"],
                            capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    flops, bench = out["flops"], out["bench"]
    assert [r["compress"] for r in flops] == [1, 4] and flops[1]["image_ratio"] < 0.6
    assert bench[0]["speedup"] == 1 and bench[1]["step_ms"] > 0
    # packed after pooling: the blocks compute exactly the real tokens
    assert bench[0]["real_token_fraction"] == 1 and bench[1]["real_token_fraction"] == 1
    assert "ceiling_step_ms" not in bench[0] and bench[1]["ceiling_step_ms"] > 0 and bench[1]["of_ceiling"] > 0
    assert bench[0]["infer_images_per_s"] > 0 and bench[1]["infer_images_per_s"] > 0
    assert bench[1]["saved_activations_gib"] < bench[0]["saved_activations_gib"]
    llava = out["llava"]
    assert [r["image_tokens"] for r in llava] == [36, 9]  # 6 x 6 patches, then a quarter
    assert llava[1]["llm_prefill_gflops"] * 1e9 == pytest.approx(llm_prefill_macs(LLAMA_CONFIGS["tiny"], 20 + 9))
    # the tower stops at the penultimate block (3 of 4) and has no final projection
    tower = image_tower_macs(make_config("tiny", compress=4, layers=3), 9) - 128 * 128
    assert llava[1]["tower_gflops"] * 1e9 == pytest.approx(tower)
    assert llava[0]["llm_ratio"] == 1 and 0 < llava[1]["total_ratio"] < 1


def test_cli_counts_with_a_checkpoints_predicted_boundaries(tmp_path):
    cfg = make_config("tiny", compress=4)
    torch.manual_seed(0)
    model = CLIP(cfg)
    torch.save({"model": model.state_dict(), "model_config": cfg.__dict__}, tmp_path / "ckpt.pt")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((60, 80, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    result = subprocess.run([sys.executable, "flops.py", "--model", "tiny", "--compress", "4", "--json",
                             "--ckpt", str(tmp_path / "ckpt.pt"), "--images", str(images)],
                            capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout)["checkpoint"]
    assert row["images"] == 3 and row["target_rate"] == 0.25
    # the count follows the measured rate: the analytic formula at the measured segment count
    segments = round(row["measured_rate"] * 36)
    assert row["image_gflops_predicted"] * 1e9 == pytest.approx(image_tower_macs(cfg, segments), rel=0.01)


# ----------------------------------------------------------------------------- the LLaVA side

@pytest.mark.parametrize("cfg", [LLAMA_CONFIGS["tiny"],  # tied head, grouped-query attention
                                 LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                                             num_attention_heads=6, num_key_value_heads=6, head_dim=24)])
def test_llm_prefill_count_matches_fvcore(cfg):
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, 75))
    skipped = Counter()
    counted = fvcore_macs(Llama(cfg), (ids,), skipped)
    assert counted == pytest.approx(llm_prefill_macs(cfg, 75), rel=0.01)
    assert "aten::scaled_dot_product_attention" not in skipped


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_projector_count_matches_fvcore(projector):
    llava = LLaVA(CLIP(make_config("tiny")).visual, Llama(LLAMA_CONFIGS["tiny"]), projector)
    counted = fvcore_macs(llava.projector, (torch.randn(1, 9, 128),), Counter())
    assert counted == projector_macs(128, 128, projector, 9)


def test_vicuna_prefill_per_token_is_its_matrix_parameters():
    """Without attention, one token costs one multiply-add per weight of every matrix it passes
    (all but the embedding table and the norms): an independent check at 7B scale."""
    cfg = LLAMA_CONFIGS["vicuna-7b"]
    with torch.device("meta"):
        llm = Llama(cfg)
    matrices = sum(p.numel() for n, p in llm.named_parameters() if "norm" not in n and "embed_tokens" not in n)
    attention = cfg.num_hidden_layers * 2 * cfg.hidden_size  # 2 * L * L * heads * d at L = 1
    assert llm_prefill_macs(cfg, 1) == matrices + attention


def test_llm_config_from_a_hugging_face_directory(tmp_path):
    tiny = LLAMA_CONFIGS["tiny"]
    hf = {k: v for k, v in tiny.__dict__.items() if k not in ("head_dim", "rope_scaling")} | {"model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert llm_config(None, str(tmp_path)) == tiny and llm_config("vicuna-7b", None) == LLAMA_CONFIGS["vicuna-7b"]


def test_readme_shows_what_its_flops_command_prints():
    """The README's efficiency table is the output of the command beside it, columns and rows."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")) as f:
        readme = f.read()
    command = "python flops.py --model ViT-B-16 --compress 1 2 4 10"
    assert f"`{command}`" in readme
    shown = readme.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    result = subprocess.run([sys.executable] + command.split()[1:], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.splitlines()[:len(shown)] == shown
    assert "not counted" in result.stdout and "aten::" not in result.stdout  # fvcore's skipped ops, said calmly


@pytest.mark.parametrize("name", ["tiny", "ViT-B-16"])
def test_entropy_models_training_cost_matches_fvcore_and_eval_costs_what_drip_costs(name):
    """--boundaries entropy: eval MACs are DRIP's (the entropy model does not run); the training-only
    extra, analytic, is fvcore's count of the entropy model."""
    from flops import entropy_training_macs

    class Entropy(torch.nn.Module):  # the entropy model's forward with its entropies as the one output
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return self.model(tokens)[0]

    cfg = make_config(name, compress=4, boundaries="entropy")
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    counted = fvcore_macs(Entropy(model.visual.entropy_model), (torch.randn(1, cfg.num_patches, cfg.width),), Counter())
    assert counted == pytest.approx(entropy_training_macs(cfg), rel=0.01)
    gumbel = make_config(name, compress=4)
    assert image_tower_macs(cfg) == image_tower_macs(gumbel)
    images = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    boundaries = even_boundaries(1, cfg.num_patches, round(cfg.num_patches / 4))
    with_entropy = fvcore_macs(ImageTower(model.visual, boundaries), (images,), Counter())
    plain = fvcore_macs(ImageTower(CLIP(gumbel).eval().visual, boundaries), (images,), Counter())
    assert with_entropy == plain

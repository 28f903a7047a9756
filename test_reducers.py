"""Tests of the other ways to shorten a ViT (--reducer): shapes and exact token counts, gradient
from the task loss, batch invariance, equal budget, fvcore = analytic, the plain ViT as the limit
case, DRIP's rate controller, and 2-rank torchrun runs. Run: python -m pytest -q test_reducers.py"""
import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from flops import ImageTower, fvcore_macs
from model import CLIP, VisionTransformer, expected_segments, image_tower_macs, make_config
from reducers import (REDUCERS, KeepPredictor, ToMe, bipartite_soft_matching, dynamicvit_kept, dynamicvit_keep_rate,
                      merge_tokens, tome_plan, tome_schedule)
from test_train_clip import FAST, HERE, data_dir, metrics, run, tokenizer_file  # noqa: F401 (fixtures)

OTHERS = [r for r in REDUCERS if r != "drip"]
LEARNED = ["dynamicvit", "tokenlearner", "group"]


def eval_tokens(cfg):
    """Patch-derived tokens out of the last block in eval, from the analytic plans."""
    if cfg.reducer == "tome":
        return tome_plan(cfg, *tome_schedule(cfg))[1][-1] - 1
    if cfg.reducer == "dynamicvit":
        return dynamicvit_kept(cfg, dynamicvit_keep_rate(cfg))[-1]
    return expected_segments(cfg)


def images(cfg, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g) * torch.linspace(0.2, 3, B).view(B, 1, 1, 1)


@pytest.mark.parametrize("reducer", OTHERS)
@pytest.mark.parametrize("compress", [2, 4])
def test_shapes_and_exact_eval_token_count(reducer, compress):
    torch.manual_seed(0)
    model = VisionTransformer(make_config("tiny", compress=compress, reducer=reducer))
    x = images(model.cfg, 3)
    train = model.train()(x)
    with torch.no_grad():
        out = model.eval()(x)
    S = eval_tokens(model.cfg)
    assert out.embedding.shape == (3, 128) and out.tokens.shape == (3, S, 128) and out.valid.all()
    assert out.boundary_rate.item() == pytest.approx(S / 36)
    assert train.embedding.shape == (3, 128) and train.tokens.shape[0] == 3 and torch.isfinite(train.aux_loss)
    if reducer == "dynamicvit":  # training keeps every token in place, dropped ones masked
        assert train.tokens.shape[1] == 36 and train.aux_loss > 0
        assert train.boundary_rate.item() == pytest.approx(train.valid.float().mean().item())
    else:
        assert train.tokens.shape == out.tokens.shape and train.aux_loss == 0


@pytest.mark.parametrize("reducer", LEARNED)
def test_task_loss_alone_trains_the_reducer(reducer):
    torch.manual_seed(0)
    model = CLIP(make_config("tiny", compress=4, reducer=reducer)).train()
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, model.cfg.vocab_size, (4, model.cfg.context_length), generator=g)
    image_features, text_features, logit_scale, vision = model(images(model.cfg, 4), text)
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(4)
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2).backward()  # no aux loss
    for name, p in model.visual.reducer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("reducer", OTHERS)
def test_eval_output_does_not_depend_on_the_batch(reducer):
    torch.manual_seed(0)
    model = VisionTransformer(make_config("tiny", compress=4, reducer=reducer)).eval()
    for p in model.reducer.parameters():  # spread the reducer's scores like a trained one
        p.data.mul_(30)
    x = images(model.cfg, 5)
    with torch.no_grad():
        batch = model(x)
        for i in range(len(x)):
            alone = model(x[i:i + 1])
            torch.testing.assert_close(batch.embedding[i], alone.embedding[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batch.tokens[i], alone.tokens[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "ViT-B-32", "ViT-B-16"])
@pytest.mark.parametrize("compress", [2, 4, 10])
def test_every_reducer_at_drips_budget(name, compress):
    drip = image_tower_macs(make_config(name, compress=compress))
    for reducer in OTHERS:
        macs = image_tower_macs(make_config(name, compress=compress, reducer=reducer))
        assert macs == pytest.approx(drip, rel=0.05), reducer
    assert image_tower_macs(make_config(name, compress=compress)) < image_tower_macs(make_config(name))


@pytest.mark.parametrize("reducer", OTHERS)
@pytest.mark.parametrize("name,compress", [("tiny", 2), ("tiny", 4), ("tiny", 10)])
def test_fvcore_matches_analytic(reducer, name, compress):
    cfg = make_config(name, compress=compress, reducer=reducer)
    torch.manual_seed(0)
    clip = CLIP(cfg)
    counted = fvcore_macs(ImageTower(clip.visual), (images(cfg, 1),), Counter())
    assert counted == pytest.approx(image_tower_macs(cfg), rel=0.01)


def plain_copy(cfg):
    """The plain ViT (compress 1) with the weights of a VisionTransformer of config cfg (reducer parts left out)."""
    torch.manual_seed(1)
    model = VisionTransformer(make_config("tiny", compress=4, reducer=cfg.reducer)).eval()
    plain = VisionTransformer(make_config("tiny")).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("reducer.")})
    return model, plain


def test_every_reducer_at_compress_1_is_the_plain_vit():
    torch.manual_seed(0)
    plain = VisionTransformer(make_config("tiny")).eval()
    x = images(plain.cfg, 2)
    with torch.no_grad():
        expected = plain(x)
    for reducer in REDUCERS:
        model = VisionTransformer(make_config("tiny", reducer=reducer)).eval()
        assert model.reducer is None and model.boundary_predictor is None
        model.load_state_dict(plain.state_dict())  # strict: the same parameters, no more
        with torch.no_grad():
            out = model(x)
        torch.testing.assert_close(out.embedding, expected.embedding)
        torch.testing.assert_close(out.tokens, expected.tokens)


def test_tome_with_r_0_is_the_plain_vit():
    cfg = make_config("tiny", compress=4, reducer="tome")
    model, plain = plain_copy(cfg)
    model.reducer = ToMe(cfg, r=0)
    assert model.reducer.start == 0  # every block goes through ToMe's own block
    x = images(cfg, 3)
    with torch.no_grad():
        out, expected = model(x), plain(x)
    torch.testing.assert_close(out.embedding, expected.embedding, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.tokens, expected.tokens, atol=1e-5, rtol=1e-4)


def naive_tome_merge(x, keys, r):
    """Reference ToMe step for one image, with loops: match A (even) to B (odd) by cosine, merge r best (not CLS)."""
    L = len(x)
    a, b = list(range(0, L, 2)), list(range(1, L, 2))
    best = {}
    for i in a[1:]:
        sims = [F.cosine_similarity(keys[i], keys[j], dim=0).item() for j in b]
        best[i] = (max(sims), b[sims.index(max(sims))])
    merging = sorted(best, key=lambda i: -best[i][0])[:r]
    groups = {j: [j] for j in b}
    for i in merging:
        groups[best[i][1]].append(i)
    kept = [i for i in a if i not in merging]
    return torch.stack([x[i] for i in kept] + [x[groups[j]].mean(0) for j in b]), [1] * len(kept) + [len(groups[j]) for j in b]


def test_tome_merge_matches_naive_loop():
    torch.manual_seed(0)
    x, keys = torch.randn(2, 11, 6), torch.randn(2, 11, 4)
    merged, size = merge_tokens(x, torch.ones(2, 11), *bipartite_soft_matching(keys, 3))
    for n in range(2):
        expected, sizes = naive_tome_merge(x[n], keys[n], 3)
        torch.testing.assert_close(merged[n], expected)
        assert size[n].tolist() == sizes


def test_drip_rate_controller_holds_the_target():
    """A predictor that starts far below the target rate is brought back to it by the controller alone."""
    torch.manual_seed(0)
    model = VisionTransformer(make_config("tiny", compress=4)).train()
    model.boundary_predictor.out.bias.data.fill_(-4.0)         # sigmoid ~ 0.02
    x = images(model.cfg, 32)
    rates = []
    with torch.no_grad():
        for _ in range(60):
            rates.append(model(x).boundary_rate.item())
            model.track_rate(rates[-1])
        assert rates[0] < 0.1
        assert sum(rates[-20:]) / 20 == pytest.approx(0.25, abs=0.01)
        assert model.eval()(x).boundary_rate.item() == pytest.approx(0.25, abs=0.02)


def test_dynamicvit_dropping_every_token_stays_finite():
    """Sampled decisions can drop all of an image's patch tokens; CLS stays, and nothing becomes NaN."""
    torch.manual_seed(0)
    model = VisionTransformer(make_config("tiny", compress=4, reducer="dynamicvit")).train()
    for predictor in model.reducer.predictors:
        predictor.out_conv[-2].bias.data = torch.tensor([-20.0, 20.0])  # log-probabilities of keep, drop
    out = model(images(model.cfg, 2))
    assert not out.valid.any()
    (out.embedding.sum() + out.aux_loss).backward()
    assert torch.isfinite(out.embedding).all() and torch.isfinite(out.aux_loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_dynamicvit_global_feature_is_the_mean_of_the_kept_tokens_with_its_gradient():
    """Against the mean written out (sum / count): also where one token is kept, whose count
    of 1 must pass its gradient to the policy (clamp(min=1) would not in torch 2.14)."""
    torch.manual_seed(0)
    predictor = KeepPredictor(16).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    kept = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    grads = []
    for written_out in (False, True):
        policy = kept.clone().requires_grad_(True)
        if written_out:
            local, rest = predictor.in_conv(x).chunk(2, dim=2)
            mean = (rest * policy[..., None]).sum(1, keepdim=True) / policy.sum(1)[:, None, None]
            out = predictor.out_conv(torch.cat([local, mean.expand_as(rest)], 2))
        else:
            out = predictor(x, policy)
        out[..., 0].sum().backward()
        grads.append((out, policy.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("reducer", ["tome", "dynamicvit"])
def test_grad_checkpointing_gives_the_same_gradients(reducer):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = VisionTransformer(make_config("tiny", compress=4, reducer=reducer)).train()
        model.transformer.grad_checkpointing = checkpointing
        out = model(images(model.cfg, 2))
        (out.embedding.pow(2).sum() + out.aux_loss).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_torchrun_two_ranks_with_learned_reducers(data_dir, tokenizer_file, tmp_path):  # noqa: F811
    """DDP would stop with "Expected to have finished reduction" at step 2 if a parameter got no gradient."""
    for reducer in LEARNED:
        out = str(tmp_path / reducer)
        run(["--data_dir", data_dir, "--out_dir", out, "--compress", "4", "--reducer", reducer, "--max_steps", "2",
             "--tokenizer", tokenizer_file] + FAST, nproc=2)
        record = metrics(out)[-1]
        assert record["step"] == 2 and record["eval_images"] == 72
        assert record["eval_tokens"] == eval_tokens(make_config("tiny", compress=4, reducer=reducer))
    # flops.py --runs: one row per reducer with its analytic GFLOPs, and the plot
    result = subprocess.run([sys.executable, "flops.py", "--json", "--plot", str(tmp_path / "plot.png"), "--runs"]
                            + [str(tmp_path / r) for r in LEARNED], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    assert [r["reducer"] for r in rows] == LEARNED and (tmp_path / "plot.png").stat().st_size > 0
    for r in rows:
        cfg = make_config("tiny", compress=4, reducer=r["reducer"])
        assert r["image_gflops_analytic"] == pytest.approx(image_tower_macs(cfg) / 1e9)
        assert list(r["top1_by_seed"]) == ["0"] and r["eval_tokens"] == eval_tokens(cfg)


def test_dynamicvit_training_attention_is_softmax_with_policy_written_out():
    """DynamicViT's softmax_with_policy as its authors define it, in loops: query i weighs key j by
    exp(s_ij - max_j s_ij) G_ij with G_ij = 1 when j is kept or j = i (a dropped token still
    attends to itself), smoothed by eps = 1e-6 as (w + eps/L) / (sum w + eps); gradients reach the policy."""
    from model import Attention, split_heads
    from reducers import attention_with_keys
    torch.manual_seed(0)
    attn = Attention(16, 2).double()
    torch.nn.init.normal_(attn.in_proj_weight, std=0.3)
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    policy = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out, _ = attention_with_keys(attn, x, policy=policy)
    q, k, v = split_heads(F.linear(x, attn.in_proj_weight, attn.in_proj_bias), 2)
    L, eps = 5, 1e-6
    heads = []
    for h in range(2):
        rows = []
        for i in range(L):
            s = [float((q[0, h, i] @ k[0, h, j]).detach()) / 8 ** 0.5 for j in range(L)]
            w = [math.exp(s[j] - max(s)) * (1.0 if policy[0, j] == 1 or i == j else 0.0) for j in range(L)]
            rows.append(sum((w[j] + eps / L) * v[0, h, j] for j in range(L)) / (sum(w) + eps))
        heads.append(torch.stack(rows))
    expected = attn.out_proj(torch.stack(heads).transpose(0, 1).reshape(1, L, 16))
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert policy.grad[0, 1] != 0  # a dropped token's decision gets a gradient


def test_tokenlearner_is_scenics_version_1_1_written_out():
    """scenic's TokenLearnerModuleV11: LayerNorm, Dense(64), tanh-GELU, Dense(S), softmax over the
    patches for each of the S maps, output token s = sum_i map_s(i) x_i (the raw tokens)."""
    from reducers import TokenLearner
    torch.manual_seed(0)
    cfg = make_config("tiny", compress=4)
    learner = TokenLearner(cfg).double()
    assert learner.fc.out_features == 64 and learner.maps.out_features == 9
    x = torch.randn(2, 36, 128, dtype=torch.float64)
    out, _ = learner.reduce(x)
    for b in range(2):
        h = learner.ln(x[b])
        h = learner.fc(h)
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))  # flax's gelu
        logits = learner.maps(h).detach()                                           # 36 x 9
        for s in range(9):
            weights = [math.exp(logits[i, s]) for i in range(36)]
            expected = sum(w * x[b, i] for i, w in enumerate(weights)) / sum(weights)
            torch.testing.assert_close(out[b, s], expected)


def test_grid_runs_every_seed_resumes_an_interrupted_run_and_skips_finished_ones(data_dir, tokenizer_file, tmp_path):  # noqa: F811
    """grid.py on small data: a run per seed, the table with each seed. A run left interrupted at
    step 2 of 4 is continued from its checkpoint (--resume); run again, the grid starts nothing."""
    out = tmp_path / "grid"
    train_args = f"--data_dir {data_dir} --train_num_samples 32 --batch_size 16 --workers 0 --tokenizer {tokenizer_file}"
    interrupted = out / "uniform_c4_s1"
    run(["--compress", "4", "--reducer", "uniform", "--seed", "1", "--epochs", "2", "--max_steps", "2",
         "--out_dir", str(interrupted)] + train_args.split())  # stopped after epoch 1 of 2, its checkpoint at step 2
    command = [sys.executable, "grid.py", "--reducer", "uniform", "--compress", "4", "--seeds", "0", "1", "--no-plain",
               "--epochs", "2", "--out_dir", str(out), "--train_args", train_args]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "2 runs, 0 finished already, 2 to run" in first.stdout
    assert sorted(os.listdir(out)) == ["accuracy_vs_gflops.png", "uniform_c4_s0", "uniform_c4_s1"]
    assert f"resumed from {interrupted / 'ckpt.pt'} at step 2" in (interrupted / "train.log").read_text()
    assert [r["step"] for r in metrics(str(interrupted))] == [2, 4]
    row = next(line.split() for line in first.stdout.splitlines() if line.split()[:1] == ["uniform"])
    top1 = [metrics(str(out / f"uniform_c4_s{seed}"))[-1]["zero_shot_top1"] for seed in (0, 1)]
    assert float(row[3]) == pytest.approx(sum(top1) / 2, abs=0.006) and row[5:7] == [f"{t:.2f}" for t in top1]
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert again.returncode == 0 and "2 runs, 2 finished already, 0 to run" in again.stdout
    assert "started" not in again.stdout

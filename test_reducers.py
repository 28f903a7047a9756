"""Tests of the other ways to shorten a ViT (--reducer): shapes and exact token counts, gradient
from the task loss, batch invariance, equal budget, fvcore = analytic, the plain ViT as the limit
case, DRIP's rate controller, and 2-rank torchrun runs. Run: python -m pytest -q test_reducers.py"""
import json
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

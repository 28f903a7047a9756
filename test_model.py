"""Tests of the DRIP model against independent references. Run: python -m pytest -q"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (CLIP, VisionTransformer, boundary_loss, entropy_spikes, entropy_targets, eval_boundaries, even_boundaries,
                   force_last_boundary, make_config, pack, packed_attention, packing_plan, patch_words, pool_segments,
                   sample_boundaries, unpack, use_varlen)


def naive_pool(x, boundaries):
    """Reference pooling: walk the tokens of each image, closing a segment at each boundary."""
    result = []
    for tokens, marks in zip(x, boundaries):
        segments, current = [], []
        for token, mark in zip(tokens, marks):
            current.append(token)
            if mark == 1:
                segments.append(torch.stack(current).mean(0))
                current = []
        assert not current, "the last token must end a segment"
        result.append(torch.stack(segments))
    return result


@pytest.mark.parametrize("case", ["random", "none", "all", "batch1"])
def test_pool_segments_matches_naive_loop(case):
    torch.manual_seed(0)
    B, N, D = (1 if case == "batch1" else 5), 16, 8
    x = torch.randn(B, N, D)
    if case == "none":
        boundaries = torch.zeros(B, N)
    elif case == "all":
        boundaries = torch.ones(B, N)
    else:
        boundaries = (torch.rand(B, N) < 0.3).float()
    boundaries = force_last_boundary(boundaries)
    pooled = pool_segments(x, boundaries)
    reference = naive_pool(x, boundaries)
    assert pooled.shape == (B, max(len(r) for r in reference), D)
    for b, ref in enumerate(reference):
        S = len(ref)
        torch.testing.assert_close(pooled[b, :S], ref)
        assert pooled[b, S:].abs().sum() == 0
    if case == "none":
        torch.testing.assert_close(pooled[:, 0], x.mean(1))
    if case == "all":
        torch.testing.assert_close(pooled, x)


def test_pool_segments_passes_gradient_to_boundaries():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 4)
    logits = torch.randn(2, 10, requires_grad=True)
    boundaries = force_last_boundary(sample_boundaries(logits))
    pooled = pool_segments(x, boundaries)
    (pooled * torch.randn_like(pooled)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_boundary_gradient_cuts_the_tail_out_of_its_segment_and_fades_one_patch_segments():
    """d loss / d b_j = d loss / dt at t = 0 of: the patches after j fading out of j's
    segment mean (weights 1 - t), and every later segment of one patch fading itself
    (its patch times 1 - t). Later longer segments only shift: they add nothing, so where
    b_j = 1 only the later one-patch segments count. Patches 3 and 7 are one-patch
    segments (not divided by their count, written out: clamp(min=1) would depend on torch)."""
    torch.manual_seed(0)
    N, D = 12, 5
    x, w = torch.randn(1, N, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    marks = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1]], dtype=torch.float64)
    boundaries = marks.clone().requires_grad_(True)
    pooled = pool_segments(x, boundaries)
    (pooled[0] * w[:pooled.shape[1]]).sum().backward()
    ends = marks[0].nonzero().flatten().tolist()
    starts = [0] + [e + 1 for e in ends[:-1]]
    for j in range(N - 1):
        t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        loss = 0
        for s, (start, end) in enumerate(zip(starts, ends)):
            patches = torch.arange(start, end + 1)
            if start <= j < end:                                # j's segment, with patches after j
                weight = torch.where(patches > j, 1 - t, torch.ones((), dtype=torch.float64))
                token = (weight[:, None] * x[0, patches]).sum(0) / weight.sum()
            elif start > j and start == end:                    # a later segment of one patch
                token = (1 - t) * x[0, start]
            else:
                token = x[0, patches].mean(0)
            loss = loss + (token * w[s]).sum()
        expected = torch.autograd.grad(loss, t)[0] if loss.requires_grad else torch.zeros((), dtype=torch.float64)
        torch.testing.assert_close(boundaries.grad[0, j], expected)
    assert abs(boundaries.grad[0, 2]) > 1e-3 and boundaries.grad[0, 7] == 0  # cuts before one-patch segments count


def contrastive_loss(model, images, text):
    image_features, text_features, logit_scale, vision = model(images, text)
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2, vision


def tiny_batch(cfg, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    text = torch.randint(1, cfg.vocab_size, (B, cfg.context_length), generator=g)
    text[:, 10:] = 0  # padding after the end-of-text token
    return images, text


def test_task_loss_alone_trains_the_predictor():
    torch.manual_seed(0)
    model = CLIP(make_config("tiny", compress=4))
    loss, _ = contrastive_loss(model, *tiny_batch(model.cfg))  # prior-loss weight 0: not added
    loss.backward()
    for name, p in model.visual.boundary_predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("compress", [1, 4])
def test_batch_invariance_in_eval(compress):
    torch.manual_seed(0)
    model = VisionTransformer(make_config("tiny", compress=compress)).eval()
    if compress > 1:  # make segment counts differ between images, so padding is exercised
        model.boundary_predictor.out.weight.data.mul_(200)
    size = model.cfg.image_size
    images = torch.randn(6, 3, size, size) * torch.linspace(0.2, 3, 6).view(6, 1, 1, 1)
    with torch.no_grad():
        batch = model(images)
        if compress > 1:
            assert len(set(batch.valid.sum(1).tolist())) > 1, "all images got the same segment count"
        for i in range(len(images)):
            alone = model(images[i:i + 1])
            S = int(alone.valid.sum())
            assert int(batch.valid[i].sum()) == S
            torch.testing.assert_close(batch.embedding[i], alone.embedding[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batch.tokens[i, :S], alone.tokens[0, :S], atol=1e-5, rtol=1e-4)
            if compress > 1:
                assert torch.equal(batch.boundaries[i], alone.boundaries[0])


@pytest.mark.parametrize("n,k,p", [(49, 12, 0.25), (196, 0, 0.5), (196, 196, 0.1), (64, 30, 0.25), (10, 3, 0.7)])
def test_boundary_loss_matches_math(n, k, p):
    boundaries = torch.zeros(3, n)
    boundaries[:, :k] = 1
    expected = -math.log(math.comb(n, k) * p ** k * (1 - p) ** (n - k)) / n
    assert boundary_loss(boundaries, p).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("k,direction", [(40, "down"), (5, "up")])
def test_boundary_loss_gradient_pulls_rate_to_target(k, direction):
    n, p = 64, 0.25  # target 16 boundaries
    boundaries = torch.zeros(1, n)
    boundaries[0, :k] = 1
    boundaries.requires_grad_(True)
    boundary_loss(boundaries, p).backward()
    grad = boundaries.grad[0, 0].item()
    expected = (torch.digamma(torch.tensor(k + 1.0)) - torch.digamma(torch.tensor(n - k + 1.0))
                - math.log(p / (1 - p))).item() / n
    assert grad == pytest.approx(expected, rel=1e-4)
    # gradient descent moves k against the gradient
    assert (grad > 0) if direction == "down" else (grad < 0)


def reference_vit(model, images):
    """Plain ViT forward written with nn.MultiheadAttention, from the model's own weights."""
    cfg = model.cfg
    x = model.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([model.class_embedding.expand(len(x), 1, -1), x], 1) + model.positional_embedding
    x = model.ln_pre(x)
    for block in model.transformer.resblocks:
        mha = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        mha.load_state_dict(block.attn.state_dict())
        h = block.ln_1(x)
        x = x + mha(h, h, h, need_weights=False)[0]
        x = x + block.mlp(block.ln_2(x))
    return model.ln_post(x[:, 0]) @ model.proj, x[:, 1:]


def test_compress_1_is_the_plain_vit():
    torch.manual_seed(0)
    plain = VisionTransformer(make_config("tiny", compress=1))
    drip = VisionTransformer(make_config("tiny", compress=4))
    assert plain.boundary_predictor is None
    assert not any("boundary_predictor" in name for name, _ in plain.named_parameters())
    drip_names = {n for n, _ in drip.named_parameters() if not n.startswith("boundary_predictor.")}
    assert {n for n, _ in plain.named_parameters()} == drip_names
    size = plain.cfg.image_size
    images = torch.randn(3, 3, size, size)
    out = plain.train()(images)
    assert out.boundaries is None and out.tokens.shape == (3, plain.num_patches, 128) and out.valid.all()
    assert out.aux_loss.item() == 0
    with torch.no_grad():
        embedding, tokens = reference_vit(plain, images)
    torch.testing.assert_close(out.embedding, embedding, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.tokens, tokens, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("compress", [2, 4, 10])
def test_eval_boundaries_deterministic_at_training_rate(compress):
    torch.manual_seed(0)
    model = VisionTransformer(make_config("tiny", compress=compress)).eval()
    model.boundary_predictor.out.weight.data.mul_(30)  # spread the logits like a trained predictor
    images = torch.randn(32, 3, model.cfg.image_size, model.cfg.image_size)
    with torch.no_grad():
        first, second = model(images), model(images)
        assert torch.equal(first.boundaries, second.boundaries)
        # training-time expectation: sigmoid(logits), with the last patch always a boundary
        x = model.ln_pre(torch.cat([model.class_embedding.expand(32, 1, -1),
                                    model.conv1(images).flatten(2).transpose(1, 2)], 1)
                         + model.positional_embedding)
        for block in model.transformer.resblocks[:model.cfg.pre_layers]:
            x = block(x)
        probs = torch.sigmoid(model.boundary_predictor(x[:, 1:]))
        expected = torch.cat([probs[:, :-1], torch.ones_like(probs[:, -1:])], 1).mean()
        assert probs.std() > 0.05, "logits should vary for this test to mean something"
        assert abs(first.boundary_rate.item() - expected.item()) < 0.02
        sampled = torch.stack([model(images, sample=True).boundary_rate for _ in range(20)]).mean()
        assert abs(first.boundary_rate.item() - sampled.item()) < 0.02
        # eval keeps the highest logits: they lie on the patches the predictor is surest of
        chosen = first.boundaries[:, :-1].bool()
        logits = model.boundary_predictor(x[:, 1:])[:, :-1]
        for b in range(32):
            if chosen[b].any() and (~chosen[b]).any():
                assert logits[b][chosen[b]].min() >= logits[b][~chosen[b]].max()


def test_eval_boundaries_rule_on_constant_logits():
    # every sigmoid = 0.25: thresholding at 0 would give no boundaries; the rule keeps 1/4
    logits = torch.full((2, 64), math.log(0.25 / 0.75))
    boundaries = eval_boundaries(logits)
    assert boundaries[:, -1].eq(1).all()
    assert boundaries.sum(1).tolist() == [round(63 * 0.25) + 1] * 2


@pytest.mark.parametrize("compress", [1, 2, 4, 10])
def test_every_trainable_parameter_gets_a_gradient(compress):
    torch.manual_seed(0)
    model = CLIP(make_config("tiny", compress=compress)).train()
    loss, vision = contrastive_loss(model, *tiny_batch(model.cfg))
    (loss + vision.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name,patches", [("ViT-B-32", 49), ("ViT-B-16", 196)])
@pytest.mark.parametrize("compress", [1, 4])
def test_output_shapes_of_named_configs(name, patches, compress):
    torch.manual_seed(0)
    model = VisionTransformer(make_config(name, compress=compress))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for out in (model.train()(images), model.eval()(images)):
            assert out.embedding.shape == (2, 512)
            S = out.tokens.shape[1]
            assert out.tokens.shape == (2, S, 768) and out.valid.shape == (2, S)
            if compress == 1:
                assert S == patches and out.valid.all()
            else:
                assert out.boundaries.shape == (2, patches)
                segments = out.valid.sum(1)
                assert (segments >= patches / 8).all() and (segments <= patches / 2).all(), segments
                assert torch.equal(segments, out.boundaries.sum(1).long())
        features = model.eval().forward_features(images, layer=-2)
        assert features.embedding is None and features.tokens.shape[2] == 768


def test_text_tower_reads_end_of_text_token():
    torch.manual_seed(0)
    model = CLIP(make_config("tiny")).eval()
    text = torch.zeros(2, 32, dtype=torch.long)
    text[0, :5] = torch.tensor([1, 7, 8, 9, 2])
    text[1, :3] = torch.tensor([1, 7, 2])
    with torch.no_grad():
        features = model.encode_text(text)
        # causal: the features at the end-of-text token do not depend on the padding or the context length
        short = model.encode_text(text[:, :6])
        x = model.ln_final(model.transformer(model.token_embedding(text) + model.positional_embedding, is_causal=True))
    torch.testing.assert_close(features, short, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(features[0], x[0, 4] @ model.text_projection)
    torch.testing.assert_close(features[1], x[1, 2] @ model.text_projection)


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match="compress must be"):
        make_config("tiny", compress=0.5)
    with pytest.raises(ValueError, match="unknown model"):
        make_config("ViT-X")


def test_given_boundaries_replace_the_predicted_ones():
    torch.manual_seed(0)
    model = VisionTransformer(make_config("tiny", compress=4)).eval()
    size, N = model.cfg.image_size, model.num_patches
    boundaries = even_boundaries(2, N, 8)
    out = model(torch.randn(2, 3, size, size), boundaries=boundaries)
    assert torch.equal(out.boundaries, boundaries) and out.tokens.shape == (2, 8, 128) and out.valid.all()


def test_pool_segments_pads_to_the_given_segment_count_without_changing_results():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 4)
    boundaries = force_last_boundary((torch.rand(3, 10) < 0.3).float())
    pooled = pool_segments(x, boundaries)
    padded = pool_segments(x, boundaries, segments=pooled.shape[1] + 5)
    assert padded.shape[1] == pooled.shape[1] + 5
    torch.testing.assert_close(padded[:, :pooled.shape[1]], pooled)
    assert (padded[:, pooled.shape[1]:] == 0).all()


# ----------------------------------------------------------------------------- packed tokens after pooling

def reference_drip(model, images, seed):
    """DRIP's training forward written out plainly: after pooling, every image runs the
    remaining blocks alone on its own real tokens (no padding, no packing, no mask), with
    the boundaries the model samples under `seed`."""
    torch.manual_seed(seed)
    cfg, B = model.cfg, len(images)
    x = model.conv1(images).flatten(2).transpose(1, 2)
    x = model.ln_pre(torch.cat([model.class_embedding.expand(B, 1, -1), x], 1) + model.positional_embedding)
    for block in model.transformer.resblocks[:cfg.pre_layers]:
        x = block(x)
    boundaries = force_last_boundary(sample_boundaries(model.boundary_predictor(x[:, 1:]).float(), cfg.tau))
    pooled = pool_segments(x[:, 1:], boundaries)
    valid = torch.arange(pooled.shape[1]) < boundaries.sum(1, keepdim=True)   # B x S: the real segments
    embeddings, tokens = [], []
    for b in range(B):
        seq = torch.cat([x[b, :1], pooled[b, valid[b]]])[None]        # 1 x (1+S_b) x D
        for block in model.transformer.resblocks[cfg.pre_layers:]:
            seq = block(seq)
        embeddings.append(model.ln_post(seq[0, 0]) @ model.proj)
        tokens.append(seq[0, 1:])
    return torch.stack(embeddings), tokens, boundaries


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_packed_path_equals_each_image_run_alone(grad_checkpointing):
    """Outputs and every parameter gradient (predictor included) of the packed batch equal
    those of running each image's real tokens through the blocks on its own."""
    torch.manual_seed(0)
    model = VisionTransformer(make_config("tiny", compress=4)).train()
    model.transformer.grad_checkpointing = grad_checkpointing
    size = model.cfg.image_size
    images = torch.randn(6, 3, size, size) * torch.linspace(0.2, 3, 6).view(6, 1, 1, 1)
    weight = torch.randn(model.cfg.embed_dim)

    def gradients(forward):
        model.zero_grad()
        embedding, boundaries = forward()
        (embedding @ weight).sum().backward()
        return embedding.detach(), boundaries, {n: p.grad.clone() for n, p in model.named_parameters()}

    def packed():
        torch.manual_seed(1)
        out = packed.out = model(images)
        return out.embedding, out.boundaries

    reference_tokens = []

    def reference():
        embedding, tokens, boundaries = reference_drip(model, images, seed=1)
        reference_tokens.extend(t.detach() for t in tokens)
        return embedding, boundaries

    embedding, boundaries, grads = gradients(packed)
    ref_embedding, ref_boundaries, ref_grads = gradients(reference)
    counts = boundaries.sum(1)
    assert torch.equal(boundaries.detach(), ref_boundaries.detach()) and len(set(counts.tolist())) > 1
    torch.testing.assert_close(embedding, ref_embedding, atol=1e-5, rtol=1e-4)
    for b, tokens in enumerate(reference_tokens):  # the padded layout callers read: real rows, then zeros
        S = int(counts[b])
        assert packed.out.valid[b].sum() == S and not packed.out.valid[b, S:].any()
        torch.testing.assert_close(packed.out.tokens[b, :S].detach(), tokens, atol=1e-5, rtol=1e-4)
        assert (packed.out.tokens[b, S:] == 0).all()
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert grads["boundary_predictor.out.weight"].abs().sum() > 0


def test_packing_plan_matches_a_naive_loop():
    lengths = [3, 1, 20, 2, 16, 17]
    plan = packing_plan(torch.tensor(lengths), multiple=8)
    assert plan.index.tolist() == [b * 24 + j for b, n in enumerate(lengths) for j in range(n)]
    assert plan.cu_seqlens.tolist() == [0, 3, 4, 24, 26, 42, 59] and plan.cu_seqlens.dtype == torch.int32
    assert (plan.max_len, plan.equal) == (20, False)
    assert plan.valid.tolist() == [[j < n for j in range(24)] for n in lengths]
    x = torch.randn(6, 24, 5)
    packed = pack(x, plan)
    torch.testing.assert_close(packed, torch.cat([x[b, :n] for b, n in enumerate(lengths)]))
    back = unpack(packed, plan)
    for b, n in enumerate(lengths):
        assert torch.equal(back[b, :n], x[b, :n]) and (back[b, n:] == 0).all()
    assert packing_plan(torch.tensor([3, 3])).equal


@pytest.mark.parametrize("lengths", [[3, 1, 20, 2, 16, 17, 40], [10, 10, 10], [16, 5, 16], [1]])
def test_packed_attention_equals_attention_written_out_per_image(lengths):
    """The padded fallback (B x L with padding masked as a key) against softmax(q k^T / sqrt(d)) v
    computed image by image, outputs and input gradients."""
    torch.manual_seed(0)
    heads, D = 2, 8
    qkv = torch.randn(sum(lengths), 3 * D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(sum(lengths), D, dtype=torch.float64)
    out = packed_attention(qkv, heads, packing_plan(torch.tensor(lengths)))
    grad, = torch.autograd.grad((out * weight).sum(), qkv)
    reference, start = [], 0
    for n in lengths:
        q, k, v = qkv[start:start + n].view(n, 3, heads, D // heads).unbind(1)   # each n x H x D/H
        attention = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(D // heads), -1)
        reference.append(torch.einsum("hij,jhd->ihd", attention, v).reshape(n, D))
        start += n
    reference = torch.cat(reference)
    reference_grad, = torch.autograd.grad((reference * weight).sum(), qkv)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grad, reference_grad)


def test_packed_blocks_compute_only_real_tokens_and_compress_1_stays_padded_free():
    """After pooling, every block sees exactly the batch's real tokens (T x D); compress 1 runs
    the plain B x (1+N) x D path with no packing at all."""
    torch.manual_seed(0)
    for compress in (1, 4):
        model = VisionTransformer(make_config("tiny", compress=compress)).train()
        shapes = []
        hooks = [block.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(
            (tuple(args[0].shape), kwargs.get("packing"))), with_kwargs=True) for block in model.transformer.resblocks]
        images = torch.randn(5, 3, model.cfg.image_size, model.cfg.image_size)
        out = model(images)
        for hook in hooks:
            hook.remove()
        if compress == 1:
            assert all(shape == (5, 1 + model.num_patches, 128) and packing is None for shape, packing in shapes)
            continue
        real = 5 + int(out.valid.sum())
        assert all(shape == (real, 128) and packing is not None for shape, packing in shapes[model.cfg.pre_layers:])


def test_varlen_attention_is_chosen_only_where_it_can_run(monkeypatch):
    assert not use_varlen(torch.zeros(2, 3)) and not use_varlen(torch.zeros(2, 3, dtype=torch.bfloat16))
    # on the CPU, bf16 autocast takes the padded fallback, forward and backward, without error
    torch.manual_seed(0)
    model = VisionTransformer(make_config("tiny", compress=4)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, model.cfg.image_size, model.cfg.image_size))
    out.embedding.float().sum().backward()
    assert model.boundary_predictor.out.weight.grad.abs().sum() > 0
    if torch.cuda.is_available():
        monkeypatch.setenv("DRIP_VARLEN", "0")
        assert not use_varlen(torch.zeros(2, 3, device="cuda", dtype=torch.bfloat16))


def reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k):
    """flash's varlen_attn by its documented contract, sequence by sequence: q/k/v T x H x D/H, int32
    cumulative lengths, max_q an upper bound of the lengths. Also checks that q/k/v are contiguous."""
    assert q.dim() == 3 and q.shape == k.shape == v.shape and all(t.is_contiguous() for t in (q, k, v))
    bounds = cu_q.tolist()
    assert cu_q.dtype == cu_k.dtype == torch.int32 and bounds == cu_k.tolist() and bounds[-1] == q.shape[0]
    assert max_q == max_k >= max(b - a for a, b in zip(bounds, bounds[1:]))
    return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                      for a, b in zip(bounds, bounds[1:])])                # T x H x D/H


def test_varlen_shapes_are_few_and_the_result_exact(monkeypatch):
    """Batches of 32 images of varying lengths reach the varlen kernel in few shapes: the longest
    length rounded up to 16, the rows to a multiple of it, the extra rows one dummy sequence of
    1..longest rows. The real rows' outputs and gradients equal the padded fallback's."""
    import model as model_module
    shapes, totals = [], set()

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k):
        rows, longest, bounds = q.shape[0], max_q, cu_q.tolist()
        assert longest % 16 == 0 and rows % longest == 0 and 1 <= bounds[-1] - bounds[-2] <= longest
        shapes.append((rows, longest, len(bounds)))
        return reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)

    monkeypatch.setattr(model_module, "varlen_attn", kernel)
    torch.manual_seed(0)
    heads, D = 2, 8
    for trial in range(40):
        lengths = 1 + torch.binomial(torch.full((32,), 140.0), torch.full((32,), 0.25)).long()  # ~36 tokens an image
        plan = packing_plan(lengths)
        totals.add(plan.cu_seqlens[-1].item())
        qkv = torch.randn(int(lengths.sum()), 3 * D, dtype=torch.float64, requires_grad=True)
        out = model_module.varlen_attention(qkv, heads, plan)
        if trial < 5:
            weight = torch.randn_like(out)
            grad, = torch.autograd.grad((out * weight).sum(), qkv)
            reference = packed_attention(qkv, heads, plan)          # the padded fallback on the CPU
            reference_grad, = torch.autograd.grad((reference * weight).sum(), qkv)
            torch.testing.assert_close(out, reference)
            torch.testing.assert_close(grad, reference_grad)
    assert {n for _, _, n in shapes} == {34}                       # 32 images and the dummy, every time
    assert len(totals) >= 20 and len(set(shapes)) * 4 <= len(totals), (len(set(shapes)), len(totals))


def test_varlen_branch_wiring_matches_the_padded_fallback_with_a_reference_kernel(monkeypatch):
    """The model through the varlen branch everywhere but in the kernel, on the CPU, with per-image
    attention standing in for flash's varlen_attn: outputs and every gradient equal the padded fallback's."""
    import model as model_module
    calls = []

    def kernel(*args):
        calls.append(len(args[3]) - 2)
        return reference_varlen_attn(*args)

    torch.manual_seed(0)
    model = VisionTransformer(make_config("tiny", compress=4)).train()
    images = torch.randn(6, 3, model.cfg.image_size, model.cfg.image_size)
    results = []
    for varlen in (True, False):
        with monkeypatch.context() as patch:
            patch.setattr(model_module, "use_varlen", lambda x: varlen)
            patch.setattr(model_module, "varlen_attn", kernel)
            model.zero_grad()
            torch.manual_seed(1)
            out = model(images)
            out.embedding.pow(2).sum().backward()
        results.append((out.embedding.detach(), out.tokens.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(set(out.valid.sum(1).tolist())) > 1, "the images should differ in length"
    assert calls == [6] * (model.cfg.layers - model.cfg.pre_layers)  # every block after pooling, the varlen run only
    (varlen_embedding, varlen_tokens, varlen_grads), (embedding, tokens, grads) = results
    torch.testing.assert_close(varlen_embedding, embedding, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(varlen_tokens, tokens, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(varlen_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen attention needs a GPU")
@pytest.mark.parametrize("name,overrides", [
    ("tiny", dict(compress=4)),                                        # short sequences, head dim 32
    ("ViT-B-16", dict(compress=1.25, layers=4, pre_layers=1)),          # ~158 tokens an image, head dim 64
])
def test_varlen_path_matches_the_padded_fallback_on_gpu(monkeypatch, name, overrides):
    """bf16 on CUDA, also past 128 tokens an image (where cuDNN may take over from flash): the
    varlen path's outputs and gradients are as close to a float32 run as DRIP_VARLEN=0's padded
    fallback in bf16 is (relative error at most twice the fallback's, plus 1e-3)."""
    from model import varlen_attn
    if varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen (2.10+)")
    torch.manual_seed(0)
    model = VisionTransformer(make_config(name, **overrides)).cuda().train()
    images = torch.randn(16, 3, model.cfg.image_size, model.cfg.image_size, device="cuda")
    assert use_varlen(torch.zeros(1, device="cuda", dtype=torch.bfloat16))
    results = []
    for switch, half in (("1", True), ("0", True), ("0", False)):  # varlen bf16, padded bf16, padded float32
        monkeypatch.setenv("DRIP_VARLEN", switch)
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=half):
            out = model(images)
        out.embedding.float().pow(2).sum().backward()
        results.append({"embedding": out.embedding.float(), **{n: p.grad.float().clone() for n, p in model.named_parameters()}})
    assert name == "tiny" or out.valid.sum(1).max() > 128
    varlen, padded, reference = results
    for key, exact in reference.items():
        error = lambda x: ((x[key] - exact).norm() / exact.norm().clamp(min=1e-12)).item()  # noqa: E731
        print(f"{name} {key}: relative error varlen {error(varlen):.2e}, padded {error(padded):.2e}")
        assert error(varlen) <= 2 * error(padded) + 1e-3, key


@pytest.mark.parametrize("name,compress", [("tiny", 4), ("tiny", 2), ("ViT-B-16", 4)])
def test_predictor_starts_at_the_target_rate(name, compress):
    """With the forced last boundary counted, a fresh model samples N/compress boundaries per
    image on average, and its eval rule keeps round(N/compress)."""
    torch.manual_seed(0)
    cfg = make_config(name, compress=compress)
    N = (cfg.image_size // cfg.patch_size) ** 2
    predictor = VisionTransformer(cfg).boundary_predictor
    predictor.fc.weight.data.zero_()  # logits = the initial output bias alone
    logits = predictor(torch.randn(256, N, cfg.width)).detach()
    sampled = force_last_boundary(sample_boundaries(logits)).sum(1).mean().item()
    assert sampled == pytest.approx(N / compress, rel=0.03)
    assert eval_boundaries(logits).sum(1).unique().tolist() == [round(N / compress)]


# ----------------------------------------------------------------------------- entropy-spike boundaries (DTP)

def naive_spikes(entropy, window):
    """DTP's rule written out: position t spikes when its entropy exceeds each of the `window` before it."""
    return [[all(row[t] > row[t - k] for k in range(1, window + 1) if t - k >= 0) for t in range(len(row))]
            for row in entropy.tolist()]


@pytest.mark.parametrize("window", [1, 2])
def test_entropy_spikes_match_a_written_out_loop(window):
    entropy = torch.tensor([[0.5, 0.2, 0.9, 0.1, 0.4, 0.3, 1.5, 1.4, 0.0, 2.0],
                            [1.0, 1.0, 1.0, 2.0, 0.5, 0.6, 0.7, 0.1, 0.2, 0.3]])
    assert entropy_spikes(entropy, window).tolist() == naive_spikes(entropy, window)
    torch.manual_seed(0)
    entropy = torch.rand(16, 35)
    assert entropy_spikes(entropy, window).tolist() == naive_spikes(entropy, window)


def test_entropy_targets_are_rate_matched_and_take_the_highest_spikes_first():
    torch.manual_seed(0)
    entropy = torch.rand(32, 36)
    targets = entropy_targets(entropy, segments=9)
    assert targets.sum(1).tolist() == [9.0] * 32 and targets[:, -1].tolist() == [1.0] * 32
    for row, chosen in zip(entropy, targets):  # written out: spikes by entropy, then the rest by entropy
        H = row[:-1].tolist()
        spikes = naive_spikes(row[None, :-1], 1)[0]
        order = sorted(range(35), key=lambda i: (not spikes[i], -H[i]))
        assert sorted(order[:8]) == chosen[:-1].nonzero().flatten().tolist()


def entropy_tower():
    torch.manual_seed(0)
    return VisionTransformer(make_config("tiny", compress=4, boundaries="entropy"))


def test_entropy_model_is_causal():
    """The prediction of patch p is made at position p-1 from patches <= p-1: changing patch j leaves the
    predictions of patches <= j unchanged (positions < j), and changes the next one's."""
    model = entropy_tower().entropy_model.eval()
    tokens = torch.randn(2, 36, 128)
    for j in (0, 7, 20, 35):
        changed = tokens.clone()
        changed[:, j] += torch.randn(2, 128)
        before, after = model(tokens)[0], model(changed)[0]
        torch.testing.assert_close(before[:, :j], after[:, :j], rtol=0, atol=0)
        assert not torch.allclose(before[:, j], after[:, j])


def test_entropy_targets_carry_no_gradient_into_the_entropy_model_nor_its_loss_into_the_tower():
    tower = entropy_tower().train()
    images = torch.randn(4, 3, 48, 48)
    tokens = tower.transformer.run_block(0, tower.embed(images))[:, 1:]
    entropy, word_loss = tower.entropy_model(tokens, patch_words(images, 8))
    targets = entropy_targets(entropy, 9)
    assert not entropy.requires_grad and not targets.requires_grad
    logits = tower.boundary_predictor(tokens).float()
    F.binary_cross_entropy_with_logits(logits[:, :-1], targets[:, :-1]).backward(retain_graph=True)
    assert all(p.grad is None for p in tower.entropy_model.parameters())  # the targets: no gradient into it
    assert tower.boundary_predictor.out.weight.grad is not None
    tower.zero_grad(set_to_none=True)
    word_loss.backward()
    assert all(p.grad is not None for p in tower.entropy_model.parameters())
    assert tower.conv1.weight.grad is None  # its own loss trains it alone: it reads detached tokens


def test_patch_words_are_each_patchs_quantised_mean_colour():
    images = torch.zeros(1, 3, 16, 16)
    images[0, :, :8, :8] = torch.tensor([-1.0, 0.5, 1.0])[:, None, None]   # patch 0: levels 0, 2, 3
    images[0, :, :8, 8:] = torch.tensor([0.8, -0.5, -0.2])[:, None, None]   # patch 1: levels 3, 1, 1
    # patches 2 and 3 are 0 in every channel: on the cut at 0, which takes the lower level, 1
    assert patch_words(images, 8).tolist() == [[0 * 16 + 2 * 4 + 3, 3 * 16 + 1 * 4 + 1, 1 * 16 + 1 * 4 + 1,
                                                1 * 16 + 1 * 4 + 1]]


def test_entropy_tower_holds_the_rate_and_costs_what_drip_costs_in_eval():
    """Training and eval keep round(N/compress) boundaries at the start (exactly on target), the
    auxiliary loss is the BCE plus the word loss in training, nothing in eval; eval runs no entropy model."""
    tower = entropy_tower()
    images = torch.randn(8, 3, 48, 48)
    trained = tower.train()(images)
    assert trained.boundaries.sum(1).tolist() == [9.0] * 8 and trained.aux_loss > 0
    calls = []
    tower.entropy_model.register_forward_hook(lambda *args: calls.append(1))
    evaluated = tower.eval()(images)
    assert evaluated.boundaries.sum(1).tolist() == [9.0] * 8 and evaluated.aux_loss == 0 and not calls
    gumbel = VisionTransformer(make_config("tiny", compress=4))
    assert {k for k in tower.state_dict() if not k.startswith("entropy_model.")} == set(gumbel.state_dict())

"""Other ways to shorten a ViT, for side-by-side comparison with DRIP at the same analytic MACs.

    uniform       DRIP's pooling at fixed, evenly spaced cuts (isolates learned placement)
    tome          Token Merging (Bolya et al., ICLR 2023)
    dynamicvit    token pruning at three stages (Rao et al., NeurIPS 2021)
    tokenlearner  learned spatial maps (Ryoo et al., NeurIPS 2021; scenic's V1.1)
    group         iterative grouping into centres (after Native Segmentation ViT, Brasó et al., 2025)

Importing this file registers each in model.REDUCER_CLASSES, where the image tower finds
it by its config's `reducer` name (model.py never imports this file). A reducer is a module
built from the config, with `start` (the first block it changes), run(transformer, x,
last_layer, sample), which runs blocks start..last_layer on the B x (1+N) x D tokens (CLS
first) and returns what VisionTransformer.run returns, and macs(cfg), its analytic eval
multiply-adds per image. At a given compress each is set to DRIP's analytic MACs: ToMe's r
and DynamicViT's keep rate are solved for it, the others keep S = round(N / compress).

    import reducers
    from model import CLIP, make_config
    model = CLIP(make_config("tiny", compress=4, reducer="tome"))
"""
import math
from dataclasses import replace
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (REDUCER_CLASSES, Attention, CLIPConfig, ResidualAttentionBlock, even_boundaries, expected_segments,
                   image_tower_macs, pool_segments, run_checkpointed, split_heads, tower_macs)


def describe_reducer(cfg: CLIPConfig):
    """One line on how the tower is shortened, with ToMe's and DynamicViT's solved settings."""
    N, S = cfg.num_patches, expected_segments(cfg)
    if cfg.compress == 1:
        return f"plain ViT, {N} patch tokens"
    if cfg.reducer == "tome":
        start, r = tome_schedule(cfg)
        return f"tome: r = {r} tokens merged in each block from block {start}, at DRIP's {cfg.compress:g}x MACs"
    if cfg.reducer == "dynamicvit":
        rho = dynamicvit_keep_rate(cfg)
        kept = " -> ".join(str(k) for k in [N] + dynamicvit_kept(cfg, rho))
        return (f"dynamicvit: keep rate rho = {rho:.3f} before blocks {dynamicvit_stages(cfg)}, "
                f"patch tokens {kept}, at DRIP's {cfg.compress:g}x MACs")
    what = "expected " if cfg.reducer == "drip" else ""
    how = (", boundaries learnt from entropy spikes (an entropy model in training only)"
           if cfg.reducer == "drip" and cfg.boundaries == "entropy" else "")
    return f"{cfg.reducer}: {N} -> {what}{S} patch tokens before block {cfg.pre_layers}{how}"


def attention_with_keys(attn: Attention, x, bias=None, policy=None):
    """Attention.forward's computation, as ToMe's and DynamicViT's code patch timm's attention.

    x: B x L x D -> (B x L x D output, B x L x D/H keys averaged over heads: ToMe's
    similarity). bias: B x 1 x 1 x L added to the logits (ToMe's proportional attention).
    policy: B x L, 0 = a dropped token: DynamicViT's softmax_with_policy, written out. Token
    j is a key for query i when kept or when j = i (the paper's G_ii = 1: a dropped token
    still attends to itself), exp(logit) x G normalised with its eps = 1e-6 smoothing,
    float32; G multiplies, so the gradient reaches the keep decisions.
    """
    B, L, D = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)            # B x L x 3D
    q, k, v = split_heads(qkv, attn.heads)                              # each B x H x L x D/H
    if policy is None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    else:
        logits = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # B x H x L x L
        keys = policy[:, None, None, :].float()                           # B x 1 x 1 x L
        eye = torch.eye(L, device=x.device)
        weights = (logits - logits.amax(-1, keepdim=True)).exp() * (keys + (1 - keys) * eye)
        weights = (weights + 1e-6 / L) / (weights.sum(-1, keepdim=True) + 1e-6)
        y = weights.to(v.dtype) @ v                                       # B x H x L x D/H
    return attn.out_proj(y.transpose(1, 2).reshape(B, L, D)), k.mean(1)


class ReduceOnce(nn.Module):
    """Base of the reducers that act once, before block pre_layers: N patch tokens -> S tokens.
    extra_macs(cfg, N, S, D) is what the reduction itself costs per image."""

    @classmethod
    def macs(cls, cfg: CLIPConfig):
        N, S = cfg.num_patches, expected_segments(cfg)
        tokens = [1 + N] * cfg.pre_layers + [1 + S] * (cfg.layers - cfg.pre_layers)
        return tower_macs(cfg, tokens, tokens, cls.extra_macs(cfg, N, S, cfg.width))

    def run(self, transformer, x, last_layer, sample):
        patches, boundaries = self.reduce(x[:, 1:])            # B x S x D, B x N or None
        rate = x.new_tensor(patches.shape[1] / (x.shape[1] - 1), dtype=torch.float32)
        x = torch.cat([x[:, :1], patches], 1)                   # B x (1+S) x D
        for i in range(self.start, last_layer + 1):
            x = transformer.run_block(i, x)
        keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return x, keep, boundaries, x.new_zeros((), dtype=torch.float32), rate


# --- uniform: DRIP's pooling at fixed, evenly spaced cuts

class UniformPooling(ReduceOnce):
    """The ablation of DRIP that isolates learned placement: no predictor, S = round(N / compress)
    segments of (nearly) equal length in raster order, mean-pooled by `pool_segments`."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.start, self.segments = cfg.pre_layers, expected_segments(cfg)

    @staticmethod
    def extra_macs(cfg, N, S, D):
        return N * S * D                                        # the pooling einsum

    def reduce(self, x):                                        # B x N x D -> B x S x D, B x N
        boundaries = even_boundaries(len(x), x.shape[1], self.segments, x.device).to(x.dtype)
        return pool_segments(x, boundaries), boundaries


# --- tome: Token Merging

def bipartite_soft_matching(keys, r):
    """ToMe's matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

    keys: B x L x d, CLS first. Tokens alternate into set A (even positions) and B (odd);
    each A token is matched to its most similar B token (cosine), and the r A tokens
    with the most similar matches are merged into them. CLS (A's first) never merges.
    Returns keep B x (|A| - r) (A tokens that stay, in order), src B x r (A tokens that
    merge) and dst B x r (the B token each one merges into).
    """
    keys = F.normalize(keys.float(), dim=-1)
    scores = keys[:, ::2] @ keys[:, 1::2].transpose(1, 2)      # B x |A| x |B|
    scores[:, 0] = -math.inf                                   # protect CLS
    best, match = scores.max(2)                                # B x |A|
    order = best.argsort(dim=1, descending=True, stable=True)  # B x |A|
    src, keep = order[:, :r], order[:, r:].sort(1).values      # CLS stays first among the kept
    return keep, src, match.gather(1, src)


def merge_tokens(x, size, keep, src, dst):
    """Size-weighted means: each merging A token is added into its B token, sizes add up.

    x: B x L x D, size: B x L (patches each token stands for) -> B x (L - r) x D,
    B x (L - r): the kept A tokens, then the B tokens.
    """
    weighted = torch.cat([x * size[..., None], size[..., None]], 2)  # B x L x (D+1)
    a, b = weighted[:, ::2], weighted[:, 1::2]                  # B x |A| x (D+1), B x |B| x (D+1)
    src, dst, keep = (i[..., None].expand(-1, -1, weighted.shape[2]) for i in (src, dst, keep))  # B x k x (D+1)
    b = b.scatter_add(1, dst, a.gather(1, src))                 # B x |B| x (D+1)
    merged = torch.cat([a.gather(1, keep), b], 1)               # B x (L-r) x (D+1)
    size = merged[..., -1]
    return (merged[..., :-1] / size[..., None]).to(x.dtype), size


def tome_block(block: ResidualAttentionBlock, x, size, r):
    """A block with ToMe between attention and MLP; log(size) is added to the attention logits
    (proportional attention), so a merged token weighs as the patches it stands for."""
    y, keys = attention_with_keys(block.attn, block.ln_1(x), bias=size.log()[:, None, None, :])
    x = x + y
    r = min(r, (x.shape[1] - 1) // 2)                          # at most half, CLS aside
    if r > 0:
        x, size = merge_tokens(x, size, *bipartite_soft_matching(keys, r))
    return x + block.mlp(block.ln_2(x)), size


def tome_plan(cfg: CLIPConfig, start, r):
    """Tokens seen by each block's attention and MLP, and the matching's MACs, with ToMe from block `start`."""
    L, d = 1 + cfg.num_patches, cfg.width // cfg.heads
    attention, mlp, extra = [], [], 0
    for i in range(cfg.layers):
        attention.append(L)
        if i >= start:
            extra += ((L + 1) // 2) * (L // 2) * d               # |A| x |B| similarities
            L -= min(r, (L - 1) // 2)
        mlp.append(L)
    return attention, mlp, extra


@lru_cache
def tome_schedule(cfg: CLIPConfig):
    """(start, r) at DRIP's MACs: the latest first block <= pre_layers from which some r gets within
    5 %, and the r closest to the budget (at 4x a 4-layer tower must begin merging before DRIP pools)."""
    target = image_tower_macs(replace(cfg, reducer="drip"))
    N = cfg.num_patches
    for start in range(cfg.pre_layers, -1, -1):
        error, r = min((abs(tower_macs(cfg, *tome_plan(cfg, start, r)) - target), r) for r in range(N // 2 + 1))
        if error <= 0.05 * target:
            break
    return start, r


class ToMe(nn.Module):
    """Token Merging (Bolya et al., ICLR 2023): in every block from `start` on, merge the r most
    similar token pairs (bipartite soft matching on the attention keys), with size-weighted
    means and proportional attention. No parameters; the same in training and eval."""

    def __init__(self, cfg: CLIPConfig, r=None):
        super().__init__()
        self.start, self.r = tome_schedule(cfg)
        self.r = self.r if r is None else r

    @staticmethod
    def macs(cfg: CLIPConfig):
        return tower_macs(cfg, *tome_plan(cfg, *tome_schedule(cfg)))

    def run(self, transformer, x, last_layer, sample):
        N = x.shape[1] - 1
        size = torch.ones(x.shape[:2], device=x.device)        # B x L: patches per token
        for i in range(self.start, last_layer + 1):
            x, size = run_checkpointed(transformer, tome_block, transformer.resblocks[i], x, size, self.r)
        keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        rate = x.new_tensor((x.shape[1] - 1) / N, dtype=torch.float32)
        return x, keep, None, x.new_zeros((), dtype=torch.float32), rate


# --- dynamicvit: token pruning at three stages

class KeepPredictor(nn.Module):
    """DynamicViT's prediction module: per token, log-probabilities of (keep, drop) from its own
    features and the mean of the kept tokens' (half the channels each)."""

    def __init__(self, width):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width // 4),
                                      nn.GELU(), nn.Linear(width // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x, policy):                               # B x n x D, B x n -> B x n x 2
        x = self.in_conv(x)
        local, rest = x.chunk(2, dim=2)                         # B x n x D/2 each
        policy = policy[..., None].to(x.dtype)
        kept = policy.sum(1, keepdim=True)                      # B x 1 x 1; where, not clamp: the count keeps its gradient
        global_ = (rest * policy).sum(1, keepdim=True) / torch.where(kept > 0, kept, 1)  # B x 1 x D/2
        return self.out_conv(torch.cat([local, global_.expand_as(rest)], 2))


def dynamicvit_stages(cfg: CLIPConfig):
    """Blocks before which tokens are pruned: three, evenly spread over the blocks after pre_layers."""
    rest = cfg.layers - cfg.pre_layers
    return sorted({cfg.pre_layers + round(j * rest / 3) for j in range(3)})


def dynamicvit_kept(cfg: CLIPConfig, keep_rate):
    """Patch tokens kept after each stage: round(rho^j N), at least 1."""
    N = cfg.num_patches
    return [max(1, round(keep_rate ** (j + 1) * N)) for j in range(len(dynamicvit_stages(cfg)))]


def dynamicvit_plan(cfg: CLIPConfig, keep_rate):
    """Tokens per block (attention = MLP) and the prediction modules' MACs, at eval."""
    D, n = cfg.width, cfg.num_patches
    stages, kept = dynamicvit_stages(cfg), dynamicvit_kept(cfg, keep_rate)
    tokens, extra = [], 0
    for i in range(cfg.layers):
        if i in stages:
            extra += n * (D * D + D * (D // 2) + (D // 2) * (D // 4) + (D // 4) * 2)
            n = kept[stages.index(i)]
        tokens.append(1 + n)
    return tokens, tokens, extra


@lru_cache
def dynamicvit_keep_rate(cfg: CLIPConfig):
    """rho in (0, 1] whose eval MACs are closest to DRIP's at cfg.compress (on a grid of 0.005)."""
    target = image_tower_macs(replace(cfg, reducer="drip"))
    return min((abs(tower_macs(cfg, *dynamicvit_plan(cfg, rho)) - target), rho)
               for rho in (i / 200 for i in range(1, 201)))[1]


def policy_block(block: ResidualAttentionBlock, x, policy):
    """A block in which tokens with policy 0 are keys of themselves only (DynamicViT's training-time masking)."""
    x = x + attention_with_keys(block.attn, block.ln_1(x), policy=policy)[0]
    return x + block.mlp(block.ln_2(x))


class DynamicViT(nn.Module):
    """DynamicViT (Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token
    Sparsification", NeurIPS 2021): before each of three stages a prediction module keeps
    rho, rho^2, rho^3 of the patch tokens (CLS always kept).

    Training: hard Gumbel-Softmax keep decisions (straight-through), each stage's multiplied
    by the previous one's; every token stays in place and dropped ones are masked as
    attention keys of every other token (softmax_with_policy), so shapes are fixed and the
    task loss reaches the decisions. aux_loss
    is the keep-ratio loss, 2 x the mean over stages of (kept fraction - rho^j)^2 (the
    paper's weight; its distillation losses need a teacher and are left out). Eval: the
    top round(rho^j N) tokens by keep score, gathered in raster order.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.keep_rate = dynamicvit_keep_rate(cfg)
        self.stages, self.kept = dynamicvit_stages(cfg), dynamicvit_kept(cfg, self.keep_rate)
        self.start = self.stages[0]
        self.predictors = nn.ModuleList([KeepPredictor(cfg.width) for _ in self.stages])

    @staticmethod
    def macs(cfg: CLIPConfig):
        return tower_macs(cfg, *dynamicvit_plan(cfg, dynamicvit_keep_rate(cfg)))

    def run(self, transformer, x, last_layer, sample):
        B, N = x.shape[0], x.shape[1] - 1
        policy = x.new_ones(B, N, dtype=torch.float32)         # B x N: 1 = still kept
        losses = []
        for i in range(self.start, last_layer + 1):
            if i in self.stages:
                j = self.stages.index(i)
                log_probs = self.predictors[j](x[:, 1:], policy).float()  # B x n x 2
                if sample:
                    policy = F.gumbel_softmax(log_probs, hard=True)[..., 0] * policy  # B x N, straight-through
                    losses.append((policy.mean(1) - self.keep_rate ** (j + 1)).pow(2).mean())
                else:  # the authors keep int(rho^j N) in score order; here round(), in raster order (only
                    # LLaVA reads the order: attention is order-blind), so the budget can be matched to DRIP's
                    top = log_probs[..., 0].topk(self.kept[j], dim=1).indices.sort(1).values  # B x k
                    x = torch.cat([x[:, :1], x[:, 1:].gather(1, top[..., None].expand(-1, -1, x.shape[2]))], 1)
                    policy = policy.new_ones(B, self.kept[j])
            if sample:
                keys = torch.cat([policy.new_ones(B, 1), policy], 1)  # B x (1+N): CLS always a key
                x = run_checkpointed(transformer, policy_block, transformer.resblocks[i], x, keys)
            else:
                x = transformer.run_block(i, x)
        keep = torch.cat([policy.new_ones(B, 1), policy], 1) > 0  # B x (1+n)
        aux_loss = 2 * torch.stack(losses).mean() if losses else x.new_zeros((), dtype=torch.float32)
        rate = policy.detach().sum(1).mean() / N
        return x, keep, None, aux_loss, rate


# --- tokenlearner: learned spatial attention maps

class TokenLearner(ReduceOnce):
    """TokenLearner (Ryoo et al., "TokenLearner: What Can 8 Learned Tokens Do for Images and
    Videos?", NeurIPS 2021), as scenic's TokenLearnerModuleV11 (the paper's version 1.1):
    LayerNorm, then an MLP on each patch token (hidden width 64, scenic's bottleneck_dim;
    flax's tanh-approximated GELU) gives S = round(N / compress) logits, a softmax over the
    patches turns each into a spatial map, and each output token is its map's weighted sum
    of the patch tokens. Inserted once, before block pre_layers (scenic places it after a
    chosen block likewise). Dropout is scenic's default, 0."""
    bottleneck = 64

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.start = cfg.pre_layers
        self.ln = nn.LayerNorm(cfg.width)
        self.fc = nn.Linear(cfg.width, self.bottleneck)
        self.maps = nn.Linear(self.bottleneck, expected_segments(cfg))

    @classmethod
    def extra_macs(cls, cfg, N, S, D):
        return N * (D + S) * cls.bottleneck + S * N * D         # the map MLP, the weighted sums

    def reduce(self, x):                                        # B x N x D -> B x S x D
        maps = self.maps(F.gelu(self.fc(self.ln(x)), approximate="tanh")).transpose(1, 2).softmax(2)  # B x S x N
        return maps @ x, None


# --- group: iterative grouping into centres

class TokenGrouping(ReduceOnce):
    """A grouping layer in the spirit of Native Segmentation ViT (Brasó et al., NeurIPS 2025).

    S = round(N / compress) centres start as the average pool of the patches' keys (a
    LayerNorm and a learned projection) into an h x w grid (h * w = S). Then `iters` times
    each patch spreads a softmax assignment over the centres whose cells neighbour its own,
    by key similarity; between assignments each centre becomes the assignment-weighted mean
    of its patches' keys (k-means / slot-attention style). The output tokens are the last
    assignment's weighted means of the patch tokens themselves. Inserted once, before block
    pre_layers. Departures from the paper, which describes rather than publishes its layer:
    keys from one linear layer, and a fixed neighbourhood of adjacent cells.
    """
    iters = 3

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.start, S, g = cfg.pre_layers, expected_segments(cfg), cfg.image_size // cfg.patch_size
        h = max(d for d in range(1, math.isqrt(S) + 1) if S % d == 0)
        self.shape = (h, S // h)
        self.ln = nn.LayerNorm(cfg.width)
        self.key = nn.Linear(cfg.width, cfg.width)
        patch = torch.arange(g).float()                         # patch coordinate along an axis
        near = []
        for axis, cells in zip((0, 1), self.shape):
            centre = (torch.arange(cells).float() + 0.5) * g / cells - 0.5  # cell centres, in patch units
            near.append((patch[:, None] - centre[None, :]).abs() <= g / cells)  # g x cells: neighbouring cells
        self.register_buffer("near", (near[0][:, None, :, None] & near[1][None, :, None, :]).reshape(g * g, S),
                             persistent=False)                 # N x S

    @classmethod
    def extra_macs(cls, cfg, N, S, D):
        return N * D * D + N * D + 2 * cls.iters * N * S * D    # keys, the grid pool, the iterations

    def reduce(self, x):                                        # B x N x D -> B x S x D
        B, N, D = x.shape
        g = math.isqrt(N)
        keys = self.key(self.ln(x))                             # B x N x D
        centres = F.adaptive_avg_pool2d(keys.transpose(1, 2).reshape(B, D, g, g), self.shape)  # B x D x h x w
        centres = centres.flatten(2).transpose(1, 2)           # B x S x D
        for step in range(self.iters):
            logits = keys @ centres.transpose(1, 2) * D ** -0.5  # B x N x S
            assign = logits.masked_fill(~self.near, -math.inf).softmax(2)  # each patch over its nearby centres
            weights = assign / assign.sum(1, keepdim=True).clamp(min=1e-6)  # B x N x S: a mean per centre
            if step < self.iters - 1:
                centres = weights.transpose(1, 2) @ keys        # B x S x D
        return weights.transpose(1, 2) @ x, None


REDUCER_CLASSES.update(uniform=UniformPooling, tome=ToMe, dynamicvit=DynamicViT, tokenlearner=TokenLearner,
                       group=TokenGrouping)
REDUCERS = ("drip",) + tuple(REDUCER_CLASSES)  # every choice of --reducer

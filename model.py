"""DRIP: a Vision Transformer that learns where to cut its patch tokens into segments.

After `pre_layers` blocks on all patch tokens, a small boundary predictor marks the
patches that end a segment (Gumbel-Sigmoid sampling with straight-through hard
boundaries while training, a deterministic top-k rule in eval). Patches are cut in
raster order at those boundaries and each segment is mean-pooled into one token, so
the remaining blocks run on about 1/compress of the tokens. A binomial prior and a
controller on the logits keep the boundary rate at 1/compress. compress=1 is the plain ViT.
With boundaries="entropy" (Dynamic Token Pooling's other predictor) the predictor learns
instead from where a small causal model over the patches, run in training only, finds the
next patch hard to predict.

The file reads top to bottom: configuration, DRIP's pure functions, attention (packed
after pooling), the boundary predictor and the image tower, CLIP (open_clip's module and
parameter names, so pretrained CLIP weights load by name), and the LLaVA glue that feeds an
image's valid segment tokens through a projector into a language model (llama.py).
Other ways to shorten the tower, for comparison at DRIP's MACs, live in reducers.py.

    from model import CLIP, make_config
    model = CLIP(make_config("ViT-B-16", compress=4))
    image_features, text_features, logit_scale, vision = model(images, text)
    loss = contrastive_loss(...) + vision.aux_loss   # vision.boundary_rate ~ 0.25
"""
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # flash attention on packed variable-length sequences (torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


# -----------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512          # joint image-text embedding size
    # image tower
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    # DRIP
    compress: float = 1.0         # target tokens in / tokens out; 1 = plain ViT
    reducer: str = "drip"         # how tokens are cut: drip, or a comparison reducer of reducers.py
    pre_layers: int = 2           # blocks run on every patch before pooling
    tau: float = 0.5              # Gumbel-Sigmoid temperature
    boundaries: str = "gumbel"    # gumbel (trained through the task) | entropy (trained on entropy spikes, DTP)
    quick_gelu: bool = False      # OpenAI's CLIP weights were trained with x * sigmoid(1.702 x)
    # text tower
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    def __post_init__(self):
        if not self.compress >= 1:
            raise ValueError(f"compress must be a number >= 1 (1 = plain ViT), got {self.compress}")
        if self.reducer != "drip" and self.reducer not in REDUCER_CLASSES:
            raise ValueError(f"unknown reducer {self.reducer!r}; choose one of drip, {', '.join(REDUCER_CLASSES)}"
                             " (the others are registered by `import reducers`)")
        if self.boundaries not in ("gumbel", "entropy"):
            raise ValueError(f"boundaries must be gumbel or entropy, got {self.boundaries!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.compress > 1 and not 0 < self.pre_layers < self.layers:
            raise ValueError(f"pre_layers must be between 1 and layers-1 ({self.layers - 1}), got {self.pre_layers}")


# name -> module class of the other ways to shorten the tower; reducers.py fills it
REDUCER_CLASSES = {}

CONFIGS = {
    "ViT-B-32": CLIPConfig(patch_size=32),
    "ViT-B-16": CLIPConfig(patch_size=16),
    # LLaVA-1.5's image tower is ViT-L/14 at 336 px: 24 x 24 = 576 patch tokens into the LLM
    "ViT-L-14": CLIPConfig(embed_dim=768, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096,
                           text_width=768, text_heads=12),
    "ViT-L-14-336": CLIPConfig(embed_dim=768, image_size=336, patch_size=14, width=1024, layers=24, heads=16,
                               mlp_dim=4096, text_width=768, text_heads=12),
    # trains in minutes on a 2-core CPU: 6x6 patches of 8 px
    "tiny": CLIPConfig(embed_dim=128, image_size=48, patch_size=8, width=128, layers=4, heads=4,
                       mlp_dim=512, pre_layers=1, context_length=32, vocab_size=1024,
                       text_width=128, text_layers=2, text_heads=4),
}


def make_config(name, **overrides):
    """A named configuration with some fields replaced, e.g. make_config("tiny", compress=4)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)


# -----------------------------------------------------------------------------
# The DRIP pieces, as pure functions


def round_up(n, multiple):
    """n (an int or an integer tensor) rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def sample_boundaries(logits, tau=0.5):
    """Gumbel-Sigmoid: hard 0/1 boundaries whose gradient is that of the relaxed sample.

    logits: B x N. The difference of two Gumbel variables is logistic noise, so
    sigmoid((logits + logistic) / tau) is a relaxed Bernoulli(sigmoid(logits)) sample.
    """
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)  # B x N
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft  # straight-through: value hard, gradient soft


def eval_boundaries(logits, segments=None):
    """Deterministic boundaries at the training-time rate.

    Thresholding logits at 0 would give almost no boundaries when every
    sigmoid(logit) is about 1/compress. Instead keep as many boundaries as training
    expects: the last patch (always a boundary, as in `force_last_boundary`) and, among
    the other N-1 patches, the k = round(sum sigmoid(l_i)) with the highest logits
    (k = segments - 1 in every image when `segments` is given).
    """
    probs = torch.sigmoid(logits[:, :-1])                       # B x N-1
    k = probs.sum(1).round() if segments is None else torch.full_like(probs[:, 0], segments - 1)  # B, besides the last
    rank = logits[:, :-1].argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # B x N-1
    chosen = (rank < k[:, None]).to(logits.dtype)               # B x N-1
    return torch.cat([chosen, torch.ones_like(chosen[:, :1])], 1)


def even_boundaries(batch_size, num_patches, segments, device=None):
    """B x N boundaries cutting the patches into `segments` nearly equal runs (DynamicViT-style FLOP counting)."""
    ends = torch.round(torch.arange(1, segments + 1, device=device) * num_patches / segments).long() - 1
    boundaries = torch.zeros(batch_size, num_patches, device=device)
    boundaries[:, ends] = 1
    return boundaries


def force_last_boundary(boundaries):
    """The last patch ends a segment, so no token is left out of the pooling."""
    ones = torch.ones_like(boundaries[:, -1:])
    return torch.cat([boundaries[:, :-1], ones], 1)


def pool_segments(x, boundaries, segments=None):
    """Mean-pool contiguous segments of tokens; boundary i = 1 means token i ends its segment.

    x: B x N x D, boundaries: B x N hard 0/1 (straight-through or plain) with the last token a
    boundary -> B x S x D, zero rows after each image's segments, S the largest segment count
    or `segments` when the caller knows it (no host sync). Token i's weight in segment s is
    1 + (s - seg_i) where s == seg_i: exactly 0/1, but built from `boundaries` through cumsum,
    so the task loss trains whatever made them. Raising b_j inside a segment then fades the
    patches after j out of its mean (DTP writes 1 - (s - seg_i): same value, opposite gradient),
    and a one-patch segment, not divided by its count, fades out its patch itself. Pinned by
    test_boundary_gradient_cuts_the_tail_out_of_its_segment_and_fades_one_patch_segments.
    """
    segment = boundaries.cumsum(1) - boundaries                 # B x N: sum_{j<i} b_j
    S = segments if segments is not None else int(boundaries.sum(1).max())  # host sync: a shape
    offset = torch.arange(S, device=x.device, dtype=boundaries.dtype) - segment.unsqueeze(2)  # B x N x S
    member = torch.where(offset == 0, 1 + offset, torch.zeros_like(offset))  # B x N x S: 1 iff token n is in segment s
    count = member.sum(1, keepdim=True)                         # B x 1 x S: patches per segment, 0 for padding
    weights = member / torch.where(count > 1, count, 1)         # B x N x S: each segment's column sums to 1
    return torch.einsum("bnd,bns->bsd", x, weights.to(x.dtype))  # B x S x D


def boundary_loss(boundaries, p):
    """Binomial prior: -log Binomial(k; n, p) / n with k the boundary count of each image.

    boundaries: B x N hard (straight-through). Its gradient in k,
    (digamma(k+1) - digamma(n-k+1) - logit(p)) / n, pulls the rate towards p from
    either side. Averaged over the batch.
    """
    n = boundaries.shape[1]
    k = boundaries.sum(1)                                       # B
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
               + k * math.log(p) + (n - k) * math.log1p(-p))
    return (-log_pmf / n).mean()


PATCH_WORDS = 64  # the entropy model's vocabulary: a patch's mean colour, 4 levels a channel


def patch_words(images, patch_size):
    """B x 3 x H x W (CLIP-normalised) -> B x N word ids, raster order: each patch's mean colour,
    each channel cut into 4 levels at -0.75, 0 and 0.75, a value on a cut taking the lower
    level (4^3 = 64 words)."""
    means = F.avg_pool2d(images.float(), patch_size).flatten(2)               # B x 3 x N
    levels = torch.bucketize(means, means.new_tensor([-0.75, 0.0, 0.75]))      # B x 3 x N, 0..3
    return levels[:, 0] * 16 + levels[:, 1] * 4 + levels[:, 2]


def entropy_spikes(entropy, window=1):
    """Dynamic Token Pooling's rule: position t spikes when its entropy exceeds that of each of
    the `window` positions before it (the first positions compare with those there are)."""
    spikes = torch.ones_like(entropy, dtype=torch.bool)
    for k in range(1, window + 1):
        spikes[:, k:] &= entropy[:, k:] > entropy[:, :-k]
    return spikes


def entropy_targets(entropy, segments, window=1):
    """B x N boundary targets from the entropy model's per-patch entropy (entropy[:, i]: how
    unpredictable patch i+1 is, so a spike ends a segment at patch i). Rate-matched to the
    budget: besides the last patch, the `segments - 1` spikes of highest entropy, topped up
    with the highest non-spikes when an image has fewer spikes, so every image gets exactly
    `segments` targets, as many as DRIP's expected segment count."""
    H = entropy[:, :-1]                                                        # B x N-1
    score = torch.where(entropy_spikes(H, window), H + H.max() - H.min() + 1, H)  # spikes first
    rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    chosen = (rank < segments - 1).to(entropy.dtype)
    return torch.cat([chosen, torch.ones_like(chosen[:, :1])], 1)


# -----------------------------------------------------------------------------
# Packed tokens: after pooling, the residual stream holds only real tokens


class Packing(NamedTuple):
    """Where the real tokens of a batch of variable-length sequences sit.

    After pooling, image b has L_b = 1 + S_b real tokens. Packed, the whole batch is one
    T x D tensor (T = sum L_b, image after image), so LayerNorms, projections and MLPs
    compute nothing for padding. Only attention needs the images apart (packed_attention).
    """
    index: torch.Tensor       # T: row of each packed token in the callers' B x L padded layout
    cu_seqlens: torch.Tensor  # B+1 int32: image b owns packed rows cu_seqlens[b] .. cu_seqlens[b+1]-1
    valid: torch.Tensor       # B x L bool: the real tokens of the callers' layout
    max_len: int              # longest L_b
    equal: bool               # every image has the same length: attention runs on a plain B x L view


def packing_plan(lengths, multiple=1):
    """lengths: B LongTensor of real tokens per image -> Packing. The one host sync after pooling.
    The callers' layout is padded to the longest image rounded up to `multiple`."""
    host = lengths.tolist()
    B, T, max_len, device = len(host), sum(host), max(host), lengths.device
    L = round_up(max_len, multiple)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))                               # B+1
    image = torch.repeat_interleave(torch.arange(B, device=device), lengths, output_size=T)  # T
    position = torch.arange(T, device=device) - cu_seqlens[image]                # T: place within its image
    valid = torch.arange(L, device=device) < lengths.unsqueeze(1)                # B x L
    return Packing(image * L + position, cu_seqlens.to(torch.int32), valid, max_len, min(host) == max_len)


def pack(x, packing):
    """B x L x D padded -> T x D real rows."""
    return x.flatten(0, 1).index_select(0, packing.index)


def unpack(x, packing):
    """T x D real rows -> B x L x D with zero padding."""
    B, L = packing.valid.shape
    return x.new_zeros(B * L, x.shape[-1]).index_copy(0, packing.index, x).view(B, L, -1)


def split_heads(qkv, heads):
    """B x L x 3D projected queries, keys and values -> q, k, v, each B x H x L x D/H (views).

    Unbound before transposing: in backward the three gradients are stacked straight into
    qkv's layout (permuting first would stack them and then copy)."""
    B, L, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    return tuple(t.transpose(1, 2) for t in qkv.view(B, L, 3, heads, D // heads).unbind(2))


def multi_head_attention(qkv, heads, attn_mask=None, is_causal=False):
    """B x L x 3D projected queries, keys and values -> B x L x D attention output."""
    B, L, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    y = F.scaled_dot_product_attention(*split_heads(qkv, heads), attn_mask=attn_mask, is_causal=is_causal)
    return y.transpose(1, 2).reshape(B, L, D)


# -----------------------------------------------------------------------------
# Transformer blocks (names as in open_clip)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention.

    Parameters are named like nn.MultiheadAttention's (in_proj_weight, in_proj_bias,
    out_proj) so that CLIP checkpoints load as they are. x is B x L x D, or T x D packed
    tokens with their `packing`.
    """

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, attn_mask=None, is_causal=False, packing=None):
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)            # B x L x 3D (packed: T x 3D)
        if packing is None:
            return self.out_proj(multi_head_attention(qkv, self.heads, attn_mask, is_causal))
        return self.out_proj(packed_attention(qkv, self.heads, packing))


def packed_attention(qkv, heads, packing):
    """T x 3D packed queries, keys and values -> T x D, each image attending only to itself."""
    T, D = qkv.shape[0], qkv.shape[1] // 3
    if packing.equal:  # nothing to pad: a plain B x L batch
        return multi_head_attention(qkv.view(len(packing.valid), -1, 3 * D), heads).view(T, D)
    if use_varlen(qkv):
        return varlen_attention(qkv, heads, packing)
    # elsewhere (CPU, float32, older torch): the padded B x L layout, padding masked as a key
    out = multi_head_attention(unpack(qkv, packing), heads, attn_mask=packing.valid[:, None, None, :])
    return pack(out, packing)                                            # T x D


def use_varlen(x):
    """Flash attention on packed sequences: CUDA, half precision, torch >= 2.10; DRIP_VARLEN=0 turns it off.
    Half precision is x's dtype or, under CUDA autocast, autocast's."""
    if not (x.is_cuda and varlen_attn is not None and os.environ.get("DRIP_VARLEN", "1") != "0"):
        return False
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype in (torch.float16, torch.bfloat16)


def varlen_attention(qkv, heads, packing):
    """packed_attention through the varlen kernel, with few distinct shapes and contiguous inputs.

    The kernel behind varlen_attn (cuDNN rather than flash, for sequences over 128 rows on
    recent GPUs) builds and caches a plan per shape, and T changes every batch. So the
    longest sequence is rounded up to 16 rows and T + 1 up to a multiple of that; the extra
    rows (at least one, never more than the longest) form one dummy sequence whose output is
    dropped. Separate contiguous q, k, v: strided views of one qkv are not safe in every release.
    """
    T, D = qkv.shape[0], qkv.shape[1] // 3
    longest = round_up(packing.max_len, 16)
    rows = round_up(T + 1, longest)
    qkv = F.pad(qkv, (0, 0, 0, rows - T))                                  # rows x 3D, zero rows last
    q, k, v = (t.contiguous() for t in qkv.view(rows, 3, heads, D // heads).unbind(1))  # each rows x H x D/H
    cu = F.pad(packing.cu_seqlens, (0, 1), value=rows)                     # B+2: the dummy sequence last
    out = varlen_attn(q, k, v, cu, cu, longest, longest)  # positional: the keywords changed in torch 2.11
    return out[:T].reshape(T, D)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width, heads, mlp_dim, quick_gelu=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_dim)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(mlp_dim, width)),
        ]))

    def forward(self, x, attn_mask=None, is_causal=False, packing=None):
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal, packing=packing)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_dim, quick_gelu=False):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_dim, quick_gelu) for _ in range(layers)])
        self.grad_checkpointing = False

    def run_block(self, i, x, attn_mask=None, is_causal=False, packing=None):
        block = self.resblocks[i]
        return run_checkpointed(self, block, x, attn_mask=attn_mask, is_causal=is_causal, packing=packing)

    def forward(self, x, attn_mask=None, is_causal=False):
        for i in range(len(self.resblocks)):
            x = self.run_block(i, x, attn_mask, is_causal)
        return x


def run_checkpointed(transformer, fn, *args, **kwargs):
    """fn(*args, **kwargs), checkpointed when the transformer uses activation checkpointing (blocks, reducers' steps)."""
    if transformer.grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def init_weights(module):
    """Weight initialisation in one place (timm / open_clip style)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, Attention):
        nn.init.trunc_normal_(module.in_proj_weight, std=0.02)
    elif isinstance(module, (nn.Conv2d, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, BoundaryPredictor):
        nn.init.constant_(module.out.bias, module.bias_init)


# -----------------------------------------------------------------------------
# The DRIP image tower


class BoundaryPredictor(nn.Module):
    """MLP on each patch token -> logit of "this patch ends a segment".

    The prior alone lets the task pull the rate below its target, so an integral controller
    holds it there: after every training step, `track_rate` moves an offset added to all
    logits by rate_gain * (target - rate), with the step's sampled rate over all ranks. The
    offset is a buffer (saved, not trained), and the eval rule sees it too, so the eval rate
    follows the training rate.
    """
    rate_gain = 1.0  # logit units per unit of rate error; the rate moves ~p(1-p) of that per step

    def __init__(self, width, p):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, 1)
        self.bias_init = math.log(p / (1 - p))  # logit(p)
        self.register_buffer("rate_offset", torch.zeros(()))

    def forward(self, x):                                       # B x N x D -> B x N
        return self.out(F.gelu(self.fc(self.ln(x)))).squeeze(2) + self.rate_offset

    @torch.no_grad()
    def track_rate(self, rate, p):
        self.rate_offset += self.rate_gain * (p - rate)


class EntropyModel(nn.Module):
    """`--boundaries entropy`, training only: one causal block over the patch tokens in raster
    order (patch i sees patches <= i) predicting the next patch's word (patch_words). It
    learns from its own likelihood loss on detached tokens, so it never shapes the tower; its
    entropy at patch i, how unpredictable patch i+1 is, gives the predictor its targets."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.block = ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_dim, cfg.quick_gelu)
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, PATCH_WORDS)

    def forward(self, tokens, words=None):
        """B x N x D patch tokens (and B x N words) -> (B x N entropies in nats, detached; the mean
        next-word loss over positions 0..N-2, or None without words)."""
        logits = self.head(self.ln(self.block(tokens.detach(), is_causal=True))).float()  # B x N x words
        log_p = logits.log_softmax(-1)
        entropy = -(log_p.exp() * log_p).sum(-1).detach()
        if words is None:
            return entropy, None
        return entropy, F.cross_entropy(logits[:, :-1].flatten(0, 1), words[:, 1:].flatten())


class VisionOutput(NamedTuple):
    embedding: Optional[torch.Tensor]   # B x embed_dim: CLS after ln_post and proj (None for forward_features)
    tokens: torch.Tensor                # B x S x D: patch or segment tokens (no CLS) from the last layer run
    valid: torch.Tensor                 # B x S bool: False for padding segments
    boundaries: Optional[torch.Tensor]  # B x N 0/1 (None when nothing was pooled)
    aux_loss: torch.Tensor              # binomial prior loss (0 when compress = 1; DynamicViT: keep-ratio loss)
    boundary_rate: torch.Tensor         # mean boundaries per patch (1 when compress = 1); other reducers:
                                        # patch-derived tokens left in the last block run, per patch


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.num_patches = cfg.num_patches
        self.conv1 = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.positional_embedding = nn.Parameter(torch.zeros(self.num_patches + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.quick_gelu)
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(torch.zeros(cfg.width, cfg.embed_dim))
        # compress = 1 is the plain ViT: no predictor parameters at all. The predictor starts on target:
        # the last patch always ends a segment, so the other N-1 patches carry N/compress - 1 boundaries
        rest = min(max((self.num_patches / cfg.compress - 1) / (self.num_patches - 1), 1e-3), 1 - 1e-3)
        drip = cfg.compress > 1 and cfg.reducer == "drip"
        self.boundary_predictor = BoundaryPredictor(cfg.width, rest) if drip else None
        self.entropy_model = EntropyModel(cfg) if drip and cfg.boundaries == "entropy" else None
        other = cfg.compress > 1 and cfg.reducer != "drip"
        self.reducer = REDUCER_CLASSES[cfg.reducer](cfg) if other else None  # another way to shorten (reducers.py)
        self.apply(init_weights)
        nn.init.normal_(self.class_embedding, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.02)
        nn.init.normal_(self.proj, std=cfg.width ** -0.5)

    def shorten(self, x, sample, boundaries=None, images=None):
        """Cut patch tokens into segments and mean-pool them; CLS stays in front of each image.

        x: B x (1+N) x D -> the T x D packed real tokens (T = sum of 1 + S_b) and their
        Packing, the boundaries, and the auxiliary loss. Given `boundaries` (B x N, last patch
        1) replace the predicted ones, e.g. to count FLOPs at an exact rate.

        gumbel: sampled while training (the task trains the predictor through them), the
        eval rule otherwise; the loss is the binomial prior. entropy: in training and eval the
        round(N / compress) - 1 patches of highest logit and the last one (hard, no gradient
        from the task: the budget is exact in every image); while training, the loss is the
        predictor's binary cross-entropy against the entropy model's rate-matched spikes plus
        that model's own next-word loss on `images`.
        """
        logits = self.boundary_predictor(x[:, 1:]).float()     # B x N, float32 even under autocast
        entropy_mode = self.entropy_model is not None
        if boundaries is None and sample and not entropy_mode:
            boundaries = force_last_boundary(sample_boundaries(logits, self.cfg.tau))
        elif boundaries is None:  # entropy: as many segments in every image as its targets have
            boundaries = eval_boundaries(logits, expected_segments(self.cfg) if entropy_mode else None)
        if entropy_mode and sample:
            entropy, word_loss = self.entropy_model(x[:, 1:], patch_words(images, self.cfg.patch_size))
            targets = entropy_targets(entropy, expected_segments(self.cfg))
            loss = F.binary_cross_entropy_with_logits(logits[:, :-1], targets[:, :-1]) + word_loss
        # on GPU the callers' padded layout is rounded up to a multiple of 8: fewer distinct shapes
        packing = packing_plan(1 + boundaries.detach().sum(1).long(), multiple=8 if x.is_cuda else 1)
        pooled = pool_segments(x[:, 1:], boundaries, segments=packing.valid.shape[1] - 1)  # B x S x D
        x = pack(torch.cat([x[:, :1], pooled], 1), packing)    # T x D
        if not entropy_mode:  # after pooling, as before the entropy option: the same float sums in backward
            loss = boundary_loss(boundaries, 1 / self.cfg.compress)
        elif not sample:
            loss = logits.new_zeros(())
        return x, packing, boundaries, loss

    def embed(self, images):
        """B x 3 x H x W -> B x (1+N) x D: CLS and the patch tokens in raster order, with positions."""
        x = self.conv1(images).flatten(2).transpose(1, 2)      # B x N x D
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1).to(x.dtype), x], 1)
        return self.ln_pre(x + self.positional_embedding.to(x.dtype))

    @torch.no_grad()
    def patch_entropy(self, images):
        """B x N: the entropy model's uncertainty (nats) about the patch after each (entropy towers)."""
        x = self.embed(images)
        for i in range(self.cfg.pre_layers):
            x = self.transformer.run_block(i, x)
        return self.entropy_model(x[:, 1:])[0]

    def run(self, images, sample, last_layer, boundaries=None):
        """Blocks 0..last_layer; returns B x (1+S) x D tokens, which are real, and what pooling produced."""
        x = self.embed(images)
        packing = None
        aux_loss, rate = x.new_zeros(()), x.new_ones(())
        for i in range(last_layer + 1):
            if i == self.cfg.pre_layers and self.boundary_predictor is not None:
                x, packing, boundaries, aux_loss = self.shorten(x, sample, boundaries, images)  # from here on T x D
                rate = boundaries.detach().mean()
            if self.reducer is not None and i == self.reducer.start:  # it runs the remaining blocks itself
                return self.reducer.run(self.transformer, x, last_layer, sample)
            x = self.transformer.run_block(i, x, packing=packing)
        if packing is None:
            keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # B x (1+N)
        else:  # back to the padded layout that callers read
            x, keep = unpack(x, packing), packing.valid                      # B x (1+S) x D, B x (1+S)
        return x, keep, boundaries, aux_loss.float(), rate.float()

    def track_rate(self, rate):
        """After a training step, DRIP's rate controller (BoundaryPredictor.track_rate) takes the
        step's sampled boundary rate; other towers have nothing to track."""
        if self.boundary_predictor is not None:
            self.boundary_predictor.track_rate(rate, 1 / self.cfg.compress)

    def forward(self, images, sample=None, boundaries=None):
        """Full tower. sample=None samples boundaries in training and uses the eval rule otherwise."""
        sample = self.training if sample is None else sample
        x, keep, boundaries, aux_loss, rate = self.run(images, sample, self.cfg.layers - 1, boundaries)
        embedding = self.ln_post(x[:, 0]) @ self.proj
        return VisionOutput(embedding, x[:, 1:], keep[:, 1:], boundaries, aux_loss, rate)

    def forward_features(self, images, layer=-2, sample=None):
        """Per-token features after block `layer` (python indexing; -2 = penultimate, LLaVA's choice).

        Blocks after `layer` are not run. tokens are the segment tokens without CLS,
        valid marks the real ones.
        """
        sample = self.training if sample is None else sample
        last_layer = range(self.cfg.layers)[layer]
        x, keep, boundaries, aux_loss, rate = self.run(images, sample, last_layer)
        return VisionOutput(None, x[:, 1:], keep[:, 1:], boundaries, aux_loss, rate)


# -----------------------------------------------------------------------------
# CLIP


class CLIP(nn.Module):
    """Image tower `visual` and a causal text tower (open_clip's layout and names)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.text_width))
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, 4 * cfg.text_width, cfg.quick_gelu)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.zeros(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.token_embedding.apply(init_weights)
        self.transformer.apply(init_weights)
        nn.init.normal_(self.positional_embedding, std=0.02)
        nn.init.normal_(self.text_projection, std=cfg.text_width ** -0.5)

    def encode_image(self, images, sample=None, boundaries=None):
        return self.visual(images, sample=sample, boundaries=boundaries)

    def encode_text(self, text):
        """text: B x L token ids, padded with 0 after the end-of-text token -> B x embed_dim.

        Features are read at the last non-padding token, the end-of-text token.
        """
        L = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:L]  # B x L x W
        x = self.ln_final(self.transformer(x, is_causal=True))
        positions = torch.arange(L, device=text.device)
        eot = torch.where(text != 0, positions, 0).argmax(1)   # B
        return x[torch.arange(len(x), device=x.device), eot] @ self.text_projection

    def forward(self, images, text, boundaries=None):
        """Normalised image and text features, the logit scale, and the full VisionOutput."""
        vision = self.encode_image(images, boundaries=boundaries)
        image_features = F.normalize(vision.embedding, dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        return image_features, text_features, self.logit_scale.exp(), vision

    def param_groups(self, weight_decay):
        """AdamW parameter groups: see decay_groups."""
        return decay_groups(self.parameters(), weight_decay)


def decay_groups(parameters, weight_decay):
    """AdamW parameter groups in the spirit of nanoGPT's configure_optimizers: weight decay on
    matrices (linear, attention and embedding weights, projections), none on vectors and
    scalars (biases, norms, the logit scale); frozen parameters left out."""
    parameters = [p for p in parameters if p.requires_grad]
    return [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}]



def load_clip_weights(model: CLIP, state_dict):
    """Load open_clip / OpenAI CLIP weights (or a train_clip.py checkpoint) into `model` by name.

    Unwraps {"state_dict": ...} / {"model": ...} and DDP's "module." prefix, drops OpenAI's
    metadata entries, and resizes visual.positional_embedding (bicubic over the patch
    grid) when the image or patch size differs. Returns (missing, unexpected) key lists:
    with compress > 1 the boundary predictor is missing and starts fresh.
    """
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()
                  if torch.is_tensor(v) and k not in ("input_resolution", "context_length", "vocab_size")}
    own = model.state_dict()
    pos = state_dict.get("visual.positional_embedding")
    if pos is not None and pos.shape != own["visual.positional_embedding"].shape and pos.shape[1:] == own["visual.positional_embedding"].shape[1:]:
        state_dict["visual.positional_embedding"] = resize_positional_embedding(pos, model.visual.num_patches)
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"weights of another model size: {'; '.join(mismatched[:3])}")
    result = model.load_state_dict(state_dict, strict=False)
    return result.missing_keys, result.unexpected_keys


def resize_positional_embedding(pos, num_patches):
    """(1 + g*g) x D -> (1 + num_patches) x D: the CLS row kept, the grid resized bicubically."""
    old, new = int(round((pos.shape[0] - 1) ** 0.5)), int(round(num_patches ** 0.5))
    grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)                    # 1 x D x g x g
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(pos.dtype)])


def tower_macs(cfg: CLIPConfig, attention_tokens, mlp_tokens, extra=0):
    """Multiply-accumulates of one image: patch embedding, each block's attention on
    attention_tokens[i] tokens (L*4*D*D projections + 2*L*L*D) and MLP on mlp_tokens[i]
    (L*2*D*mlp_dim), the final projection, and `extra` (what a reducer adds)."""
    N, D = cfg.num_patches, cfg.width
    macs = N * 3 * cfg.patch_size ** 2 * D + D * cfg.embed_dim + extra
    for La, Lm in zip(attention_tokens, mlp_tokens):
        macs += La * 4 * D * D + 2 * La * La * D + Lm * 2 * D * cfg.mlp_dim
    return macs


def expected_segments(cfg: CLIPConfig):
    """S = round(N / compress): DRIP's expected token count (and the fixed one of some reducers)."""
    return max(1, round(cfg.num_patches / cfg.compress))


def image_tower_macs(cfg: CLIPConfig, segments=None):
    """Analytic multiply-accumulates of one image through the tower (fvcore's "flop").

    12*L*D*D + 2*L*L*D per block with L tokens when mlp_dim = 4D. For DRIP the blocks
    after pooling see 1 + `segments` tokens; the default is DynamicViT's convention, the
    expected count round(N / compress). The other reducers count themselves, as they run in eval.
    """
    N, D = cfg.num_patches, cfg.width
    if cfg.compress == 1:
        return tower_macs(cfg, [1 + N] * cfg.layers, [1 + N] * cfg.layers)
    if cfg.reducer != "drip":
        return REDUCER_CLASSES[cfg.reducer].macs(cfg)
    S = expected_segments(cfg) if segments is None else segments
    tokens = [1 + N] * cfg.pre_layers + [1 + S] * (cfg.layers - cfg.pre_layers)
    return tower_macs(cfg, tokens, tokens, N * (D * D + D) + N * S * D)  # + the predictor's MLP, the pooling einsum


# -----------------------------------------------------------------------------
# LLaVA: image tower -> projector -> language model

IMAGE_TOKEN = -200  # placeholder id where an image's tokens go (LLaVA's IMAGE_TOKEN_INDEX)
IGNORE = -100       # label of positions without loss (F.cross_entropy's ignore_index)


class LLaVAOutput(NamedTuple):
    logits: torch.Tensor        # B x L x vocab
    labels: torch.Tensor        # B x L, IGNORE on prompts, image tokens and padding
    lengths: torch.Tensor       # B: tokens each sample gave the LLM, image tokens included
    image_tokens: torch.Tensor  # B: image tokens each sample gave the LLM (0 without an image)
    truncated: int              # samples cut at the context length


class LLaVA(nn.Module):
    """A frozen (DRIP) image tower, a projector and a decoder LLM, as in LLaVA-1.5.

    Each image placeholder in the token ids is replaced by that image's *valid* segment
    tokens only (from `feature_layer`, CLS dropped), so with compress 4 the LLM reads
    about a quarter of the image tokens, and samples in a batch carry different counts.
    """

    def __init__(self, visual: VisionTransformer, llm, projector="mlp2x_gelu", feature_layer=-2):
        super().__init__()
        if projector not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"projector must be linear or mlp2x_gelu, got {projector!r}")
        D, H = visual.cfg.width, llm.cfg.hidden_size
        self.visual, self.llm, self.feature_layer = visual, llm, feature_layer
        self.projector = (nn.Linear(D, H) if projector == "linear"
                          else nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, H)))

    def train(self, mode=True):  # the image tower stays frozen, in eval mode
        super().train(mode)
        self.visual.eval()
        return self

    def param_groups(self, weight_decay):
        """AdamW parameter groups of the trainable parts: see decay_groups."""
        return decay_groups(self.parameters(), weight_decay)

    def image_tokens(self, images):
        """B x 3 x H x W -> B tensors S_b x hidden: each image's valid tokens, projected. The tower is frozen."""
        with torch.no_grad():
            features = self.visual.forward_features(images, layer=self.feature_layer, sample=False)
        counts = features.valid.sum(1).tolist()
        projected = self.projector(features.tokens[features.valid])  # (sum_b S_b) x hidden: padding never projected
        return list(projected.split(counts))

    def build_inputs(self, input_ids, labels, images, has_image, max_length):
        """Splice image tokens into the embedded text and right-pad the batch.

        input_ids, labels: B lists of 1-D LongTensors (IMAGE_TOKEN marks the image, once per
        sample at most); images: the images of the samples with has_image True, in order.
        Returns embeddings B x L x hidden, labels B x L (IGNORE on image tokens and
        padding), lengths B, image token counts B, and how many samples were cut at
        max_length (cut together with their labels, so the mask stays aligned).
        """
        embed = self.llm.embed_tokens
        per_image = iter(self.image_tokens(images)) if any(has_image) else iter(())
        rows, targets, counts, truncated = [], [], [], 0
        for ids, lab, with_image in zip(input_ids, labels, has_image):
            if with_image:
                tokens = next(per_image)                                           # S_b x hidden
                at = int((ids == IMAGE_TOKEN).nonzero()[0])
                row = torch.cat([embed(ids[:at]), tokens.to(embed.weight.dtype), embed(ids[at + 1:])])
                lab = torch.cat([lab[:at], lab.new_full((len(tokens),), IGNORE), lab[at + 1:]])
                counts.append(len(tokens))
            else:
                row = embed(ids)
                counts.append(0)
            truncated += len(row) > max_length
            rows.append(row[:max_length])
            targets.append(lab[:max_length])
        lengths = torch.tensor([len(r) for r in rows])
        L = int(lengths.max())
        x = torch.stack([F.pad(r, (0, 0, 0, L - len(r))) for r in rows])              # B x L x hidden
        y = torch.stack([F.pad(t, (0, L - len(t)), value=IGNORE) for t in targets])   # B x L
        if not any(has_image):  # a zero-valued touch: DDP needs a gradient for the projector on every step
            x = x + 0 * sum(p.sum() for p in self.projector.parameters())
        return x, y, lengths, torch.tensor(counts), truncated

    def forward(self, input_ids, labels, images, has_image, max_length):
        x, y, lengths, counts, truncated = self.build_inputs(input_ids, labels, images, has_image, max_length)
        return LLaVAOutput(self.llm(inputs_embeds=x), y, lengths, counts, truncated)

    @torch.no_grad()
    def generate(self, input_ids, images, has_image, max_new_tokens=32):
        """Greedy answers to a batch of prompts: B lists of new token ids, each ending before eos.

        The right-padded prompts run once, filling a KV cache; each row then continues from
        its own last token, one token per step for the whole batch.
        """
        cfg = self.llm.cfg
        labels = [torch.full_like(ids, IGNORE) for ids in input_ids]
        x, _, lengths, _, _ = self.build_inputs(input_ids, labels, images, has_image, cfg.max_position_embeddings)
        lengths = lengths.to(x.device)
        rows = torch.arange(len(x), device=x.device)
        steps = min(max_new_tokens, cfg.max_position_embeddings - int(lengths.max()))  # positions left for the longest
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cache = self.llm.new_cache(len(x), x.shape[1] + max(0, steps - 1), x.device, dtype)
        logits = self.llm(inputs_embeds=x, cache=cache)[rows, lengths - 1]              # B x vocab: after each prompt
        cache.lengths = lengths                                                       # rows continue from their own end
        answers = [[] for _ in input_ids]
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for step in range(steps):
            next_ids = logits.argmax(-1)                                              # B
            done |= next_ids == cfg.eos_token_id
            if done.all():
                break
            for b in (~done).nonzero().flatten().tolist():
                answers[b].append(int(next_ids[b]))
            if step + 1 < steps:
                logits = self.llm(inputs_embeds=self.llm.embed_tokens(next_ids)[:, None].to(x.dtype), cache=cache)[:, 0]
        return answers

"""DRIP: a Vision Transformer that learns where to cut its patch tokens into segments.

After `pre_layers` blocks on all patch tokens, a small boundary predictor marks the
patches that end a segment (Gumbel-Sigmoid sampling with straight-through hard
boundaries while training, a deterministic top-k rule in eval). Patches are cut in
raster order at those boundaries and each segment is mean-pooled into one token, so
the remaining blocks run on about 1/compress of the tokens. A binomial prior and a
controller on the logits keep the boundary rate at 1/compress. compress=1 is the plain ViT.

For comparison at the same analytic MACs, `reducer` swaps DRIP for another way to
shorten the tower: uniform pooling, ToMe, DynamicViT, TokenLearner or a grouping layer
(section "Other ways to shorten a ViT").

The file also holds the CLIP text tower and the CLIP module (module and parameter
names follow open_clip, so pretrained CLIP weights load by name) and, for LLaVA, a
Llama-style decoder (Hugging Face's names), LoRA, and the glue that feeds an image's
valid segment tokens through a projector into the language model.

    from model import CLIP, make_config
    model = CLIP(make_config("ViT-B-16", compress=4))
    image_features, text_features, logit_scale, vision = model(images, text)
    loss = contrastive_loss(...) + vision.aux_loss   # vision.boundary_rate ~ 0.25
"""
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import lru_cache
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
    reducer: str = "drip"         # how tokens are cut: one of REDUCERS (the others at DRIP's MACs, see below)
    pre_layers: int = 2           # blocks run on every patch before pooling
    tau: float = 0.5              # Gumbel-Sigmoid temperature
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
        if self.reducer not in REDUCERS:
            raise ValueError(f"unknown reducer {self.reducer!r}; choose one of {', '.join(REDUCERS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.compress > 1 and not 0 < self.pre_layers < self.layers:
            raise ValueError(f"pre_layers must be between 1 and layers-1 ({self.layers - 1}), got {self.pre_layers}")


# drip: learned cuts, mean-pooled. The others shorten the tower at the same analytic MACs:
# uniform: the same pooling at evenly spaced cuts; tome: token merging; dynamicvit: token
# pruning at three stages; tokenlearner: learned spatial maps; group: iterative grouping
REDUCERS = ("drip", "uniform", "tome", "dynamicvit", "tokenlearner", "group")

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


def eval_boundaries(logits):
    """Deterministic boundaries at the training-time rate.

    Thresholding logits at 0 would give almost no boundaries when every
    sigmoid(logit) is about 1/compress. Instead keep as many boundaries as training
    expects: the last patch (always a boundary, as in `force_last_boundary`) and, among
    the other N-1 patches, the k = round(sum sigmoid(l_i)) with the highest logits.
    """
    probs = torch.sigmoid(logits[:, :-1])                       # B x N-1
    k = probs.sum(1).round()                                    # B, besides the last patch
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


def pool_segments(x, boundaries, multiple=1, segments=None):
    """Mean-pool contiguous segments of tokens; boundary i = 1 means token i ends its segment.

    x: B x N x D tokens, boundaries: B x N hard 0/1 (straight-through or plain), with the
    last token a boundary. Returns pooled B x S x D and valid B x S, padded to the
    largest segment count in the batch rounded up to `multiple` (padded rows are zero
    and not valid; a few fixed lengths keep GPU kernels aligned and their caches warm),
    or to `segments` when the caller already knows S (it then costs no host sync).

    The membership weights are built from `boundaries` through cumsum: their value is
    exactly 0/1, but their gradient reaches whatever produced the boundaries, so the
    task loss trains the boundary predictor. Dynamic Token Pooling writes token i's weight
    in its segment s as 1 - (s - seg_i); here it is 1 + (s - seg_i), the same value with
    the opposite gradient. Raising b_j for a patch j inside a segment cuts the segment
    after j, which takes the patches after j *out* of it: with 1 + (s - seg_i) their
    weight in it goes down, as the cut does, where DTP's form raises it. The gradient of
    b_j is then that of fading the segment's tail out of its mean (tested). On the
    shapes data DTP's sign left boundaries off the object, this one puts them on it
    (README, "Where DRIP cuts").

    A segment of one patch is its patch whatever its weight, so the mean gives it no
    gradient at all. There the weight is not divided by the count: an earlier cut fades
    the patch itself towards zero, the gradient of its presence. On the shapes data this
    fine-tunes a compress-1 checkpoint to compress 4 far better than the mean's gradient
    (77 against 52 % after one epoch) and equals it from scratch (README, "One-patch
    segments"). Written out with `where`: clamp(min=1) gives the same only on torch whose
    clamp has no gradient at its bound (2.14 here; older releases pass it).
    """
    segment = boundaries.cumsum(1) - boundaries                 # B x N: sum_{j<i} b_j
    num_segments = boundaries.sum(1)                            # B
    S = segments if segments is not None else round_up(int(num_segments.max()), multiple)  # host sync: a shape
    offset = torch.arange(S, device=x.device, dtype=boundaries.dtype) - segment.unsqueeze(2)  # B x N x S
    member = torch.where(offset == 0, 1 + offset, torch.zeros_like(offset))  # B x N x S: 1 iff token n is in segment s
    count = member.sum(1, keepdim=True)                         # B x 1 x S: patches per segment, 0 for padding
    weights = member / torch.where(count > 1, count, 1)         # B x N x S: each segment's column sums to 1
    pooled = torch.einsum("bnd,bns->bsd", x, weights.to(x.dtype))  # B x S x D
    valid = torch.arange(S, device=x.device) < num_segments.unsqueeze(1)  # B x S
    return pooled, valid


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


# -----------------------------------------------------------------------------
# Packed tokens: after pooling, the residual stream holds only real tokens


class Packing(NamedTuple):
    """Where the real tokens of a batch of variable-length sequences sit.

    After pooling, image b has L_b = 1 + S_b real tokens. Packed, the whole batch is one
    T x D tensor (T = sum L_b, image after image), so LayerNorms, projections and MLPs
    compute nothing for padding. Only attention needs the images apart: it runs on the
    packed rows with cumulative lengths (flash attention's varlen kernel) or, where that
    kernel is missing, in "bins": fixed-size padded sequences that each hold one or more
    whole images, with a mask that lets every row attend only to rows of its own image.
    """
    index: torch.Tensor       # T: row of each packed token in the callers' B x L padded layout
    cu_seqlens: torch.Tensor  # B+1 int32: image b owns packed rows cu_seqlens[b] .. cu_seqlens[b+1]-1
    valid: torch.Tensor       # B x L bool: the real tokens of the callers' layout
    max_len: int              # longest L_b
    equal: bool               # every image has the same length: attention runs on a plain B x L view
    bin_index: Optional[torch.Tensor]   # T: row of each packed token in the flattened bins (None: equal or varlen)
    bin_source: Optional[torch.Tensor]  # bins*C: packed row that each bin row holds (padding rows: row 0)
    bin_mask: Optional[torch.Tensor]    # bins x 1 x C x C bool: query and key row are of the same image


# Bins are at least 32 rows: below 192 query rows PyTorch's CPU flash attention works through each
# sequence in blocks of 32 query rows, so a 10-token image alone leaves two thirds of its block
# idle. Three such images share one bin. On the project's 2-core CPU (torch 2.14, 64 images of
# 2 + Binomial(35, 8/35) tokens, 4 heads of 32, forward + backward with the scatter and gather)
# bins took 0.71-0.81 ms, one 16-row slot per image 0.91-1.02 ms. When the longest image is over 32
# rows, every bin is its length rounded up to 16 (shorter images still share), which keeps shapes few
BIN_ROWS, ALIGN = 32, 16


def first_fit(lengths, capacity):
    """First-fit decreasing bin packing: the first row of each length in bins of `capacity` rows, and the bin count."""
    start, free = [0] * len(lengths), []
    open_bins, smallest = [], min(lengths)     # bins with room for at least the shortest length
    for b in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        i = next((i for i in open_bins if free[i] >= lengths[b]), None)
        if i is None:
            i = len(free)
            free.append(capacity)
            open_bins.append(i)
        start[b] = (i + 1) * capacity - free[i]
        free[i] -= lengths[b]
        if free[i] < smallest:
            open_bins.remove(i)
    return start, len(free)


def packing_plan(lengths, multiple=1, bins=True):
    """lengths: B LongTensor of real tokens per image -> Packing. The one host sync after pooling.

    The callers' layout is padded to the longest image rounded up to `multiple`. bins=False
    skips the fallback's attention layout (and its Python loop) where varlen attention runs:
    a plan without bins is what sends packed_attention to the varlen kernel.
    """
    host = lengths.tolist()
    B, T, max_len, device = len(host), sum(host), max(host), lengths.device
    L = round_up(max_len, multiple)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))                               # B+1
    image = torch.repeat_interleave(torch.arange(B, device=device), lengths, output_size=T)  # T
    position = torch.arange(T, device=device) - cu_seqlens[image]                # T: place within its image
    valid = torch.arange(L, device=device) < lengths.unsqueeze(1)                # B x L
    equal, bin_index, bin_source, bin_mask = min(host) == max_len, None, None, None
    if bins and not equal:  # attention layout for the padded fallback
        capacity = max(BIN_ROWS, round_up(max_len, ALIGN))
        start, count = first_fit(host, capacity)
        bin_index = torch.tensor(start, device=device)[image] + position         # T
        bin_source = torch.zeros(count * capacity, dtype=torch.long, device=device).index_copy_(
            0, bin_index, torch.arange(T, device=device))                        # bins*C
        owner = torch.full((count * capacity,), -1, device=device).index_copy_(0, bin_index, image).view(count, capacity)
        bin_mask = owner[:, None, :, None] == owner[:, None, None, :]  # padding rows (-1) see only padding: no empty row
    return Packing(image * L + position, cu_seqlens.to(torch.int32), valid, max_len, equal,
                   bin_index, bin_source, bin_mask)


def pack(x, packing):
    """B x L x D padded -> T x D real rows."""
    return x.flatten(0, 1).index_select(0, packing.index)


def unpack(x, packing):
    """T x D real rows -> B x L x D with zero padding."""
    B, L = packing.valid.shape
    return x.new_zeros(B * L, x.shape[-1]).index_copy(0, packing.index, x).view(B, L, -1)


def use_varlen(x):
    """Flash attention on packed sequences: CUDA, half precision, torch >= 2.10; DRIP_VARLEN=0 turns it off.

    Half precision is x's dtype or, under CUDA autocast, autocast's: the float32 residual
    stream gives the same answer as the q/k/v projected from it."""
    if not (x.is_cuda and varlen_attn is not None and os.environ.get("DRIP_VARLEN", "1") != "0"):
        return False
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype in (torch.float16, torch.bfloat16)


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


class MoveRows(torch.autograd.Function):
    """x[index], whose backward gathers the gradient at `back` instead of scattering it.

    Between the packed rows and the bins each real row appears once on either side, at
    `index` one way and `back` the other. Bin padding rows copy packed row 0 and get
    whatever gradient: the same-image mask keeps them out of every real row's attention,
    so nothing they hold or receive reaches a real row, and the move back drops them.
    Exact for the real rows (tested); one gather each way, forward and backward, where
    zero-filling, scattering and scatter-adding took more ops.
    """

    @staticmethod
    def forward(ctx, x, index, back):
        ctx.save_for_backward(back)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        back, = ctx.saved_tensors
        return grad.index_select(0, back), None, None


def packed_attention(qkv, heads, packing):
    """T x 3D packed queries, keys and values -> T x D, each image attending only to itself."""
    T, D = qkv.shape[0], qkv.shape[1] // 3
    if packing.equal:  # nothing to pad: a plain B x L batch
        return multi_head_attention(qkv.view(len(packing.cu_seqlens) - 1, -1, 3 * D), heads).view(T, D)
    if packing.bin_mask is None:  # the plan left the bins out: use_varlen chose flash's kernel for this batch
        q, k, v = qkv.view(T, 3, heads, D // heads).unbind(1)                  # each T x H x D/H
        cu, m = packing.cu_seqlens, packing.max_len
        return varlen_attn(q, k, v, cu, cu, m, m).reshape(T, D)  # positional: the keywords changed in torch 2.11
    # elsewhere: move the rows into the bins, one masked attention call, and move the real rows back
    bins, capacity = packing.bin_mask.shape[0], packing.bin_mask.shape[-1]
    in_bins = MoveRows.apply(qkv, packing.bin_source, packing.bin_index)               # bins*C x 3D
    out = multi_head_attention(in_bins.view(bins, capacity, 3 * D), heads, packing.bin_mask)
    return MoveRows.apply(out.view(-1, D), packing.bin_index, packing.bin_source)      # T x D


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

    The prior alone lets the task pull the rate below its target (to 0.19-0.23 at
    compress 4 on the shapes data), so an integral controller holds it there: after
    every training step, `track_rate` moves an offset added to all logits by
    rate_gain * (target - rate), with the step's sampled rate. The offset is a buffer
    (saved, not trained), and the eval rule sees it too, so the eval rate follows the
    training rate.
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

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict.setdefault(prefix + "rate_offset", torch.zeros(()))  # checkpoints from before the controller
        super()._load_from_state_dict(state_dict, prefix, *args)


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
        self.reducer = make_reducer(cfg)  # another way to shorten the tower (section below); None for DRIP
        self.apply(init_weights)
        nn.init.normal_(self.class_embedding, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.02)
        nn.init.normal_(self.proj, std=cfg.width ** -0.5)

    def shorten(self, x, sample, boundaries=None):
        """Cut patch tokens into segments and mean-pool them; CLS stays in front of each image.

        x: B x (1+N) x D -> the T x D packed real tokens (T = sum of 1 + S_b) and their
        Packing, the boundaries, and the prior loss. Given `boundaries` (B x N, last patch
        1) replace the predicted ones, e.g. to count FLOPs at an exact rate.
        """
        logits = self.boundary_predictor(x[:, 1:]).float()     # B x N, float32 even under autocast
        if boundaries is None and sample:
            boundaries = force_last_boundary(sample_boundaries(logits, self.cfg.tau))
        elif boundaries is None:
            boundaries = eval_boundaries(logits)
        # on GPU the callers' padded layout is rounded up to a multiple of 8: fewer distinct shapes
        packing = packing_plan(1 + boundaries.detach().sum(1).long(), multiple=8 if x.is_cuda else 1,
                               bins=not use_varlen(x))
        pooled, _ = pool_segments(x[:, 1:], boundaries, segments=packing.valid.shape[1] - 1)  # B x S x D
        x = pack(torch.cat([x[:, :1], pooled], 1), packing)    # T x D
        return x, packing, boundaries, boundary_loss(boundaries, 1 / self.cfg.compress)

    def run(self, images, sample, last_layer, boundaries=None):
        """Blocks 0..last_layer; returns B x (1+S) x D tokens, which are real, and what pooling produced."""
        B = images.shape[0]
        x = self.conv1(images).flatten(2).transpose(1, 2)      # B x N x D, raster order
        x = torch.cat([self.class_embedding.expand(B, 1, -1).to(x.dtype), x], 1)  # B x (1+N) x D
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        packing = None
        aux_loss, rate = x.new_zeros(()), x.new_ones(())
        for i in range(last_layer + 1):
            if i == self.cfg.pre_layers and self.boundary_predictor is not None:
                x, packing, boundaries, aux_loss = self.shorten(x, sample, boundaries)  # from here on T x D
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
# Other ways to shorten a ViT (DESIGN.md §4), for side-by-side comparison with DRIP
#
# Each reducer is a module with `start` (the first block it changes) and
# run(transformer, x, last_layer, sample), which runs blocks start..last_layer on the
# B x (1+N) x D tokens (CLS first) and returns what VisionTransformer.run returns. At a
# given compress each is set to DRIP's analytic image-tower MACs (`image_tower_macs`):
# ToMe's r and DynamicViT's keep rate are solved for it, the others keep S = round(N / compress).


def expected_segments(cfg: CLIPConfig):
    """S = round(N / compress): DRIP's expected token count, the fixed one of uniform, tokenlearner and group."""
    return max(1, round(cfg.num_patches / cfg.compress))


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
    return f"{cfg.reducer}: {N} -> {what}{S} patch tokens before block {cfg.pre_layers}"


def make_reducer(cfg: CLIPConfig):
    if cfg.compress == 1 or cfg.reducer == "drip":
        return None
    return {"uniform": UniformPooling, "tome": ToMe, "dynamicvit": DynamicViT,
            "tokenlearner": TokenLearner, "group": TokenGrouping}[cfg.reducer](cfg)


def attention_with_keys(attn: Attention, x, bias=None, key_weight=None):
    """Attention.forward's computation, as ToMe's and DynamicViT's code patch timm's attention.

    x: B x L x D -> (B x L x D output, B x L x D/H keys averaged over heads: ToMe's
    similarity). bias: B x 1 x 1 x L added to the logits (ToMe's proportional attention).
    key_weight: B x L multiplying each key's softmax weight (DynamicViT's attention
    masking: 0 = not a key), computed as the ratio of two value streams so that its
    gradient reaches the keep decisions.
    """
    B, L, D = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)            # B x L x 3D
    q, k, v = split_heads(qkv, attn.heads)                              # each B x H x L x D/H
    if key_weight is None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    else:  # sum_j a_ij w_j v_j / sum_j a_ij w_j, with a = softmax(q k^T)
        w = key_weight[:, None, :, None].to(v.dtype).expand(-1, attn.heads, -1, -1)  # B x H x L x 1
        y = F.scaled_dot_product_attention(q, k, torch.cat([v * w, w], 3))  # B x H x L x (D/H + 1)
        y = y[..., :-1] / y[..., -1:].clamp(min=1e-12)                   # B x H x L x D/H
    return attn.out_proj(y.transpose(1, 2).reshape(B, L, D)), k.mean(1)


class ReduceOnce(nn.Module):
    """Base of the reducers that act once, before block pre_layers: N patch tokens -> S tokens."""

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

    def reduce(self, x):                                        # B x N x D -> B x S x D, B x N
        boundaries = even_boundaries(len(x), x.shape[1], self.segments, x.device).to(x.dtype)
        return pool_segments(x, boundaries)[0], boundaries


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
        kept = policy.sum(1, keepdim=True)                      # B x 1 x 1 (clamp(min=1)'s gradient at 1 varies with torch)
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
    """A block in which tokens with policy 0 are not keys (DynamicViT's training-time masking)."""
    x = x + attention_with_keys(block.attn, block.ln_1(x), key_weight=policy)[0]
    return x + block.mlp(block.ln_2(x))


class DynamicViT(nn.Module):
    """DynamicViT (Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token
    Sparsification", NeurIPS 2021): before each of three stages a prediction module keeps
    rho, rho^2, rho^3 of the patch tokens (CLS always kept).

    Training: hard Gumbel-Softmax keep decisions (straight-through), each stage's multiplied
    by the previous one's; every token stays in place and dropped ones are masked as
    attention keys, so shapes are fixed and the task loss reaches the decisions. aux_loss
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
                else:
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
    Videos?", NeurIPS 2021), as its ViT version in scenic: an MLP on each patch token gives
    S = round(N / compress) logits, a softmax over the patches turns each into a spatial
    map, and each output token is its map's weighted mean of the patch tokens. Inserted
    once, before block pre_layers."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.start = cfg.pre_layers
        self.ln = nn.LayerNorm(cfg.width)
        self.fc = nn.Linear(cfg.width, cfg.width)
        self.maps = nn.Linear(cfg.width, expected_segments(cfg))

    def reduce(self, x):                                        # B x N x D -> B x S x D
        maps = self.maps(F.gelu(self.fc(self.ln(x)))).transpose(1, 2).softmax(2)  # B x S x N, rows sum to 1
        return maps @ x, None


# --- group: iterative grouping into centres

class TokenGrouping(ReduceOnce):
    """A grouping layer in the spirit of Native Segmentation ViT (Brasó et al., NeurIPS 2025).

    S = round(N / compress) centres start as the average pool of the patch grid into an
    h x w grid (h * w = S). Then, `iters` times: each patch spreads a softmax assignment
    over the centres whose cells neighbour its own (by the similarity of learned keys),
    and each centre becomes the assignment-weighted mean of its patches' keys (k-means /
    slot-attention style; since keys are linear in the patches, pooling keys equals the
    key of the pooled patch). The output tokens are the same weighted means of the patch
    tokens. Inserted once, before block pre_layers.
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


def image_tower_macs(cfg: CLIPConfig, segments=None):
    """Analytic multiply-accumulates of one image through the tower (fvcore's "flop").

    12*L*D*D + 2*L*L*D per block with L tokens when mlp_dim = 4D. For DRIP the blocks
    after pooling see 1 + `segments` tokens; the default is DynamicViT's convention, the
    expected count round(N / compress). The other reducers are counted as they run in eval.
    """
    N, D = cfg.num_patches, cfg.width
    S = expected_segments(cfg) if segments is None else segments
    if cfg.compress == 1:
        return tower_macs(cfg, [1 + N] * cfg.layers, [1 + N] * cfg.layers)
    if cfg.reducer == "tome":
        return tower_macs(cfg, *tome_plan(cfg, *tome_schedule(cfg)))
    if cfg.reducer == "dynamicvit":
        return tower_macs(cfg, *dynamicvit_plan(cfg, dynamicvit_keep_rate(cfg)))
    tokens = [1 + N] * cfg.pre_layers + [1 + S] * (cfg.layers - cfg.pre_layers)
    extra = {"drip": N * (D * D + D) + N * S * D,                   # boundary predictor MLP, pooling einsum
             "uniform": N * S * D,                                  # pooling einsum
             "tokenlearner": N * (D * D + D * S) + S * N * D,       # map MLP, weighted means
             "group": N * D * D + N * D + 2 * TokenGrouping.iters * N * S * D,  # keys, grid pool, iterations
             }[cfg.reducer]
    return tower_macs(cfg, tokens, tokens, extra)


# -----------------------------------------------------------------------------
# A Llama-style decoder for LLaVA (parameter names as in Hugging Face's Llama, minus "model.")


@dataclass(frozen=True)
class LlamaConfig:
    """Field names are those of a Hugging Face Llama config.json, so one maps onto the other."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # fewer than the query heads: grouped-query attention
    head_dim: int = 0              # 0 = hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama 3.1+'s {"rope_type": "llama3", "factor", ...}
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def dim_per_head(self):
        return self.head_dim or self.hidden_size // self.num_attention_heads


LLAMA_CONFIGS = {
    "vicuna-7b": LlamaConfig(),  # LLaVA-1.5's language model (Llama 2 7B)
    "TinyLlama-1.1B": LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "SmolLM2-135M": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                rope_theta=100000.0, tie_word_embeddings=True),
    # trained from scratch on the built-in data in a minute on a 2-core CPU
    "tiny": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=True),
}


def llama_config_from_hf(hf):
    """A Hugging Face config.json dict -> LlamaConfig; refuses what this decoder does not implement."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"model_type is {hf.get('model_type')!r}; only Llama-family checkpoints (model_type llama) load here")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("this checkpoint uses biases or an activation other than SiLU, which this Llama does not have")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # transformers 5 / 4 spelling
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"rope type {kind!r} is not implemented (default and llama3 are)")
    fields = {f: hf[f] for f in LlamaConfig.__dataclass_fields__ if f in hf and f not in ("rope_theta", "rope_scaling")}
    if fields.get("head_dim") is None:
        fields.pop("head_dim", None)
    for key in ("bos_token_id", "eos_token_id"):  # some configs list several end tokens
        if isinstance(fields.get(key), list):
            fields[key] = fields[key][0]
    return LlamaConfig(**fields, rope_theta=float(theta), rope_scaling=rope if kind == "llama3" else None)


def rope_cos_sin(cfg: LlamaConfig, length, device):
    """Rotary position tables, L x head_dim each (Hugging Face's half-split layout), in float32."""
    d = cfg.dim_per_head
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d)  # d/2
    if cfg.rope_scaling:  # llama3: slow down the low frequencies, keep the high ones, blend in between
        s = cfg.rope_scaling
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)  # L x d/2
    angles = torch.cat([angles, angles], 1)                                     # L x d
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: B x H x L x d; rotates each (i, i + d/2) pair of features by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class LlamaAttention(nn.Module):
    """Causal grouped-query attention with rotary positions."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache=None):
        """x: B x L x hidden. cache (generation only): this layer's (keys, values, positions), keys and
        values B x KV x S x d for S slots, positions B x L the slots of x's tokens; the new keys and
        values are written there and x attends to every cached slot up to its own."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, -1).transpose(1, 2)      # B x H x L x d
        k = self.k_proj(x).view(B, L, self.kv_heads, -1).transpose(1, 2)   # B x KV x L x d
        v = self.v_proj(x).view(B, L, self.kv_heads, -1).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:
            keys, values, positions = cache
            at = positions[:, None, :, None].expand_as(k)                   # B x KV x L x d
            k, v = keys.scatter_(2, at, k.to(keys.dtype)), values.scatter_(2, at, v.to(values.dtype))  # B x KV x S x d
            mask = torch.arange(keys.shape[2], device=x.device) <= positions[:, None, :, None]  # B x 1 x L x S: causal per row
        repeat = self.heads // self.kv_heads                                # key/value head j serves query heads j*repeat..
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # B x H x L|S x d
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Decoder-only language model. Sequences are right-padded: with causal attention a
    real token never sees the padding after it, so no padding mask is needed."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LlamaBlock(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False
        self.apply(init_weights)

    def forward(self, input_ids=None, inputs_embeds=None, cache=None):
        """B x L token ids (or B x L x hidden embeddings) -> B x L x vocab logits.

        With a KVCache (generation), row b's tokens take positions cache.lengths[b] onwards,
        their keys and values are kept, and cache.lengths grows by L.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        L = x.shape[1]
        if cache is None:
            cos, sin = rope_cos_sin(self.cfg, L, x.device)                          # L x d
        else:
            positions = cache.lengths[:, None] + torch.arange(L, device=x.device)   # B x L
            cos, sin = rope_cos_sin(self.cfg, cache.keys[0].shape[2], x.device)     # S x d
            cos, sin = cos[positions][:, None], sin[positions][:, None]             # B x 1 x L x d
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x = layer(x, cos, sin, (cache.keys[i], cache.values[i], positions))
            elif self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        if cache is not None:
            cache.lengths = cache.lengths + L
        x = self.norm(x)
        return F.linear(x, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)


class KVCache:
    """Every layer's keys and values for generation, B x KV x S x d each (S slots), and how many
    tokens each row holds. Rows of a right-padded batch have their own lengths: a row's next
    token goes to its own next slot, over whatever padding the prompt left there."""

    def __init__(self, cfg: LlamaConfig, batch, slots, device, dtype):
        shape = (batch, cfg.num_key_value_heads, slots, cfg.dim_per_head)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)


def load_llama_state_dict(llm: Llama, state_dict, assign=False):
    """Hugging Face Llama weights ("model.layers.0.self_attn.q_proj.weight", ...) -> `llm`, strictly.
    assign=True makes the given tensors the parameters (for a model built on the meta device)."""
    state_dict = {k.removeprefix("model."): v for k, v in state_dict.items() if "rotary_emb" not in k}
    if llm.cfg.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    result = llm.load_state_dict(state_dict, strict=False, assign=assign)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")


# -----------------------------------------------------------------------------
# LoRA: low-rank updates to a frozen LLM's linear layers


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A dropout(x), with W frozen. B starts at zero, so training
    starts from exactly the base model; `merged()` folds B A into W for saving."""

    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def merged(self):
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=False)
        linear.weight.data = self.base.weight.data + self.scaling * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)
        return linear


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(llm: Llama, r, alpha, dropout=0.0):
    """Wrap every attention and MLP projection in LoRA and freeze everything else of the LLM."""
    llm.requires_grad_(False)
    for block in llm.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in parent.named_children():
                if name in LORA_TARGETS:
                    setattr(parent, name, LoRALinear(child, r, alpha, dropout))
    return llm


def merge_lora(llm: Llama):
    """Fold every LoRA update into its weight: back to a plain Llama with Hugging Face names."""
    for block in llm.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in parent.named_children():
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.merged())
    return llm


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

    def __init__(self, visual: VisionTransformer, llm: Llama, projector="mlp2x_gelu", feature_layer=-2):
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
        cache = KVCache(cfg, len(x), x.shape[1] + max(0, steps - 1), x.device, dtype)
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

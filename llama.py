"""A Llama-style decoder and LoRA, the language model side of LLaVA (train_llava.py).

Parameter names are Hugging Face's Llama names minus "model.", so a Llama-family
checkpoint (Vicuna, TinyLlama, SmolLM2) loads by name (text.load_llama); LoRA wraps the
attention and MLP projections and folds back into plain weights for saving. How an image
reaches the decoder is DRIP's side and lives in model.py (class LLaVA).

    from llama import LLAMA_CONFIGS, Llama
    llm = Llama(LLAMA_CONFIGS["tiny"])
    logits = llm(input_ids)                 # B x L x vocab
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import init_weights


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

    def new_cache(self, batch, slots, device, dtype):
        """An empty KVCache of `slots` positions for generation."""
        return KVCache(self.cfg, batch, slots, device, dtype)


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

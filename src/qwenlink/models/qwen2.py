"""Qwen1.5 (HF `Qwen2ForCausalLM`) as plain single-device PyTorch, readable top to bottom.

Parallelism (TP/SP/FSDP/PP), activation checkpointing and compilation are applied from outside. To make that easy:
- layers live in an `nn.ModuleDict` keyed by their global index ("0", "1", ...), so a pipeline stage can delete the
  layers it does not own and keep the names of the rest;
- the forward tolerates a missing `embed_tokens` (input is then hidden states), `norm` and `lm_head` (output is then
  hidden states);
- nothing is allocated at construction time beyond parameters, so a 72B model builds on the `meta` device in a
  fraction of a second; call `init_weights()` after `to_empty()`.

Module names equal HF's without the `model.` prefix, which keeps the HF checkpoint mapping trivial.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from qwenlink.models.config import ModelConfig

Tensor = torch.Tensor


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32 (as HF does), cast back to the input dtype before scaling."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rotary_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for rotate-half rotary embeddings at the given positions.

    position_ids: [B, T] -> cos, sin: [B, 1, T, head_dim] (broadcast over heads). Computed in fp32 from the positions
    on every call instead of a cached buffer, so explicit (e.g. restarting, packed) positions just work and the module
    has no buffers to materialise after meta-device construction.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
                                / head_dim))  # [D/2]
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D] rotated by the per-position angles (cos/sin: [B, 1, T, D])."""
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """A preallocated (static) key/value cache: one [B, Hkv, max_len, D] pair per layer, written in place.

    All sequences of a batch share the cache index (prompts are left-padded to a common length); which cache slots
    hold real tokens is told by the attention mask passed with each forward.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, *, dtype: torch.dtype,
                 device: torch.device | str, layer_ids: Optional[list[str]] = None) -> None:
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        ids = layer_ids if layer_ids is not None else [str(i) for i in range(config.num_hidden_layers)]
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in ids}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in ids}
        self.max_length = max_length
        self.length = 0  # slots filled so far

    def update(self, layer_id: str, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Write k/v [B, Hkv, T, D] at slots [start, start+T) and return all keys/values up to start+T."""
        end = start + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache of {self.max_length} slots cannot hold position {end - 1}")
        self.keys[layer_id][:, :, start:end] = k
        self.values[layer_id][:, :, start:end] = v
        return self.keys[layer_id][:, :, :end], self.values[layer_id][:, :, :end]


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings; bias on q/k/v only (Qwen2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, kv, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, kv, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor], *,
                kv_cache: Optional[KVCache] = None, layer_id: str = "", cache_start: int = 0) -> Tensor:
        bsz, seqlen, _ = x.shape
        # Head counts come from the weights, not the config, so a tensor-parallel shard sees its local heads.
        q = self.q_proj(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_id, k, v, cache_start)  # [B, Hkv, S, D], S = cache_start + T
        gqa = q.shape[1] != k.shape[1]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor], *,
                kv_cache: Optional[KVCache] = None, layer_id: str = "", cache_start: int = 0) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache=kv_cache, layer_id=layer_id,
                               cache_start=cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_attention_mask(attention_mask: Optional[Tensor], query_length: int, key_length: int,
                         cache_start: int, device: torch.device) -> Optional[Tensor]:
    """Boolean attention mask [B or 1, 1, Tq, S] (True = may attend), or None for plain causal attention.

    attention_mask is HF's 2-D padding mask [B, S] over all key slots (1 = real token). Queries sit at slots
    cache_start .. cache_start+Tq-1 and attend causally. A query on a padding slot would see no key at all, and a
    fully masked softmax row is NaN that then leaks through values; such rows are allowed to see themselves, which keeps
    every activation finite (their outputs are never used).
    """
    if attention_mask is None and cache_start == 0 and query_length == key_length:
        return None
    q_pos = torch.arange(cache_start, cache_start + query_length, device=device)[:, None]  # [Tq, 1]
    k_pos = torch.arange(key_length, device=device)[None, :]  # [1, S]
    allowed = (k_pos <= q_pos)[None, None]  # [1, 1, Tq, S]
    if attention_mask is not None:
        if attention_mask.dim() == 4:  # already a full mask (e.g. document masking for packed samples)
            return attention_mask.to(device=device, dtype=torch.bool)
        allowed = allowed & attention_mask[:, None, None, :key_length].to(device=device, dtype=torch.bool)
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed


class Qwen2Model(nn.Module):
    """Token embedding -> decoder layers -> final norm -> lm_head; each end optional (pipeline stages)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens: Optional[nn.Embedding] = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config) for i in range(config.num_hidden_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: Optional[nn.Linear] = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- initialisation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: Optional[float] = None) -> None:
        """Normal(0, std) for matrices and embeddings, zeros for biases, ones for norms (HF's Qwen2 init)."""
        std = self.config.initializer_range if std is None else std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        if self.config.tie_word_embeddings and self.lm_head is not None and self.embed_tokens is not None:
            self.lm_head.weight = self.embed_tokens.weight

    def tie_weights(self) -> None:
        """Re-tie lm_head to the embedding (needed after `to_empty`, which re-creates parameters)."""
        if self.config.tie_word_embeddings and self.lm_head is not None and self.embed_tokens is not None:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- forward ----------------------------------------------------------------------------------------------------
    def forward(self, inputs: Tensor, *, position_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, kv_cache: Optional[KVCache] = None,
                cache_start: int = 0, logits_to_keep: int = 0) -> Tensor:
        """inputs: token ids [B, T] (or hidden states [B, T, H] when the embedding was removed).

        logits_to_keep > 0 computes the head only for the last that many positions (generation needs one).
        Returns logits [B, T, V], or hidden states [B, T, H] when lm_head was removed. position_ids default to
        cache_start + arange(T); attention_mask is a 2-D padding mask [B, S] over all key slots (S = cache_start + T)
        or a 4-D boolean mask [B, 1, T, S].
        """
        h = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs  # [B, T, H]
        bsz, seqlen = h.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(cache_start, cache_start + seqlen, device=h.device).expand(bsz, seqlen)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        mask = build_attention_mask(attention_mask, seqlen, cache_start + seqlen, cache_start, h.device)
        for layer_id, layer in self.layers.items():
            h = layer(h, cos, sin, mask, kv_cache=kv_cache, layer_id=layer_id, cache_start=cache_start)
        if kv_cache is not None:
            kv_cache.length = cache_start + seqlen
        if logits_to_keep > 0:
            h = h[:, -logits_to_keep:]  # [B, K, H]
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            return self.lm_head(h)  # [B, T, V]
        return h


def build_model(config: ModelConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                init: bool = True, seed: Optional[int] = None) -> Qwen2Model:
    """Construct on the meta device (no memory), then materialise on `device` and optionally initialise."""
    with torch.device("meta"):
        model = Qwen2Model(config).to(dtype)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device)
    model.tie_weights()
    if init:
        if seed is not None:
            torch.manual_seed(seed)
        model.init_weights()
    return model

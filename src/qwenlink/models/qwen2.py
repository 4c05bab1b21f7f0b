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

from qwenlink.models.attention import LowerRightCausal
from qwenlink.models.config import ModelConfig
from qwenlink.models.documents import DocumentMask, document_attention
from qwenlink.models.layers import MLP, InitRule
from qwenlink.models.qwen2_moe import SparseMoeBlock

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


class RotaryTables:
    """The cos/sin tables of one forward pass, computed on first use by the first attention layer.

    Computing them where q/k are known (rather than from the hidden states' shape at the model's entry) keeps the
    model correct when parallelism changes shapes in between: with sequence parallelism the residual stream holds a
    1/tp slice of the sequence, while attention sees the whole sequence after its all-gather.
    """

    def __init__(self, position_ids: Optional[Tensor], head_dim: int, theta: float) -> None:
        self.position_ids = position_ids  # [B, T] or None for 0..T-1
        self.head_dim = head_dim
        self.theta = theta
        self._tables: Optional[tuple[Tensor, Tensor]] = None

    def get(self, seqlen: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            # Inside a compiled block: computed, not cached. A write to this shared object would make the first
            # layer's graph differ from the others' (a recompile) and, inside activation checkpointing's traced
            # region, is a side effect that breaks the graph; computed here the tables fuse into the rotation.
            return self._compute(seqlen, device, dtype)
        if self._tables is None or self._tables[0].dtype != dtype:
            self._tables = self._compute(seqlen, device, dtype)
        return self._tables

    def _compute(self, seqlen: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        positions = self.position_ids
        if positions is None:
            positions = torch.arange(seqlen, device=device)[None]  # [1, T]
        return rotary_cos_sin(positions.to(device), self.head_dim, self.theta, dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D] rotated by the per-position angles (cos/sin: [B, 1, T, D])."""
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """A preallocated (static) key/value cache: one [B, Hkv, max_len, D] pair per layer, written in place.

    Each forward writes its tokens' keys/values at explicit slots: either the same slots for every row
    (`cache_start`, prompts left-padded to a common length) or per-row slots (`cache_positions` [b, T], so sequences
    of different lengths advance independently, as continuous batching needs). `rows` selects which cache rows the
    forward's batch maps to (a newly admitted request is prefilled into its own row).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, *, dtype: torch.dtype,
                 device: torch.device | str, layer_ids: Optional[list[str]] = None,
                 num_kv_heads: Optional[int] = None) -> None:
        # num_kv_heads: the heads this process computes (fewer than the config's under tensor parallelism).
        shape = (batch_size, num_kv_heads or config.num_key_value_heads, max_length, config.head_dim)
        ids = layer_ids if layer_ids is not None else [str(i) for i in range(config.num_hidden_layers)]
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in ids}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in ids}
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0  # slots filled so far (the largest written slot + 1)

    def update(self, layer_id: str, k: Tensor, v: Tensor, slots: Tensor, span: int,
               rows: Optional[Tensor | slice] = None, start: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """Write k/v [b, Hkv, T, D] at `slots` [b|1, T] of `rows` and return keys/values [b, Hkv, span, D].

        `start`: the slots are start..start+T-1 for every row (known on the host, so no device sync is needed).
        `rows` as a slice (with `start`): consecutive rows, returned as views of the cache rather than gathered."""
        if span > self.max_length:
            raise ValueError(f"KV cache of {self.max_length} slots cannot hold position {span - 1}")
        kc, vc = self.keys[layer_id], self.values[layer_id]
        bsz = k.shape[0]
        if start is not None and isinstance(rows, slice):
            # Consecutive rows and slots (a prefill chunk): views, so a long prompt's prefix is read in place.
            kc[rows, :, start:start + k.shape[2]] = k
            vc[rows, :, start:start + k.shape[2]] = v
            return kc[rows, :, :span], vc[rows, :, :span]
        if start is not None and rows is None and bsz == self.batch_size:
            # Contiguous slots shared by all rows: plain slice assignment.
            kc[:, :, start:start + k.shape[2]] = k
            vc[:, :, start:start + k.shape[2]] = v
            return kc[:, :, :span], vc[:, :, :span]
        row_idx = (rows if rows is not None else torch.arange(bsz, device=k.device))[:, None]  # [b, 1]
        slot_idx = slots.expand(bsz, -1)  # [b, T]
        kc[row_idx, :, slot_idx] = k.transpose(1, 2)  # indexed view is [b, T, Hkv, D]
        vc[row_idx, :, slot_idx] = v.transpose(1, 2)
        if rows is None and bsz == self.batch_size:
            return kc[:, :, :span], vc[:, :, :span]
        return kc[row_idx[:, 0], :, :span], vc[row_idx[:, 0], :, :span]


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

    def forward(self, x: Tensor, rope: RotaryTables, mask: Optional[Tensor | DocumentMask], *,
                kv_cache: Optional[KVCache] = None, layer_id: str = "", cache: Optional[tuple] = None) -> Tensor:
        bsz, seqlen, _ = x.shape
        # Head counts come from the weights, not the config, so a tensor-parallel shard sees its local heads.
        q = self.q_proj(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        cos, sin = rope.get(seqlen, q.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            slots, span, rows, start = cache
            k, v = kv_cache.update(layer_id, k, v, slots, span, rows, start)  # [B, Hkv, S, D], S = span
        gqa = q.shape[1] != k.shape[1]
        if isinstance(mask, DocumentMask):
            out = document_attention(q, k, v, mask)  # [B, Hq, T, D], causal within each document, no [T, T] mask
        elif hasattr(mask, "attend"):  # a kernel installed from outside (context parallelism: parallel/context.py)
            out = mask.attend(q, k, v)  # [B, Hq, T, D]
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x)). The feed-forward is the dense MLP, or a
    mixture of experts (models/qwen2_moe.py) where the config makes layer `index` sparse."""

    def __init__(self, config: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = SparseMoeBlock(config) if config.is_moe_layer(index) else MLP(config)

    def forward(self, x: Tensor, rope: RotaryTables, mask: Optional[Tensor | DocumentMask], *,
                kv_cache: Optional[KVCache] = None, layer_id: str = "", cache: Optional[tuple] = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv_cache=kv_cache, layer_id=layer_id,
                               cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_attention_mask(attention_mask: Optional[Tensor], query_slots: Tensor, key_length: int,
                         device: torch.device) -> Optional[Tensor]:
    """Boolean attention mask [B or 1, 1, Tq, S] (True = may attend), or None for plain causal attention.

    query_slots [B or 1, Tq] are the key slots the queries occupy; each query attends causally to slots <= its own.
    attention_mask is HF's 2-D padding mask [B, S] over all key slots (1 = real token) or a full 4-D boolean mask.
    A query on a padding slot would see no key at all, and a fully masked softmax row is NaN that then leaks through
    values; such rows are allowed to see themselves, which keeps every activation finite (their outputs are unused).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.to(device=device, dtype=torch.bool)  # e.g. document masking for packed samples
    seqlen = query_slots.shape[-1]
    if attention_mask is None and key_length == seqlen and query_slots.shape[0] == 1 and \
            int(query_slots[0, 0]) == 0:
        return None  # a fresh full sequence: plain causal attention (SDPA's fast path)
    k_pos = torch.arange(key_length, device=device)  # [S]
    q_pos = query_slots.to(device)[:, None, :, None]  # [B|1, 1, Tq, 1]
    allowed = k_pos <= q_pos  # [B|1, 1, Tq, S]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :key_length].to(device=device, dtype=torch.bool)
        allowed = allowed | (k_pos == q_pos)
    return allowed


def init_rule(module: nn.Module, param_name: str, std: float) -> InitRule:
    """HF's Qwen2 init: Normal(0, std) for matrices and embeddings, zeros for biases, ones for norms. Modules added
    from outside (LoRA adapters) say how their own extra parameters start through an `init_rule` method."""
    own = getattr(module, "init_rule", None)
    rule = own(param_name, std) if own is not None else None
    if rule is not None:
        return rule
    if isinstance(module, RMSNorm):
        return InitRule("ones")
    if param_name == "bias":
        return InitRule("zeros")
    if isinstance(module, (nn.Linear, nn.Embedding)) and param_name == "weight":
        return InitRule("normal", std)
    raise ValueError(f"no initialisation rule for {type(module).__name__}.{param_name}")


class Qwen2Model(nn.Module):
    """Token embedding -> decoder layers -> final norm -> lm_head; each end optional (pipeline stages)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens: Optional[nn.Embedding] = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i) for i in range(config.num_hidden_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: Optional[nn.Linear] = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- initialisation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: Optional[float] = None) -> None:
        """Draw every parameter by `init_rule` from torch's global generator (one process; the trainer uses
        `parallel.init.init_weights`, which draws the same rules independently of the layout)."""
        std = self.config.initializer_range if std is None else std
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                init_rule(module, name, std).apply_(param)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Re-tie lm_head to the embedding (needed after `to_empty`, which re-creates parameters)."""
        if self.config.tie_word_embeddings and self.lm_head is not None and self.embed_tokens is not None:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- forward ----------------------------------------------------------------------------------------------------
    def forward(self, inputs: Tensor, *, position_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor | DocumentMask] = None, kv_cache: Optional[KVCache] = None,
                cache_start: int = 0, cache_positions: Optional[Tensor] = None,
                cache_rows: Optional[Tensor | slice] = None,
                cache_span: Optional[int] = None, logits_to_keep: int | Tensor = 0,
                apply_head: bool = True) -> Tensor:
        """inputs: token ids [B, T] (or hidden states [B, T, H] when the embedding was removed).

        Returns logits [B, T, V], or hidden states [B, T, H] when lm_head was removed.
        - position_ids [B, T]: rotary positions; default: the tokens' cache slots (cache_start + arange(T)).
        - attention_mask: a 2-D padding mask [B, S] over all key slots, a 4-D boolean mask [B, 1, T, S], or a
          `DocumentMask` (several documents per row, each attended causally on its own; no [T, T] tensor; not with
          kv_cache). Positions still come from position_ids (pass the documents' restarting ones if wanted).
        - kv_cache: write this call's keys/values at slots cache_start + arange(T) for every row, or at per-row
          `cache_positions` [B, T] of the cache rows `cache_rows` [B] (default: rows 0..B-1; a slice of consecutive
          rows with cache_start reads them in place). Without a mask and cache_positions the queries attend lower-right
          causally over slots [0, cache_start + T) with no [T, S] mask (chunked prefill: inference/prefill.py).
        - cache_span: attend over cache slots [0, cache_span) (default: up to the largest slot written), slots past
          each query's own masked. The compiled decode step passes it: the whole cache (CUDA graphs, fully static
          shapes) or, on CPU, a size the graph treats as dynamic.
        - logits_to_keep: an int k > 0 computes the head only for the last k positions; a tensor [B] of indices
          computes it for one position per row (the last real token of right-padded prompts). Returns [B, k, V].
        - apply_head=False: return the final-normed hidden states [B, k, H] that lm_head would read (the inference
          engine applies the head itself, or only screens it for greedy steps).
        """
        h = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs  # [B, T, H]
        bsz, seqlen = inputs.shape[:2]
        documents = isinstance(attention_mask, DocumentMask)
        if documents and kv_cache is not None:
            raise ValueError("a DocumentMask is for training / scoring whole sequences, not with a kv_cache")
        if kv_cache is None and (attention_mask is None or documents):
            # Training / scoring a fresh sequence: causal attention (within each document), positions 0..T-1 unless
            # given. Nothing here may depend on h's sequence length, which sequence parallelism shards.
            return self._run_layers(h, RotaryTables(position_ids, self.config.head_dim, self.config.rope_theta),
                                    attention_mask, None, None, logits_to_keep, apply_head)
        if cache_positions is None:
            slots = torch.arange(cache_start, cache_start + seqlen, device=h.device)[None]  # [1, T]
        else:
            slots = cache_positions.to(h.device)  # [B, T]
        if cache_span is not None:
            span = cache_span
        else:
            span = int(slots.max()) + 1 if cache_positions is not None else cache_start + seqlen
        if position_ids is None:
            position_ids = slots.expand(bsz, seqlen)
        rope = RotaryTables(position_ids, self.config.head_dim, self.config.rope_theta)
        if kv_cache is not None and attention_mask is None and cache_positions is None and cache_span is None:
            # Every row's queries are slots cache_start.. of keys 0..span-1 (a prompt, or a chunk of one after the
            # slots already cached): lower-right causal attention, with no [T, span] mask in memory.
            mask = LowerRightCausal()
        else:
            mask = build_attention_mask(attention_mask, slots, span, h.device)
        start = cache_start if cache_positions is None else None
        cache = (slots, span, cache_rows, start) if kv_cache is not None else None
        out = self._run_layers(h, rope, mask, kv_cache, cache, logits_to_keep, apply_head)
        if kv_cache is not None and not torch.compiler.is_compiling():  # host bookkeeping, not part of a graph
            kv_cache.length = max(kv_cache.length, span)
        return out

    def _run_layers(self, h: Tensor, rope: RotaryTables, mask: Optional[Tensor | DocumentMask], kv_cache: Optional[KVCache],
                    cache: Optional[tuple], logits_to_keep: int | Tensor, apply_head: bool = True) -> Tensor:
        bsz = h.shape[0]
        for layer_id, layer in self.layers.items():
            if kv_cache is None:
                # Training / scoring: no per-layer argument. Under activation checkpointing, torch 2.11's dynamo
                # guards on the checkpointed call's keyword values, so the layer's name made every compiled layer
                # recompile, past the limit of 8 (seen on an H200); the rest then ran uncompiled.
                h = layer(h, rope, mask)
            else:
                h = layer(h, rope, mask, kv_cache=kv_cache, layer_id=layer_id, cache=cache)
        if isinstance(logits_to_keep, Tensor):
            h = h[torch.arange(bsz, device=h.device), logits_to_keep.to(h.device)][:, None]  # [B, 1, H]
        elif logits_to_keep > 0:
            h = h[:, -logits_to_keep:]  # [B, K, H]
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None and apply_head:
            return self.lm_head(h)  # [B, K, V]
        return h


def local_kv_heads(model: Qwen2Model) -> int:
    """Key/value heads this process holds: the config's, or its share when k_proj is tensor-parallel sharded."""
    layer = next(iter(model.layers.values()))
    layer = getattr(layer, "_checkpoint_wrapped_module", layer)
    weight = layer.self_attn.k_proj.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return local.shape[0] // model.config.head_dim


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

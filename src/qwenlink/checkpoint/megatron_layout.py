"""How Megatron cuts a Qwen2/Llama model into tensor- and pipeline-parallel pieces (pure functions, no files).

Facts (checked against Megatron-LM's converter output in tests/fixtures):
- q/k/v are fused per query group: [q heads of group 0; k0; v0; q heads of group 1; k1; v1; ...], and TP ranks take
  contiguous row chunks, i.e. whole groups;
- gate/up are fused as [gate_r; up_r] per TP rank r (not the r-th chunk of [gate; up]);
- o_proj and down_proj are row-parallel (split on the input dimension, dim 1);
- embedding and output layer are split on the vocab dimension after padding the vocab to a multiple of
  make_vocab_size_divisible_by x TP with copies of the last real row;
- with virtual pipelining, chunk c of pipeline rank p holds the block of layers numbered c x PP + p;
- a mixture of experts' routed experts are split across EP expert-parallel ranks in contiguous blocks (rank e holds
  experts e x E/EP .. (e+1) x E/EP - 1, numbered from 0 on each rank), each expert TP-split like a dense MLP; every
  other tensor is repeated in each EP rank's file.
All functions work on meta tensors too, so per-rank shapes of a 72B model can be planned without memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig

Tensor = torch.Tensor


# ---- vocab padding --------------------------------------------------------------------------------------------------
def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: the next multiple of divisible_by x TP."""
    multiple = max(1, divisible_by) * tp
    return -(-vocab_size // multiple) * multiple


def vocab_shards(weight: Tensor, padded: int, tp: int, dtype: Optional[torch.dtype] = None) -> list[Tensor]:
    """[V, H] -> TP shards of [padded/TP, H]; padding rows repeat the last real row (as Megatron's converter does).

    Each shard is built once, so no padded copy of the whole table is ever held.
    """
    vocab = weight.shape[0]
    if padded < vocab or padded % tp:
        raise QwenlinkError(f"padded vocab {padded} must be >= the vocab {vocab} and divisible by TP {tp}")
    rows = padded // tp
    shards = []
    for t in range(tp):
        start, stop = t * rows, (t + 1) * rows
        real = weight[min(start, vocab):min(stop, vocab)]
        pad = weight[-1:].expand(stop - max(start, vocab), -1) if stop > vocab else weight[:0]
        shard = torch.cat([real, pad], dim=0)  # a new tensor holding only this shard
        shards.append(shard.to(dtype) if dtype is not None else shard)
    return shards


# ---- attention: fused QKV -------------------------------------------------------------------------------------------
def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int) -> Tensor:
    """q [nh*d, ...], k/v [ng*d, ...] -> [(nh + 2ng)*d, ...] grouped as [q heads of g; k_g; v_g] per group g."""
    rest = q.shape[1:]
    d = k.shape[0] // num_groups
    q = q.reshape(num_groups, num_heads // num_groups * d, *rest)
    k = k.reshape(num_groups, d, *rest)
    v = v.reshape(num_groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, num_heads: int, num_groups: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of fuse_qkv."""
    rest = qkv.shape[1:]
    per_group = num_heads // num_groups * head_dim
    grouped = qkv.reshape(num_groups, per_group + 2 * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(), v.reshape(-1, *rest).contiguous())


# ---- MLP: fused gate/up ---------------------------------------------------------------------------------------------
def fuse_gate_up(gate: Tensor, up: Tensor, tp: int) -> list[Tensor]:
    """Per TP rank r: cat(gate_r, up_r)."""
    return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp, dim=0), up.chunk(tp, dim=0))]


def split_gate_up(shards: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Inverse of fuse_gate_up: each shard is [gate_r; up_r] with equal halves."""
    gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
    return torch.cat(gates, dim=0), torch.cat(ups, dim=0)


# ---- TP splitting ---------------------------------------------------------------------------------------------------
def split_rows(t: Tensor, tp: int) -> list[Tensor]:
    return [c.contiguous() for c in t.chunk(tp, dim=0)]


def split_cols(t: Tensor, tp: int) -> list[Tensor]:
    return [c.contiguous() for c in t.chunk(tp, dim=1)]


# ---- parallel sizes and layer placement -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """A Megatron parallel layout: TP x PP x EP ranks, V virtual chunks per pipeline rank, layers per chunk."""

    tp: int
    pp: int
    vpp: int
    # layer_counts[p][c]: number of decoder layers in chunk c of pipeline rank p.
    layer_counts: tuple[tuple[int, ...], ...]
    ep: int = 1  # expert-parallel size (mixture of experts only)

    @property
    def num_layers(self) -> int:
        return sum(sum(row) for row in self.layer_counts)

    def global_layers(self, p: int, c: int) -> list[int]:
        """Global layer numbers held by chunk c of pipeline rank p (Megatron's order: chunk-major, then rank)."""
        start = 0
        for cc in range(self.vpp):
            for pp in range(self.pp):
                n = self.layer_counts[pp][cc]
                if (pp, cc) == (p, c):
                    return list(range(start, start + n))
                start += n
        raise IndexError((p, c))

    def holds_embedding(self, p: int, c: int) -> bool:
        return p == 0 and c == 0

    def holds_head(self, p: int, c: int) -> bool:
        return p == self.pp - 1 and c == self.vpp - 1


def local_experts(num_experts: int, ep: int, ep_rank: int) -> range:
    """The global expert numbers expert-parallel rank `ep_rank` holds (Megatron: a contiguous block per rank)."""
    per_rank = num_experts // ep
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def make_layout(config: ModelConfig, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                layers_per_virtual_stage: Optional[int] = None,
                num_layer_list: Optional[Sequence[int]] = None, ep: int = 1) -> Layout:
    """Validate the requested parallel sizes against the model and place the layers.

    Messages say which constraint failed, as megatron-core's own checks do.
    """
    n = config.num_hidden_layers
    for name, value in (("--tp", tp), ("--pp", pp), ("--ep", ep)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise QwenlinkError(f"{name} must be a positive integer, got {value!r}")
    _check_moe_sizes(config, tp, ep)
    if config.num_attention_heads % tp:
        raise QwenlinkError(f"--tp {tp} does not divide num_attention_heads {config.num_attention_heads}")
    if config.num_key_value_heads % tp:
        raise QwenlinkError(f"--tp {tp} does not divide the number of query groups (num_key_value_heads "
                            f"{config.num_key_value_heads}); Megatron gives each TP rank whole groups")
    if any(not config.is_moe_layer(i) for i in range(n)) and config.intermediate_size % tp:
        raise QwenlinkError(f"--tp {tp} does not divide intermediate_size {config.intermediate_size}")
    if vpp is not None and layers_per_virtual_stage is not None:
        raise QwenlinkError("give --vpp or --layers-per-virtual-stage, not both")
    if num_layer_list:
        if vpp not in (None, 1) or layers_per_virtual_stage is not None:
            raise QwenlinkError("--num-layer-list cannot be combined with virtual pipeline stages")
        if len(num_layer_list) != pp:
            raise QwenlinkError(f"--num-layer-list has {len(num_layer_list)} entries, expected one per pipeline "
                                f"stage (--pp {pp})")
        if any(int(x) < 1 for x in num_layer_list) or sum(num_layer_list) != n:
            raise QwenlinkError(f"--num-layer-list {','.join(map(str, num_layer_list))} must be positive and sum to "
                                f"num_hidden_layers {n}")
        return Layout(tp, pp, 1, tuple((int(x),) for x in num_layer_list), ep)
    if layers_per_virtual_stage is not None:
        if layers_per_virtual_stage < 1 or n % (pp * layers_per_virtual_stage):
            raise QwenlinkError(f"--layers-per-virtual-stage {layers_per_virtual_stage} x --pp {pp} does not divide "
                                f"num_hidden_layers {n}")
        vpp = n // (pp * layers_per_virtual_stage)
    vpp = vpp or 1
    if vpp < 1:
        raise QwenlinkError(f"--vpp must be a positive integer, got {vpp}")
    if n % (pp * vpp):
        what = f"--pp {pp} x --vpp {vpp}" if vpp > 1 else f"--pp {pp}"
        raise QwenlinkError(f"{what} does not divide num_hidden_layers {n} (use --num-layer-list for uneven stages)")
    if vpp > 1 and pp == 1:
        raise QwenlinkError("virtual pipeline stages need --pp > 1")
    per_chunk = n // (pp * vpp)
    return Layout(tp, pp, vpp, tuple(tuple(per_chunk for _ in range(vpp)) for _ in range(pp)), ep)


def _check_moe_sizes(config: ModelConfig, tp: int, ep: int) -> None:
    """Expert parallelism needs experts to split evenly; TP splits each expert's and the shared expert's width."""
    if not config.is_moe:
        if ep != 1:
            raise QwenlinkError(f"--ep {ep} applies to a mixture-of-experts model only (this model is dense)")
        return
    if config.num_experts % ep:
        raise QwenlinkError(f"--ep {ep} does not divide num_experts {config.num_experts} (each expert-parallel "
                            f"rank holds the same number of experts)")
    for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if getattr(config, name) % tp:
            raise QwenlinkError(f"--tp {tp} does not divide {name} {getattr(config, name)}")

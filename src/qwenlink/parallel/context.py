"""Context parallelism: one sequence split over the `cp` ranks of a mesh, attention over the whole of it.

Why this design (and not torch's `context_parallel`): torch's ring attention dispatches on the SDPA kernel's aten op,
and the CPU kernel (aten._scaled_dot_product_flash_attention_for_cpu) has no sharding strategy, so it cannot run on a
CPU / gloo job. Here each rank computes q, k, v for its own tokens and all-gathers k and v over the cp group with a
functional collective (Llama 3's approach); the backward reduce-scatters the key/value gradients, on gloo, NCCL and
HCCL alike, and the attention itself is an ordinary SDPA call on whatever device. Only the rank's own k and v are
kept for backward, which gathers them again (`_ContextAttention`), so every part of the activations falls as 1 / cp.

The sequence of length T is cut into 2 x cp chunks of c = T / (2 cp) tokens; rank r holds chunk r and chunk
2 cp - 1 - r (a head and a tail), so under causal attention every rank attends over the same number of key/query
pairs (Megatron's load balancing). Everything indexed by position follows that permutation: token ids and labels
(`shard_sequence`), explicit positions (restarting per document), and the rotary positions the model would otherwise
number 0..T/cp - 1 (a forward pre-hook on each attention module gives it the global ones). Document masks stay those
of the whole sequence (host boundaries, O(T)); each local query chunk attends to the keys before it in its own
document.

A query chunk [s, s + c) sees keys [0, s + c): a lower-right aligned causal pattern that SDPA's `is_causal` (upper
left) cannot express when there are more keys than queries; `models/attention.py` computes it without an [n, m] mask
(shared with chunked prefill).

Parameters are replicated over cp like over data parallelism, and each cp rank's loss covers its own tokens, so their
gradients are summed over cp like over dp: FSDP2 shards over the flattened (dp_shard, cp) mesh (parallelize.py), and
the trainer divides the summed token loss by the global token count x dp x cp (train/step.py).
"""

from __future__ import annotations

from typing import Collection, Optional

import torch
from torch import nn

from qwenlink.models.attention import lower_right_attention
from qwenlink.models.documents import DocumentMask

Tensor = torch.Tensor


# ---- the load-balanced split ----------------------------------------------------------------------------------------
def rank_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two chunks (of 2 x cp) that cp rank `rank` holds, in the order it holds them: a head and a tail."""
    return rank, 2 * cp - 1 - rank


def local_indices(seqlen: int, cp: int, rank: int, device: torch.device | str = "cpu") -> Tensor:
    """Global token indices held by `rank`: [T / cp] int64 (chunk r then chunk 2cp-1-r, c = T / 2cp each)."""
    if seqlen % (2 * cp):
        raise ValueError(f"a sequence of {seqlen} tokens does not split into 2 x cp = {2 * cp} equal chunks")
    c = seqlen // (2 * cp)
    head, tail = rank_chunks(cp, rank)
    return torch.cat([torch.arange(head * c, (head + 1) * c, device=device),
                      torch.arange(tail * c, (tail + 1) * c, device=device)])


def shard_sequence(tensor: Optional[Tensor], cp: int, rank: int, dim: int = 1) -> Optional[Tensor]:
    """This rank's tokens of a [..., T, ...] tensor along `dim`: [..., T / cp, ...] (None stays None)."""
    if tensor is None:
        return None
    c = tensor.shape[dim] // (2 * cp)
    head, tail = rank_chunks(cp, rank)
    return torch.cat([tensor.narrow(dim, head * c, c), tensor.narrow(dim, tail * c, c)], dim=dim)


def pad_multiple(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """What every sequence length must be a multiple of: 2 x cp chunks, each rank's T / cp divisible over tp when
    sequence parallelism shards it further."""
    return 2 * cp * (tp if sequence_parallel and tp > 1 else 1)


# ---- attention ------------------------------------------------------------------------------------------------------
def _rank_major(x: Tensor, cp: int) -> list[Tensor]:
    """Each rank's tokens of a whole-sequence [B, H, T, D] tensor, rank-major: rank s holds chunk s then chunk
    2cp-1-s (the layout an all-gather over cp produces and a reduce-scatter over cp expects)."""
    chunks = x.chunk(2 * cp, dim=2)
    return [torch.cat([chunks[s], chunks[2 * cp - 1 - s]], dim=2) for s in range(cp)]


def gather_sequence(x: Tensor, group, cp: int) -> Tensor:
    """All ranks' tokens of x [B, H, T/cp, D] in sequence order: [B, H, T, D] (no autograd: the caller's backward
    reduce-scatters)."""
    from torch.distributed import _functional_collectives as funcol

    gathered = funcol.all_gather_tensor(x.contiguous(), gather_dim=0, group=group)  # [cp x B, H, T/cp, D]
    held = [block.chunk(2, dim=2) for block in gathered.chunk(cp, dim=0)]  # rank s: (chunk s, chunk 2cp-1-s)
    order = [held[j][0] if j < cp else held[2 * cp - 1 - j][1] for j in range(2 * cp)]
    return torch.cat(order, dim=2)


def gather_sequence_autograd(x: Tensor, group, cp: int) -> Tensor:
    """`gather_sequence` whose backward reduce-scatters (the functional all-gather's autograd rule)."""
    from torch.distributed import _functional_collectives as funcol

    # all_gather_single_autograd is the newer name (torch 2.13 deprecates the other); both gather along dim 0 here.
    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    gathered = gather(x.contiguous(), gather_dim=0, group=group)  # [cp x B, H, T/cp, D], rank-major
    held = [block.chunk(2, dim=2) for block in gathered.chunk(cp, dim=0)]
    order = [held[j][0] if j < cp else held[2 * cp - 1 - j][1] for j in range(2 * cp)]
    return torch.cat(order, dim=2)


def scatter_sequence_grad(grad: Tensor, group, cp: int) -> Tensor:
    """The backward of `gather_sequence`: every rank's gradient for the whole sequence [B, H, T, D], summed over the
    cp ranks, each rank receiving its own tokens' part [B, H, T/cp, D]."""
    from torch.distributed import _functional_collectives as funcol

    stacked = torch.cat(_rank_major(grad, cp), dim=0)  # [cp x B, H, T/cp, D], rank-major
    out = funcol.reduce_scatter_tensor(stacked, "sum", scatter_dim=0, group=group)  # [B, H, T/cp, D]
    # eager: an AsyncCollectiveTensor, waited for here rather than handed to autograd (fake tensors are plain)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def _document_chunk(q: Tensor, keys: Tensor, values: Tensor, docs: DocumentMask, start: int, end: int) -> Tensor:
    """Queries of global positions [start, end) (q [B, Hq, end - start, D]) over the keys [B, Hkv, >= end, D] of
    their own document before them. One lower-right causal call per (row, document part); slices come from `split`
    so that backward concatenates gradients instead of adding a full-size zero tensor per document."""
    rows = []
    for b, qb in enumerate(q.split(1)):
        bounds = docs.bounds[b]
        edges = sorted({0, *(x for x in bounds if 0 < x < end), end})  # documents clipped to [0, end)
        kb = keys[b:b + 1, :, :end].split([y - x for x, y in zip(edges[:-1], edges[1:])], dim=2)
        vb = values[b:b + 1, :, :end].split([y - x for x, y in zip(edges[:-1], edges[1:])], dim=2)
        cuts = sorted({start, *(x for x in bounds if start < x < end), end})  # the chunk's document parts
        parts = qb.split([y - x for x, y in zip(cuts[:-1], cuts[1:])], dim=2)
        outs = []
        for qd, lo in zip(parts, cuts[:-1]):
            doc = max(i for i, x in enumerate(edges[:-1]) if x <= lo)  # the key piece of this part's document
            outs.append(lower_right_attention(qd, kb[doc], vb[doc]))  # [1, Hq, part, D]
        rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def attend_gathered(q: Tensor, keys: Tensor, values: Tensor, documents: Optional[DocumentMask], cp: int,
                    rank: int) -> Tensor:
    """This rank's query chunks (q [B, Hq, 2c, D]: head, tail) over the whole sequence's keys / values
    [B, Hkv, T, D], causal (within documents, if given) -> [B, Hq, 2c, D]."""
    c = q.shape[2] // 2
    outs = []
    for qj, chunk in zip(q.split(c, dim=2), rank_chunks(cp, rank)):
        start, end = chunk * c, (chunk + 1) * c
        if documents is None:
            outs.append(lower_right_attention(qj, keys[:, :, :end], values[:, :, :end]))
        else:
            outs.append(_document_chunk(qj, keys, values, documents, start, end))
    return torch.cat(outs, dim=2)


class _ContextAttention(torch.autograd.Function):
    """Attention over all-gathered keys and values that keeps only this rank's own q, k, v for backward.

    Why not autograd through the gather: the attention kernel would save the whole sequence's k and v (2 x T x kv
    dim per layer on every rank), the one part of a layer's activations that does not fall as 1 / cp. Backward
    gathers k and v again and recomputes this rank's attention (one extra attention forward and one extra
    all-gather per layer, as activation checkpointing of attention would cost), then reduce-scatters the key and
    value gradients to the ranks that own them."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, documents: Optional[DocumentMask], group, cp: int,
                rank: int) -> Tensor:
        keys, values = gather_sequence(k, group, cp), gather_sequence(v, group, cp)  # [B, Hkv, T, D]
        ctx.save_for_backward(q, k, v)
        ctx.documents, ctx.group, ctx.cp, ctx.rank = documents, group, cp, rank
        return attend_gathered(q, keys, values, documents, cp, rank)  # [B, Hq, 2c, D]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v = ctx.saved_tensors
        keys = gather_sequence(k, ctx.group, ctx.cp).requires_grad_()
        values = gather_sequence(v, ctx.group, ctx.cp).requires_grad_()
        q = q.detach().requires_grad_()
        with torch.enable_grad():
            out = attend_gathered(q, keys, values, ctx.documents, ctx.cp, ctx.rank)
        dq, dkeys, dvalues = torch.autograd.grad(out, (q, keys, values), grad_out)
        dk = scatter_sequence_grad(dkeys, ctx.group, ctx.cp)  # [B, Hkv, 2c, D]: summed over every rank's queries
        dv = scatter_sequence_grad(dvalues, ctx.group, ctx.cp)
        return dq, dk, dv, None, None, None, None


@torch.compiler.disable
def context_attention(q: Tensor, k: Tensor, v: Tensor, documents: Optional[DocumentMask], group, cp: int,
                      rank: int, keep_gathered: bool = False) -> Tensor:
    """Causal attention (within documents, if given) of this rank's queries over the whole sequence's keys.

    q [B, Hq, 2c, D], k/v [B, Hkv, 2c, D] for this rank's chunks (head, tail) -> [B, Hq, 2c, D].

    `keep_gathered` (a layer under activation checkpointing): autograd through the gather, which saves the whole
    k and v. Checkpointing discards what the forward saves and what its recomputation saves lives only until the
    layer's backward ends, so gathering and computing attention once more there would cost an all-gather and an
    attention forward per layer for no memory."""
    if keep_gathered:
        keys, values = gather_sequence_autograd(k, group, cp), gather_sequence_autograd(v, group, cp)
        return attend_gathered(q, keys, values, documents, cp, rank)
    return _ContextAttention.apply(q, k, v, documents, group, cp, rank)


class ContextAttention:
    """What the attention module receives as its mask under context parallelism: the whole sequence's documents (or
    none) and the cp group; `models/qwen2.py` calls its `attend` in place of its own kernel."""

    def __init__(self, documents: Optional[DocumentMask], group, cp: int, rank: int,
                 keep_gathered: bool = False) -> None:
        self.documents, self.group, self.cp, self.rank = documents, group, cp, rank
        self.keep_gathered = keep_gathered

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return context_attention(q, k, v, self.documents, self.group, self.cp, self.rank, self.keep_gathered)


# ---- applying it to a model -----------------------------------------------------------------------------------------
def apply_context_parallel(model: nn.Module, cp_mesh, recomputed_layers: Collection[str] = ()) -> nn.Module:
    """Make every attention module of `model` (a Qwen2Model or a pipeline stage of it) attend over the whole
    sequence split over `cp_mesh`. Apply after tensor parallelism: the hook then sees the attention's input after
    sequence parallelism's all-gather, i.e. this rank's T / cp tokens. `recomputed_layers`: the names (keys of
    `model.layers`) of the layers activation checkpointing will recompute (see `context_attention`)."""
    from qwenlink.models.qwen2 import Attention

    cp, rank, group = cp_mesh.size(), cp_mesh.get_local_rank(), cp_mesh.get_group()

    def hook(keep_gathered: bool):
        def before_attention(module: nn.Module, args: tuple, kwargs: dict):
            x, rope, mask = args
            if kwargs.get("kv_cache") is not None:
                raise RuntimeError("context parallelism is for training whole sequences, not with a KV cache")
            if mask is not None and not isinstance(mask, DocumentMask):
                raise RuntimeError("context parallelism takes causal attention or a DocumentMask, not a dense mask")
            if rope.position_ids is None:  # the model would number this rank's tokens 0..T/cp-1: give the global ones
                rope.position_ids = local_indices(x.shape[1] * cp, cp, rank, device=x.device)[None]  # [1, T/cp]
            return (x, rope, ContextAttention(mask, group, cp, rank, keep_gathered)), kwargs
        return before_attention

    for name, layer in model.layers.items():
        for module in layer.modules():
            if isinstance(module, Attention):
                module.register_forward_pre_hook(hook(name in recomputed_layers), with_kwargs=True)
    return model

"""Expert parallelism: a mixture of experts' routed experts divided over the `ep` ranks of a mesh, tokens sent to them.

Why this design: the model keeps every expert projection as one stacked [E, out, in] weight (models/qwen2_moe.py), so
expert parallelism is a Shard(0) of that weight on the ep mesh - ep rank j holds experts [j E/ep, (j+1) E/ep) as a
DTensor whose global shape is the full [E, out, in]. Checkpoints (DCP) and full state dicts therefore see the same
names and shapes at every ep, and a run saved at ep2 resumes at ep1. The ep ranks are data-parallel ranks (ep
borrows from dp_shard, as in torchtitan and Megatron): each holds its own tokens, routes them with its own copy of the
router, and exchanges only the expert rows:

    rows sorted by expert (the model's own sort)         [M, H]   M = this rank's tokens x top-k
    -> all-to-all over ep: each rank gets the rows for its experts, grouped by source rank, then by local expert
    -> regrouped by local expert, computed by the local experts (the model's grouped GEMM or loop)
    -> back in source order, all-to-all back (the reverse split)                            [M, H]

and the model weights and sums them per token as without ep. Routing, top-k and the load-balancing loss never leave
the rank, so every token's output and every gradient equal one process's.

The all-to-all's split sizes must be host integers: the per-expert row counts are exchanged on the device (one small
all-to-all of E integers) and then copied to the host once per MoE layer, forward only - the cost torchtitan and
Megatron accept for token-dropless expert parallelism. The backward of each all-to-all is the reverse all-to-all with
the same (already host) splits (functional collectives' autograd), so backward adds no synchronisation.

Gradients: non-expert parameters are FSDP2-sharded over all dp ranks, which average their gradients over dp. An
expert's gradient on its ep rank already sums the contributions of all ep ranks' tokens (through the all-to-all's
backward); FSDP2 then averages it over the remaining dp ranks (dp / ep). The expert weights are therefore used with
their gradient scaled by 1 / ep (`_ScaleGrad`), which makes that average exactly the global-batch mean's gradient.

LoRA adapters on the routed experts (models/lora_experts.py: A [E, r, in], B [E, out, r]) are stacked like the
weights and sharded with them (every name in `StackedLinear.stacked`); a rank computes its experts' rows through the
projection's own `compute` with its local slices, and the adapters' gradients are scaled like the weights'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenlink.errors import QwenlinkError
from qwenlink.models.qwen2_moe import GroupedExperts, moe_blocks, use_grouped_gemm

Tensor = torch.Tensor


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `factor` (the expert weights' 1 / ep, see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def _all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    """Differentiable all-to-all of rows (backward: the reverse split), waited for here."""
    from torch.distributed import _functional_collectives as funcol

    out = funcol.all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


def _is_fake(t: Tensor) -> bool:
    """A fake tensor of `qwenlink plan`'s simulation (parallel/simulate.py), which has shapes but no values."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _balanced(rows: int, ep: int, local: int) -> Tensor:
    """The host counts a simulated step assumes, [2, ep, local] (send / receive): routing spread evenly over the
    experts (what the load-balancing loss drives towards; a fake tensor has no routing to read). `qwenlink plan`'s
    memory and all-to-all bytes for expert parallelism are therefore those of a balanced router."""
    per_expert = torch.full((ep * local,), rows // (ep * local), dtype=torch.int64)
    per_expert[: rows % (ep * local)] += 1
    grid = per_expert.view(ep, local)
    return torch.stack([grid, grid])


class ExpertExchange:
    """The `GroupedExperts.exchange` of an expert-parallel model: all-to-all to the experts' ranks and back."""

    def __init__(self, ep_mesh) -> None:
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()

    def __call__(self, experts: GroupedExperts, rows: Tensor, counts: Tensor) -> Tensor:
        """rows [M, H] sorted by (global) expert, counts [E] -> the rows' expert outputs [M, H], same order."""
        from torch.distributed import _functional_collectives as funcol

        ep, local = self.ep, experts.num_experts // self.ep
        # received[s, e]: rows source rank s sends to this rank's local expert e. No autograd: counts are integers.
        received = funcol.all_to_all_single(counts, None, None, self.group)  # [E] = [ep sources x local experts]
        received = funcol.wait_tensor(received) if isinstance(received, funcol.AsyncCollectiveTensor) else received
        # The one device-to-host copy of the layer: the all-to-all's splits (and the loop's counts) as host integers.
        host = _balanced(rows.shape[0], ep, local) if _is_fake(counts) else \
            torch.cat([counts, received]).to("cpu").view(2, ep, local)  # [send / receive, ranks, local experts]
        send, recv = host[0].sum(1).tolist(), host[1].sum(1).tolist()  # rows to / from each ep rank
        arrived = _all_to_all(rows, recv, send, self.group)  # [R, H]: source-major, then by local expert
        # Regroup by local expert (sources in rank order within each, so an expert sees rows as one process would).
        # Segment (source s, local expert e) = s x local + e of each arrived row, by a search in the segments' ends
        # (a fixed-size op: repeat_interleave's output size would depend on the values).
        ends = received.cumsum(0)  # [ep x local]
        segment = torch.searchsorted(ends, torch.arange(sum(recv), device=rows.device), right=True)  # [R]
        expert_of_row = segment % local  # [R]
        order = expert_of_row.argsort(stable=True)  # [R]
        local_counts = received.view(ep, local).sum(0)  # [local]
        host_counts = None if use_grouped_gemm(rows) else host[1].sum(0).tolist()
        sorted_rows = arrived.index_select(0, order)  # [R, H]
        project = lambda proj, x: proj.compute(x, local_counts, host_counts,  # noqa: E731
                                               *(self._local(getattr(proj, name)) for name in proj.stacked))
        hidden = F.silu(project(experts.gate_proj, sorted_rows)) * project(experts.up_proj, sorted_rows)  # [R, I]
        out = project(experts.down_proj, hidden)  # [R, H]
        # back to arrival order: the inverse permutation by one scatter (no second sort)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        out = out.index_select(0, inverse)  # [R, H]
        return _all_to_all(out, send, recv, self.group)  # [M, H]

    def _local(self, param: Tensor) -> Tensor:
        """This rank's experts of a stacked parameter (a weight [E / ep, out, in], a LoRA adapter [E / ep, r, in] or
        [E / ep, out, r]), with the gradient scaled by 1 / ep."""
        local = param.to_local() if hasattr(param, "to_local") else param
        return _ScaleGrad.apply(local, 1.0 / self.ep)


def apply_expert_parallel(model: nn.Module, ep_mesh) -> None:
    """Shard every sparse layer's stacked expert weights over `ep_mesh` (Shard(0): a contiguous range of experts per
    rank) and route their rows through `ExpertExchange`, in place, on a meta model before FSDP2."""
    from torch.distributed.tensor import DTensor, Shard

    exchange = ExpertExchange(ep_mesh)
    for block in moe_blocks(model):
        experts = block.experts
        for proj in (experts.gate_proj, experts.up_proj, experts.down_proj):
            for name in proj.stacked:  # the weight, and LoRA's A and B (models/lora_experts.py)
                param = getattr(proj, name)
                if param.shape[0] % exchange.ep:
                    raise QwenlinkError(f"parallel.ep = {exchange.ep} does not divide the model's {param.shape[0]} "
                                        f"experts")
                local = torch.empty((param.shape[0] // exchange.ep, *param.shape[1:]), dtype=param.dtype,
                                    device=param.device)
                setattr(proj, name, nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False,
                                                                    shape=param.shape, stride=param.stride()),
                                                 requires_grad=param.requires_grad))
        experts.exchange = exchange


def shard_experts(model: nn.Module, expert_dp_mesh, *, param_dtype=None, reshard_after_forward: bool = True) -> None:
    """Every sparse layer's routed experts as their own FSDP2 unit over `expert_dp_mesh` (the dp ranks ep leaves,
    possibly one), before the layer's unit takes the rest: FSDP2 shards the ep-local [E / ep, ...] block further and
    averages its gradient over those ranks only. Same precision policy as the other units (parallel/data.py)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in moe_blocks(model):
        fully_shard(block.experts, mesh=expert_dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)

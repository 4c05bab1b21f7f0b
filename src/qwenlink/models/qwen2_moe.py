"""Qwen1.5-MoE (HF `Qwen2MoeForCausalLM`, model_type `qwen2_moe`): the sparse feed-forward block of its layers.

Everything else of the model - embedding, attention with q/k/v bias, RMSNorm, rotary embeddings, KV cache, head - is
Qwen1.5's and lives in models/qwen2.py; `DecoderLayer` puts a `SparseMoeBlock` where the config makes a layer sparse
(`ModelConfig.is_moe_layer`). One layer computes, as transformers does:

    probs = softmax(gate(x)) in fp32                           [N, E]
    w, i  = top-k(probs) (renormalised only with norm_topk_prob), cast to x's dtype
    y     = sum_j w_j * expert_{i_j}(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)

with no capacity limit (no token is dropped), so a token's output does not depend on the rest of its batch.

Why the experts are stacked [E, ...] weights (`StackedLinear`) rather than E `nn.Linear` modules: expert parallelism shards that
leading dimension (a rank holds a contiguous range of experts), a grouped GEMM reads one tensor, and FSDP2 shards one
parameter per projection instead of 3 x E small ones. Slice e of each stacked weight is exactly HF's
`experts.{e}.{gate,up,down}_proj.weight` (qwenlink's name: `experts.gate_proj.weight`), so the checkpoint mapping
is a split along dim 0 (checkpoint/hf.py), and LoRA adapts a `StackedLinear` as it adapts an `nn.Linear`
(models/lora.py: per-expert A [E, r, in] and B [E, out, r]).

The load-balancing loss needs each sparse layer's router probabilities and choices; a block keeps those of its last
forward when `record_routing` is set (the trainer sets it; inference does not), and `load_balancing_loss` combines
them as transformers' `load_balancing_loss_func` does.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from qwenlink.models.config import ModelConfig
from qwenlink.models.layers import MLP, InitRule

Tensor = torch.Tensor

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# How routed tokens reach their experts: "auto" (a grouped GEMM on CUDA where torch has one, else a loop over the
# experts that were routed to), or forced "loop" / "grouped" (tests compare the two on CPU).
_IMPL = {"experts": "auto"}


def set_expert_impl(impl: str) -> None:
    if impl not in ("auto", "loop", "grouped"):
        raise ValueError(f"expert implementation must be auto, loop or grouped, got {impl!r}")
    _IMPL["experts"] = impl


def grouped_mm_available() -> bool:
    """torch._grouped_mm exists (torch >= 2.8; absent from older builds, which then loop)."""
    return hasattr(torch, "_grouped_mm")


_CPU_GROUPED: dict[torch.dtype, bool] = {}


def _cpu_grouped_works(dtype: torch.dtype) -> bool:
    """Whether this torch build runs _grouped_mm on CPU in `dtype`, forward and backward (torch 2.13 does, for
    fp32 and bf16; older builds have no CPU kernel). Probed once per dtype on a tiny problem."""
    if dtype not in _CPU_GROUPED:
        try:
            with torch.inference_mode(False), torch.enable_grad():
                a = torch.ones(4, 8, dtype=dtype, requires_grad=True)
                b = torch.ones(2, 8, 8, dtype=dtype, requires_grad=True)
                out = torch._grouped_mm(a, b, offs=torch.tensor([1, 4], dtype=torch.int32))
                out.backward(torch.ones_like(out))
            _CPU_GROUPED[dtype] = True
        except (RuntimeError, NotImplementedError):
            _CPU_GROUPED[dtype] = False
    return _CPU_GROUPED[dtype]


def use_grouped_gemm(x: Tensor) -> bool:
    """The grouped GEMM wherever torch has one for the device and dtype: CUDA in bf16, CPU where the build has a
    kernel (about 1.5x faster than the loop on a CPU training step at 60 experts), and compiled code (the engine's
    compiled decode step, CUDA graphs), which cannot read per-expert counts on the host as the loop does, in bf16
    (the only dtype torch compiles it for)."""
    impl = _IMPL["experts"]
    if impl != "auto":
        return impl == "grouped"
    if not grouped_mm_available():
        return False
    if torch.compiler.is_compiling() or x.is_cuda:
        return x.dtype == torch.bfloat16
    return x.device.type == "cpu" and _cpu_grouped_works(x.dtype)


# ---- checkpoint names -----------------------------------------------------------------------------------------------
def is_stacked_expert(name: str) -> bool:
    """`layers.L.mlp.experts.gate_proj.weight` (a stacked [E, ...] weight), under any prefix."""
    parts = name.rsplit(".", 3)
    return len(parts) == 4 and parts[1] == "experts" and parts[2] in EXPERT_PROJECTIONS and parts[3] == "weight"


def expert_keys(name: str, num_experts: int) -> list[str]:
    """The per-expert checkpoint names of a stacked weight: `...experts.{e}.gate_proj.weight` for each e."""
    prefix, proj, leaf = name.rsplit(".", 2)
    return [f"{prefix}.{e}.{proj}.{leaf}" for e in range(num_experts)]


# ---- the experts ----------------------------------------------------------------------------------------------------
def grouped_linear(x: Tensor, weight: Tensor, counts: Tensor, host_counts: Optional[list[int]]) -> Tensor:
    """x [M, in] (rows sorted by expert, counts[e] rows for expert e) times each expert's weight [E, out, in]^T.

    `host_counts` given: a loop over the experts that have rows (an expert no token was routed to costs nothing);
    None: one grouped GEMM over device offsets (no host synchronisation; empty groups cost nothing either).
    Returns [M, out].
    """
    if host_counts is None:
        offsets = counts.cumsum(0).to(torch.int32)  # [E] end of each expert's rows
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    # unbind / split: one view per expert (of the weights, of the rows) whose backward assembles all the experts'
    # gradients at once; indexing weight[e] or slicing rows per expert would make every expert's backward write a
    # zero-filled gradient of the whole tensor (E^2 traffic: 4x slower than transformers at E = 60).
    experts = weight.unbind(0)
    outs = [F.linear(rows, experts[e]) for e, rows in enumerate(x.split(host_counts)) if rows.shape[0]]  # [n_e, out]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


class StackedLinear(nn.Module):
    """The same projection of every expert: weight [E, out, in], slice e being expert e's `nn.Linear` weight."""

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    def init_rule(self, name: str, std: float) -> Optional[InitRule]:
        """HF's init for the experts: Normal(0, initializer_range), like every other matrix."""
        return InitRule("normal", std) if name == "weight" else None

    # The parameters stacked on the experts' dimension, in `compute`'s order: expert parallelism shards each of them
    # and computes with its rank's experts (parallel/experts.py); LoRA adds its adapters (models/lora_experts.py).
    stacked: tuple[str, ...] = ("weight",)

    def forward(self, x: Tensor, counts: Tensor, host_counts: Optional[list[int]]) -> Tensor:
        """x [M, in], rows sorted by expert (counts [E]) -> [M, out]."""
        return self.compute(x, counts, host_counts, *(getattr(self, name) for name in self.stacked))

    def compute(self, x: Tensor, counts: Tensor, host_counts: Optional[list[int]], weight: Tensor) -> Tensor:
        """The projection with the given experts' weight ([E', out, in]: all experts, or an ep rank's)."""
        return grouped_linear(x, weight, counts, host_counts)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}"


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked projections: gate_proj / up_proj [E, I, H], down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = StackedLinear(num_experts, hidden_size, intermediate_size)
        self.up_proj = StackedLinear(num_experts, hidden_size, intermediate_size)
        self.down_proj = StackedLinear(num_experts, intermediate_size, hidden_size)

    # Expert parallelism (parallel/experts.py) sets this: a callable (experts, rows, counts) -> outputs that sends the
    # sorted rows to the ranks holding their experts and brings the results back; None computes them here.
    exchange: Optional[Callable[["GroupedExperts", Tensor, Tensor], Tensor]] = None

    def run_sorted(self, rows: Tensor, counts: Tensor) -> Tensor:
        """rows [M, H] sorted by expert (counts [E] rows each) through their experts -> [M, H]."""
        # The loop needs the counts on the host; the grouped GEMM keeps them on the device.
        host_counts = None if use_grouped_gemm(rows) else counts.tolist()
        hidden = F.silu(self.gate_proj(rows, counts, host_counts)) * self.up_proj(rows, counts, host_counts)  # [M, I]
        return self.down_proj(hidden, counts, host_counts)  # [M, H]

    def forward(self, x: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        """x [N, H]; expert_ids, weights [N, k] (each token's experts and their weights) -> [N, H]."""
        num_tokens, k = expert_ids.shape
        flat = expert_ids.reshape(-1)  # [N*k] token-slot -> expert
        order = flat.argsort(stable=True)  # [N*k] slots grouped by expert, tokens in order within each
        # [E] rows per expert; a fixed-size scatter (bincount's output size depends on the data, which a compiled
        # graph cannot hold)
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        token = order // k  # [N*k] the token of each sorted slot
        rows = x.index_select(0, token)  # [N*k, H]
        out = self.run_sorted(rows, counts) if self.exchange is None else self.exchange(self, rows, counts)  # [N*k, H]
        out = out * weights.reshape(-1).index_select(0, order)[:, None]
        return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))  # [N, H] summed over each token's k


class SparseMoeBlock(nn.Module):
    """Router + routed experts + gated shared expert; HF's names: gate, experts, shared_expert, shared_expert_gate."""

    record_routing: bool = False  # keep (probs, expert ids) of the last forward for the load-balancing loss

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = MLP(config, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.routing: Optional[tuple[Tensor, Tensor]] = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape  # [B, T, H]
        x = x.reshape(-1, shape[-1])  # [N, H]
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [N, E]
        weights, expert_ids = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.record_routing:
            self.routing = (probs, expert_ids)
        routed = self.experts(x, expert_ids, weights.to(x.dtype))  # [N, H]
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # [N, H]
        return (routed + shared).view(shape)


# ---- the load-balancing loss ----------------------------------------------------------------------------------------
def moe_blocks(model: nn.Module) -> Iterator[SparseMoeBlock]:
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            yield module


def record_routing(model: nn.Module, enabled: bool = True) -> None:
    """Make every sparse block keep its last routing (for `load_balancing_loss`), or stop and drop it."""
    for block in moe_blocks(model):
        block.record_routing = enabled
        if not enabled:
            block.routing = None


def block_routing(block: SparseMoeBlock, token_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """One sparse layer's last recorded forward: tokens routed to each expert [E] (top-k assignments), router
    probability summed per expert [E] (differentiable) and the rows counted (0-dim). `token_mask` [B, T] (1 = real
    token) leaves padding out of all three."""
    probs, expert_ids = block.routing  # [N, E], [N, k]
    ones = torch.ones(expert_ids.numel(), dtype=torch.float32, device=probs.device)
    if token_mask is not None:
        # non_blocking: the trainer's mask comes from the loader's host tensors (no wait for the device)
        mask = token_mask.reshape(-1).to(probs.device, non_blocking=True).to(torch.float32)  # [N]
        ones = mask.repeat_interleave(expert_ids.shape[1])
        probs = probs * mask[:, None]
        n = mask.sum()
    else:
        n = torch.full((), float(probs.shape[0]), device=probs.device)  # written by a kernel, not copied
    counts = torch.zeros(block.num_experts, dtype=torch.float32, device=probs.device) \
        .scatter_add_(0, expert_ids.reshape(-1), ones)
    return counts, probs.sum(0), n


def routing_totals(model: nn.Module, token_mask: Optional[Tensor] = None) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """Summed over the sparse layers of the last forward: tokens routed to each expert [E], router probability per
    expert [E] and the rows counted (a 0-dim tensor). `token_mask` [B, T] (1 = real token) leaves padding out.
    None when the model has no sparse layer that recorded its routing."""
    counts = probs_sum = rows = None
    for block in moe_blocks(model):
        if block.routing is None:
            continue
        layer_counts, layer_probs, n = block_routing(block, token_mask)
        counts = layer_counts if counts is None else counts + layer_counts
        probs_sum = layer_probs if probs_sum is None else probs_sum + layer_probs
        rows = n if rows is None else rows + n
    if counts is None:
        return None
    return counts, probs_sum, rows


def balance_loss(counts: Tensor, probs_sum: Tensor, rows: Tensor) -> Tensor:
    """E x sum_e (counts_e / rows) x (probs_sum_e / rows) from totals over all sparse layers (`routing_totals`;
    a pipeline carries them from stage to stage, train/moe.py)."""
    rows = rows.clamp(min=1.0)
    return counts.shape[0] * torch.sum((counts / rows) * (probs_sum / rows))


def load_balancing_loss(model: nn.Module, token_mask: Optional[Tensor] = None) -> Optional[Tensor]:
    """Switch Transformer's auxiliary loss over all sparse layers, as transformers computes it for Qwen2-MoE:
    E x sum_e (fraction of top-k assignments to e) x (mean router probability of e), both taken over every layer's
    (unmasked) tokens together. Differentiable through the router probabilities; None without recorded routing."""
    totals = routing_totals(model, token_mask)
    return None if totals is None else balance_loss(*totals)

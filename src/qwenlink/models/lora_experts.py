"""LoRA on a mixture of experts' routed experts: one low-rank update per expert, stacked like the experts' weights.

`LoraStackedLinear` is to `StackedLinear` (models/qwen2_moe.py) what `LoraLinear` is to `nn.Linear`: a subclass that
keeps the base `weight` [E, out, in] (frozen, HF-named) and adds `lora_A` [E, r, in] and `lora_B` [E, out, r], so
expert e computes x W_e^T + scaling * (x A_e^T) B_e^T. The adapters are stacked on the experts' dimension for the
same reasons as the weights: the routed rows go through them with the same grouped GEMM (or loop over the experts
that have rows), and expert parallelism shards them with their experts (`stacked`; parallel/experts.py computes a
rank's experts through `compute` with its local slices).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from qwenlink.models.layers import InitRule
from qwenlink.models.qwen2_moe import StackedLinear, grouped_linear

Tensor = torch.Tensor


class LoraStackedLinear(StackedLinear):
    """A StackedLinear with a trainable low-rank update per expert; `weight` is the (frozen) base."""

    # True while a reference pass runs without the adapters (as LoraLinear.adapter_disabled).
    adapter_disabled = False

    def __init__(self, base: StackedLinear, *, r: int, scaling: float, dropout: float = 0.0,
                 adapter_dtype: Optional[torch.dtype] = None) -> None:
        nn.Module.__init__(self)
        self.num_experts, self.in_features, self.out_features = base.num_experts, base.in_features, base.out_features
        self.weight = base.weight  # shared, not copied
        dtype, device = adapter_dtype or base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.num_experts, r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.num_experts, self.out_features, r, dtype=dtype, device=device))
        self.r, self.scaling, self.dropout = r, scaling, dropout
        if device.type != "meta":
            self.reset_adapter_parameters()

    def init_rule(self, name: str, std: float) -> Optional[InitRule]:
        """PEFT's default per expert: A uniform in +-1/sqrt(in_features), B = 0 (the adapted model starts as the
        base); the base weight keeps its own rule."""
        if name == "lora_A":
            return InitRule("uniform", 1.0 / math.sqrt(self.in_features))
        if name == "lora_B":
            return InitRule("zeros")
        return super().init_rule(name, std)

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        for name in ("lora_A", "lora_B"):
            self.init_rule(name, 0.0).apply_(getattr(self, name))

    stacked = ("weight", "lora_A", "lora_B")  # all sharded with their experts under expert parallelism

    def compute(self, x: Tensor, counts: Tensor, host_counts: Optional[list[int]], weight: Tensor, lora_A: Tensor,
                lora_B: Tensor) -> Tensor:
        """x [M, in] sorted by expert through the given experts' base weight and adapters (all experts, or an ep
        rank's: [E', out, in], [E', r, in], [E', out, r]) -> [M, out]."""
        out = grouped_linear(x, weight, counts, host_counts)  # [M, out]
        if self.adapter_disabled:
            return out
        h = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
        if self.dropout > 0.0 and self.training:
            h = F.dropout(h, self.dropout)
        low = grouped_linear(h, lora_A, counts, host_counts)  # [M, r]
        delta = grouped_linear(low, lora_B, counts, host_counts)  # [M, out]
        return out + (delta * self.scaling).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """scaling x B_e @ A_e for every expert: [E, out, in] in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, dropout={self.dropout:g}"

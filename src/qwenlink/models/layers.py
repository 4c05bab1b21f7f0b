"""Building blocks shared by the dense and the mixture-of-experts layers: the SwiGLU MLP and how a parameter starts.

They sit below both models/qwen2.py (the model) and models/qwen2_moe.py (its sparse feed-forward, whose shared
expert is this MLP), so neither of those imports the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from qwenlink.models.config import ModelConfig

Tensor = torch.Tensor


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). `intermediate_size`: another width than the config's (a
    mixture of experts' shared expert)."""

    def __init__(self, config: ModelConfig, intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        ffn = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, ffn, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass(frozen=True)
class InitRule:
    """How one parameter starts: "normal" (std = scale), "uniform" (in [-scale, scale]), "zeros" or "ones"."""

    kind: str
    scale: float = 0.0

    def apply_(self, param: Tensor) -> None:
        """Draw in place from torch's global generator."""
        if self.kind == "normal":
            nn.init.normal_(param, mean=0.0, std=self.scale)
        elif self.kind == "uniform":
            nn.init.uniform_(param, -self.scale, self.scale)
        else:
            nn.init.zeros_(param) if self.kind == "zeros" else nn.init.ones_(param)

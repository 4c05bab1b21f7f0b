"""AdamW with Megatron's parameter groups and learning-rate schedules (warmup, then cosine / linear / constant).

The schedule is a pure function of the step (`lr_at`), so resuming needs nothing but the step number and any
process computes the same value; `Scheduler` only applies it to the optimizer's groups.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from qwenlink.errors import QwenlinkError
from qwenlink.train.config import JobConfig, OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices and embeddings decay; norms and biases (1-D tensors) do not (Megatron's rule).

    Shared (tied) parameters appear once. Names are not used, so the rule survives wrappers that rename modules.
    Each of the two is further split by how its parameters are distributed (plain tensors, DTensors on one mesh):
    the fused and foreach kernels take one kind per call, and tensor parallelism without sequence parallelism leaves
    the norms plain beside DTensor matrices.
    """
    groups: dict[tuple, dict] = {}
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        decays = param.dim() >= 2
        kind = (type(param).__name__, getattr(param, "device_mesh", None))  # meshes compare by layout
        group = groups.setdefault((not decays, kind), {"params": [], "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: k[0])]  # decaying groups first, stable otherwise


def _implementation_flags(choice: str, params: Iterable[torch.Tensor]) -> dict[str, bool]:
    """fused where every parameter's device supports it (CUDA, CPU, ...), else foreach (one kernel per group)."""
    if choice == "for-loop":
        return {"foreach": False}
    if choice == "foreach":
        return {"foreach": True}
    if choice == "fused":
        return {"fused": True}
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices  # type: ignore[attr-defined]

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        supported = {"cuda"}
    devices = {p.device.type for p in params}
    dtypes_ok = all(p.is_floating_point() for p in params)
    if devices and devices <= supported and dtypes_ok:
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over Megatron's decay / no-decay parameter groups (see `param_groups`); the learning rate is set by the scheduler each step."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise QwenlinkError("model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, **_implementation_flags(cfg.implementation, params))


def warmup_iters(cfg: OptimSection, train_iters: int) -> int:
    """Explicit warmup_iters, or warmup_fraction of the run rounded (ModelLink's 1% warmup)."""
    if cfg.warmup_iters >= 0:
        return cfg.warmup_iters
    return int(round(cfg.warmup_fraction * train_iters))


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, decay_iters: int, style: str) -> float:
    """Learning rate for optimizer step `step` (1-based: the first update is step 1).

    - warmup: lr * step / warmup for step <= warmup (so the first update already moves, unlike a 0 start);
    - then decay from lr to min_lr over steps warmup..decay_iters: cosine (half period), linear, or constant (lr);
    - after decay_iters: min_lr (constant style: lr).
    """
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if style == "constant":
        return lr
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup) / max(decay_iters - warmup, 1)
    if style == "linear":
        coeff = 1.0 - progress
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
    else:
        raise QwenlinkError(f"optim.decay_style {style!r} is not one of cosine, linear, constant")
    return min_lr + coeff * (lr - min_lr)


class Scheduler:
    """Sets each group's lr from `lr_at`; stateless apart from the config (the step is the trainer's)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: JobConfig) -> None:
        self.optimizer = optimizer
        o = cfg.optim
        self.lr, self.min_lr, self.style = o.lr, o.min_lr, o.decay_style
        self.warmup = warmup_iters(o, cfg.train.train_iters)
        self.decay_iters = o.decay_iters if o.decay_iters > 0 else cfg.train.train_iters

    def lr_at(self, step: int) -> float:
        return lr_at(step, lr=self.lr, min_lr=self.min_lr, warmup=self.warmup, decay_iters=self.decay_iters,
                     style=self.style)

    def apply(self, step: int) -> float:
        """Set the lr used by the update that makes `step`; returns it for logging."""
        value = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = value
        return value

    def state_dict(self) -> dict:
        return {"lr": self.lr, "min_lr": self.min_lr, "style": self.style, "warmup": self.warmup,
                "decay_iters": self.decay_iters}

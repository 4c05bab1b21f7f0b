"""Device and dtype selection without hard-coding an accelerator: CUDA, Ascend NPU (torch_npu) or CPU."""

from __future__ import annotations

import torch

from qwenlink.errors import QwenlinkError


def default_device() -> torch.device:
    """The best available device: cuda, then npu (when torch_npu is installed), then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    try:
        import torch_npu  # noqa: F401

        if torch.npu.is_available():  # type: ignore[attr-defined]
            return torch.device("npu")
    except ImportError:
        pass
    return torch.device("cpu")


def resolve_device(name: str | None) -> torch.device:
    if name is None or name == "auto":
        return default_device()
    try:
        return torch.device(name)
    except RuntimeError:
        raise QwenlinkError(f"unknown device {name!r} (expected cpu, cuda, cuda:N, npu...)") from None


BACKENDS = {"cuda": "nccl", "npu": "hccl"}  # every other device type (cpu) uses gloo


def backend_for(device_type: str) -> str:
    """The collective backend of a device type ("cuda" for cuda, cuda:0, ...): NCCL has no CPU path, gloo no
    accelerator one."""
    return BACKENDS.get(device_type, "gloo")

"""Inside the plan's simulation: causal attention through the flash kernel, as on the accelerator.

On a CPU build of torch, `F.scaled_dot_product_attention` on fake CUDA tensors has no CUDA kernel to choose and
takes the math path, which materialises [B, H, T, T] scores and probabilities (saved for backward, 2 GiB each for
16 heads at T = 8192 in bf16) that the flash kernel a CUDA / NPU run uses never allocates. This mode sends the
model's causal, unmasked attention to `aten._scaled_dot_product_flash_attention` instead, whose fake (meta) kernel
allocates what flash does: the output and a [B, H, T] fp32 log-sum-exp saved for backward, and in backward the
three input gradients (fp32 without grouped kv heads: the memory-efficient kernel, which CUDA picks for fp32). Attention with an explicit mask (a dense mask; document masks use their own kernels) is left
as it is. Only the plan's simulation enters this mode; training never does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class FlashAttention(TorchFunctionMode):
    """Route causal SDPA on `device_type` tensors to the flash kernel (see the module docstring)."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.routed = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self._routable(args, kwargs):
            q, k, v = args[:3]
            self.routed += 1
            if q.dtype == torch.float32:  # flash has no fp32: the memory-efficient kernel, as CUDA picks then
                return torch.ops.aten._scaled_dot_product_efficient_attention(
                    q, k, v, None, True, 0.0, True, scale=kwargs.get("scale"))[0]
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False,
                                                                     scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)

    def _routable(self, args: tuple, kwargs: dict) -> bool:
        q = args[0] if args else None
        return (isinstance(q, torch.Tensor) and q.device.type == self.device_type and len(args) == 3
                and kwargs.get("is_causal", False) and kwargs.get("attn_mask") is None
                and not kwargs.get("dropout_p", 0.0)
                and (q.dtype in (torch.float16, torch.bfloat16)
                     or (q.dtype == torch.float32 and args[1].shape[1] == q.shape[1])))

"""Inside the plan's simulation: causal attention through the flash kernel, as on the accelerator.

On a CPU build of torch, `F.scaled_dot_product_attention` on fake CUDA tensors has no CUDA kernel to choose and
takes the math path, which materialises [B, H, T, T] scores and probabilities (saved for backward, 2 GiB each for
16 heads at T = 8192 in bf16) that the flash kernel a CUDA / NPU run uses never allocates. This mode sends the
model's causal, unmasked attention to `aten._scaled_dot_product_flash_attention` instead, whose fake (meta) kernel
allocates what flash does: the output and a [B, H, T] fp32 log-sum-exp saved for backward, and in backward the
three input gradients (fp32 without grouped kv heads: the memory-efficient kernel, which CUDA picks for fp32). Attention with an explicit mask (a dense mask; document masks use their own kernels) is left
as it is. Only the plan's simulation enters this context; training never does.

It replaces `torch.nn.functional.scaled_dot_product_attention` process-wide rather than being a TorchFunctionMode:
modes are thread-local, and backward on a (fake) CUDA device runs on autograd's device thread, where activation
checkpointing recomputes each layer. Under a mode the recomputation took the math path while the forward had taken
flash, so checkpointing saw a different number of saved tensors and the plan of any bf16 job with activation
checkpointing failed. The simulation runs in a process of its own, so the process-wide swap touches nothing else.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F


class FlashAttention:
    """Route causal SDPA on `device_type` tensors to the flash kernel while entered (see the module docstring)."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.routed = 0
        self._original: Optional[Callable[..., torch.Tensor]] = None

    def __enter__(self) -> "FlashAttention":
        if self._original is not None:
            raise RuntimeError("FlashAttention is not re-entrant")
        self._original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self._attention
        return self

    def __exit__(self, *exc: object) -> None:
        F.scaled_dot_product_attention = self._original
        self._original = None

    def _attention(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert self._original is not None
        if self._routable(args, kwargs):
            q, k, v = args[:3]
            self.routed += 1
            if q.dtype == torch.float32:  # flash has no fp32: the memory-efficient kernel, as CUDA picks then
                return torch.ops.aten._scaled_dot_product_efficient_attention(
                    q, k, v, None, True, 0.0, True, scale=kwargs.get("scale"))[0]
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False,
                                                                     scale=kwargs.get("scale"))[0]
        return self._original(*args, **kwargs)

    def _routable(self, args: tuple, kwargs: dict) -> bool:
        q = args[0] if args else None
        return (isinstance(q, torch.Tensor) and q.device.type == self.device_type and len(args) == 3
                and kwargs.get("is_causal", False) and kwargs.get("attn_mask") is None
                and not kwargs.get("dropout_p", 0.0)
                and (q.dtype in (torch.float16, torch.bfloat16)
                     or (q.dtype == torch.float32 and args[1].shape[1] == q.shape[1])))

"""oneDNN weight prepacking for CPU decoding: the same linear layers, in the layout oneDNN's GEMM reads fastest.

Decoding multiplies a few rows (one per running request) by every weight matrix. With the plain `[out, in]` layout,
`F.linear` on CPU is far from the memory bandwidth at those row counts: on the 2-core Zen4 VM the 151936 x 512 head
takes 40 ms for 8 rows in fp32 against 15 ms prepacked, and 9.9 ms for one row in bf16 against 6.5 ms
(`benchmarks/bench_prepack.py`; end-to-end decoding figures in BENCHMARKS.md). Reordering each weight once into oneDNN's blocked layout (what
inductor's `freezing` does for compiled CPU models) removes that gap without compiling anything.

`prepack_linears(model)` swaps every plain `nn.Linear` for a `PrepackedLinear` that shares the same parameters (the
state dict, tying and `model.parameters()` are unchanged) and keeps a packed copy next to them, so memory for the
linear weights doubles. The one case the plain kernel wins (a single row in fp32, where `F.linear` already streams at
memory speed) keeps using it, and so do small fp32 matrices (`FP32_MIN_ELEMENTS`). Whenever autograd is on the layers
run `F.linear` (so training, LoRA adapters behind frozen layers included, is unaffected); a weight changed in place or
replaced since packing is repacked before its next use (changes through `.data` bypass the modification counter, as
they do for autograd); non-CPU, DTensor, fp16 or LoRA-wrapped layers are never swapped.
"""

from __future__ import annotations

from typing import Collection, Optional

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)

# fp32 weights smaller than this stay on `F.linear`: measured on the 2-core VM, the packed kernel's fixed cost
# (~19 us a call) outweighs its gain below ~1M elements in fp32 (e.g. 512 x 1408: 156 us packed vs 146 us plain for
# 8 rows), while in bf16 packing wins down to 128 x 512.
FP32_MIN_ELEMENTS = 1 << 20


def prepack_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear kernels inductor uses on CPU."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PrepackedLinear(nn.Linear):
    """An `nn.Linear` whose inference forward uses a oneDNN-packed copy of its weight."""

    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # shared, not copied: tying and the state dict stay as they were
        self.bias = linear.bias
        self.batch_hint = batch_hint
        self._pack()

    def _pack(self) -> None:
        weight = self.weight.detach()
        # Kept as plain attributes, not buffers: they are a cache, never saved or moved with the module.
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.batch_hint)
        self._packed_key = self._weight_key()

    def _weight_key(self) -> tuple:
        return weight_key(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        weight = self.weight
        # Anything that needs autograd (training, LoRA adapters behind frozen layers) or that the packed kernel does
        # not cover runs the plain layer.
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or x.device.type != "cpu" \
                or x.dtype != weight.dtype \
                or weight.dtype not in _PACKABLE_DTYPES or (rows == 1 and x.dtype == torch.float32):
            return F.linear(x, weight, self.bias)
        if self._weight_key() != self._packed_key:
            self._pack()  # the weight was changed in place or replaced since packing
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, self.in_features), self._packed, self.bias,
                                                  "none", [], "")  # [rows, out]
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", prepacked for {self.batch_hint} rows"


def weight_key(weight: Tensor) -> tuple:
    """What a derived copy of a weight (packed, quantised) was made from: storage, dtype, device, shape and in-place
    modification count (-1 for inference-mode tensors, which cannot be modified outside it)."""
    try:
        version = weight._version
    except RuntimeError:
        version = -1
    return weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape), version


def _packable(module: nn.Module) -> bool:
    if type(module) is not nn.Linear:  # LoRA and other wrappers keep their own forward
        return False
    weight = module.weight
    if weight.dtype == torch.float32 and weight.numel() < FP32_MIN_ELEMENTS:
        return False
    return (weight.device.type == "cpu" and weight.dtype in _PACKABLE_DTYPES and weight.layout == torch.strided
            and not hasattr(weight, "to_local"))  # DTensor shards run through their own dispatch


def prepack_linears(model: nn.Module, batch_hint: int, only: Optional[Collection[str]] = None) -> int:
    """Swap the model's plain CPU linear layers for prepacked ones (in place); returns how many were swapped.

    batch_hint: the number of rows the layers will mostly see (the engine's batch size); oneDNN picks its blocking for
    it, and other row counts still work. only: the qualified module names to consider (e.g. {"lm_head"}); default all.
    """
    if not prepack_available():
        return 0
    swaps = [(parent, name, child) for parent_name, parent in model.named_modules()
             for name, child in parent.named_children()
             if _packable(child) and (only is None or f"{parent_name}.{name}".lstrip(".") in only)]
    for parent, name, child in swaps:
        setattr(parent, name, PrepackedLinear(child, batch_hint))
    return len(swaps)

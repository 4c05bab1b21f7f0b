"""Dtype names, in one table, and the check every checkpoint reader applies to a stored tensor's dtype.

One table because the same three dtypes are named on the command line (`--dtype bf16`), in HF config.json
(`"torch_dtype": "bfloat16"`) and in safetensors headers (`BF16`); a second copy drifts. The float check lives here
so each reader (HF safetensors, Megatron rank files, DCP metadata, PEFT adapters) refuses an integer tensor where a
weight belongs with the same one line, instead of `copy_` silently casting int8 codes into weights.
"""

from __future__ import annotations

from typing import Optional

import torch

from qwenlink.errors import QwenlinkError

# What users and config.json call the dtypes a model may run in.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                                  "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
CHOICES = ("fp32", "bf16", "fp16")  # the short names the command line offers

# safetensors' header codes (the format's own list), for checking a tensor before any of its bytes are read.
_SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def parse_dtype(name: str | torch.dtype | None) -> Optional[torch.dtype]:
    """A dtype from its short (`bf16`) or long (`bfloat16`) name; None and torch dtypes pass through."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise QwenlinkError(f"unknown dtype {name!r} (expected one of {', '.join(CHOICES)})")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name HF config.json and error messages use: `float32`, `bfloat16`, `int8`."""
    return str(dtype).removeprefix("torch.")


def safetensors_dtype(code: str, where: str, name: str) -> torch.dtype:
    """The torch dtype of a safetensors header code; an unknown code is refused naming the tensor."""
    dtype = _SAFETENSORS.get(code)
    if dtype is None:
        raise QwenlinkError(f"{where}: tensor {name!r} has unsupported dtype {code}")
    return dtype


def check_float(where: str, name: str, dtype: torch.dtype) -> None:
    """Refuse a non-floating-point stored tensor for a model weight (every Qwen2 parameter is floating point)."""
    if not dtype.is_floating_point:
        raise QwenlinkError(f"{where}: tensor {name!r} is stored as {dtype_name(dtype)}, but a model weight must be "
                            f"floating point (float32, bfloat16 or float16)")

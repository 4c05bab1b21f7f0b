"""Resolve what a user passes as `--model`: a preset name (random weights) or a model directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.models.presets import get_preset, is_preset
from qwenlink.models.qwen2 import Qwen2Model, build_model


@dataclass
class LoadedModel:
    model: Qwen2Model
    tokenizer_dir: Optional[Path]  # the directory's own tokenizer, if it has one
    source: str


def resolve_config(spec: str) -> ModelConfig:
    """The architecture of a preset or model directory, without loading weights."""
    from qwenlink.checkpoint.hf import is_hf_dir, read_hf_config

    if os.path.isdir(spec):
        if is_hf_dir(spec):
            return read_hf_config(spec)
        from qwenlink.checkpoint.convert import detect_format, open_source

        if detect_format(spec) == "qwenlink":  # (a clear error when the directory is none of HF / qwenlink / Megatron)
            from qwenlink.checkpoint import dcp

            return dcp.read_model_config(dcp.resolve_step_dir(spec))  # its config.json; no weights read
        return open_source(spec).config
    if is_preset(spec):
        return get_preset(spec)
    if os.sep in spec or spec.startswith("."):
        raise QwenlinkError(f"{spec}: model directory not found")
    return get_preset(spec)  # raises with a suggestion


def load_model(spec: str, *, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
               seed: int = 0, shard: Optional[Callable[[Qwen2Model], object]] = None) -> LoadedModel:
    """Load weights from an HF directory, a qwenlink training checkpoint or a Megatron checkpoint (format detected),
    or build a preset with random weights (seeded, for experiments).

    `shard` (tensor parallelism) is applied in place. An HF directory or a qwenlink checkpoint is sharded on the meta
    device and each process then reads only its slices; a Megatron checkpoint or a LoRA run's checkpoint is loaded
    whole and sharded afterwards (a preset keeps exactly the weights one process would draw).
    """
    from qwenlink.checkpoint.hf import is_hf_dir, load_hf_model

    if os.path.isdir(spec) and is_hf_dir(spec):
        model = load_hf_model(spec, device=device, dtype=dtype, shard=shard)
        tok_dir = Path(spec) if any((Path(spec) / f).is_file() for f in ("tokenizer.json", "vocab.json")) else None
        return LoadedModel(model, tok_dir, spec)
    if os.path.isdir(spec):
        from qwenlink.checkpoint.convert import load_any_model

        return LoadedModel(load_any_model(spec, device=device, dtype=dtype, shard=shard), None, spec)
    model = build_model(resolve_config(spec), device=device, dtype=dtype or torch.float32, seed=seed)
    if shard is not None:
        shard(model)
    return LoadedModel(model, None, spec)

"""One loader: what a checkpoint directory is, its architecture, its tensors, and a model built or filled from it.

Every place that takes a model (the trainer's `model.init_from`, `--model` of generate / chat / serve / eval / info,
`qwenlink convert`, a LoRA run's base) asks this module, so a directory's format is detected once, by one set of
rules, with one set of error messages, and every format reaches every caller: an HF directory, a qwenlink checkpoint
(also a LoRA run's, which brings its base), a Megatron checkpoint (legacy or core naming, any TP/PP/VPP, torch or
torch_dist storage), or a preset name (random weights). The per-format readers stay in their own modules (hf.py,
dcp.py, megatron_read.py, megatron_dist_read.py, lora_run.py); names, shapes and dtypes are checked there, where the
tensors are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from qwenlink.checkpoint import dcp, hf, lora_run, megatron
from qwenlink.checkpoint.megatron import Iteration, TensorSource, notice_to_stderr
from qwenlink.checkpoint.megatron_dist_read import open_megatron
from qwenlink.checkpoint.sources import HFSource, ModelSource, load_from_source, model_from_source
from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.models.lora import merge_lora
from qwenlink.models.presets import get_preset, is_preset
from qwenlink.models.qwen2 import Qwen2Model, build_model

FORMATS = ("hf", "qwenlink", "qwenlink-lora", "megatron")
Shard = Callable[[Qwen2Model], object]  # applies tensor parallelism (or another sharding) to a model in place


@dataclass
class LoadedModel:
    model: Qwen2Model
    tokenizer_dir: Optional[Path]  # the directory's own tokenizer, if it has one
    source: str


def _quiet(message: str) -> None:
    """For reads that only look at a checkpoint's architecture: notices about its contents are for loads."""


def detect_format(path: str | os.PathLike) -> str:
    """'hf', 'qwenlink', 'qwenlink-lora' (a LoRA run's checkpoint: adapters + lora.json) or 'megatron'.

    Anything else is one error line: a missing path, a file, an interrupted qwenlink save (naming the step directory
    without its COMPLETE marker), or a directory that is none of the formats.
    """
    p = Path(path)
    if not p.exists():
        raise QwenlinkError(f"{p}: model directory not found (expected an HF directory, a qwenlink checkpoint or a "
                            f"Megatron checkpoint)")
    if not p.is_dir():
        raise QwenlinkError(f"{p}: expected a directory (HF model, qwenlink checkpoint or Megatron checkpoint)")
    if hf.is_hf_dir(p) and not (p / dcp.COMPLETE).exists():
        return "hf"
    if megatron.is_megatron_dir(p):
        return "megatron"
    if dcp.is_qwenlink_checkpoint(p):
        return "qwenlink-lora" if lora_run.is_lora_checkpoint(p) else "qwenlink"
    partial = dcp.interrupted_save(p)
    if partial is not None:
        raise QwenlinkError(f"{partial}: qwenlink checkpoint is incomplete (no COMPLETE marker: its save was "
                            f"interrupted) and {p} holds no complete one")
    raise QwenlinkError(f"{p}: unknown checkpoint format (expected an HF directory with config.json, a qwenlink "
                        f"checkpoint with step_*/COMPLETE, or a Megatron directory with {megatron.TRACKER})")


def read_config(path: str | os.PathLike, *, fmt: Optional[str] = None, iteration: Optional[Iteration] = None,
                reference: Optional[ModelConfig] = None) -> ModelConfig:
    """The architecture of a checkpoint directory, without reading its weights.

    For Megatron, `reference` (an HF config) supplies what Megatron's args do not record exactly (see MegatronSource).
    """
    fmt = fmt or detect_format(path)
    if fmt == "hf":
        return hf.read_hf_config(path)
    if fmt in ("qwenlink", "qwenlink-lora"):
        return dcp.read_model_config(dcp.resolve_step_dir(path))
    if fmt == "megatron":
        return open_megatron(path, iteration=iteration, reference=reference, notice=_quiet).config
    raise QwenlinkError(f"unknown input format {fmt!r} (expected one of {', '.join(FORMATS)})")


def resolve_config(spec: str) -> ModelConfig:
    """The architecture of what a user passes as `--model`: a checkpoint directory or a preset name."""
    if os.path.isdir(spec):
        return read_config(spec)
    if is_preset(spec):
        return get_preset(spec)
    if os.sep in spec or spec.startswith("."):
        raise QwenlinkError(f"{spec}: model directory not found")
    return get_preset(spec)  # raises with a suggestion


def open_source(path: str | os.PathLike, *, fmt: Optional[str] = None, iteration: Optional[Iteration] = None,
                reference: Optional[ModelConfig] = None,
                notice: Callable[[str], None] = notice_to_stderr) -> TensorSource:
    """A tensor source for any checkpoint directory: HF and Megatron files are read tensor by tensor; a qwenlink
    checkpoint (a LoRA run's: its base with the adapters merged) is loaded into a float32 model first."""
    fmt = fmt or detect_format(path)
    if fmt == "hf":
        return HFSource(path)
    if fmt == "megatron":
        return open_megatron(path, iteration=iteration, reference=reference, notice=notice)
    if fmt in ("qwenlink", "qwenlink-lora"):
        return ModelSource(_load_directory(path, fmt, device="cpu", dtype=torch.float32, shard=None))
    raise QwenlinkError(f"unknown input format {fmt!r} (expected one of {', '.join(FORMATS)})")


def load_model(spec: str, *, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
               seed: int = 0, shard: Optional[Shard] = None) -> LoadedModel:
    """A model from a checkpoint directory (format detected) or a preset name (random weights, seeded).

    `dtype` defaults to the checkpoint's own (HF, Megatron) or float32 (qwenlink, presets). `shard` (tensor
    parallelism) is applied in place: an HF directory or a qwenlink checkpoint is sharded on the meta device and each
    process then reads only its slices; a Megatron checkpoint or a LoRA run's checkpoint is loaded whole and sharded
    afterwards (a preset keeps exactly the weights one process would draw).
    """
    if os.path.isdir(spec):
        fmt = detect_format(spec)
        model = _load_directory(spec, fmt, device=device, dtype=dtype, shard=shard)
        has_tokenizer = any((Path(spec) / f).is_file() for f in ("tokenizer.json", "vocab.json"))
        return LoadedModel(model, Path(spec) if fmt == "hf" and has_tokenizer else None, spec)
    model = build_model(resolve_config(spec), device=device, dtype=dtype or torch.float32, seed=seed)
    if shard is not None:
        shard(model)
    return LoadedModel(model, None, spec)


def _load_directory(path: str | os.PathLike, fmt: str, *, device: torch.device | str,
                    dtype: Optional[torch.dtype], shard: Optional[Shard]) -> Qwen2Model:
    if fmt == "hf":
        return hf.load_hf_model(path, device=device, dtype=dtype, shard=shard)
    if fmt == "qwenlink":
        return dcp.load_model_from_checkpoint(path, device=device, dtype=dtype or torch.float32, shard=shard)
    if fmt == "qwenlink-lora":
        step_dir = dcp.resolve_step_dir(path)
        base_path = lora_run.base_model_of(step_dir, path)
        base = _load_directory(base_path, detect_format(base_path), device="cpu", dtype=torch.float32, shard=None)
        model = merge_lora(lora_run.load_lora_checkpoint(step_dir, base=base))
        model = model.to(device=device, dtype=dtype or torch.float32)
    elif fmt == "megatron":
        model = model_from_source(open_megatron(path), device=device, dtype=dtype)
    else:
        raise QwenlinkError(f"unknown input format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if shard is not None:
        shard(model)
    return model


def load_into(model: torch.nn.Module, path: str | os.PathLike, *, fmt: Optional[str] = None,
              notice: Callable[[str], None] = notice_to_stderr) -> None:
    """Copy a checkpoint's weights into an existing model, checking names, shapes and dtypes tensor by tensor.

    The model may have been built on meta and materialised, be DTensor-sharded (tensor parallel, FSDP2: each rank
    reads only its slices of HF and Megatron files; DCP reshards qwenlink checkpoints), or be a pipeline stage with
    modules missing (only the parameters it holds are read). This is what the trainer's `model.init_from` uses.
    A LoRA run's checkpoint is refused: it holds adapters, not the weights of a model.
    """
    fmt = fmt or detect_format(path)
    if fmt == "hf":
        hf.load_hf_weights(model, path)
    elif fmt == "qwenlink":
        dcp.load_checkpoint(dcp.resolve_step_dir(path), model, None)
    elif fmt == "megatron":
        load_from_source(model, open_megatron(path, notice=notice), str(path))
    elif fmt == "qwenlink-lora":
        raise QwenlinkError(f"{path}: is a LoRA run's checkpoint (adapters only, base "
                            f"{lora_run.read_reference(path).get('base_model')}); merge it into its base first with "
                            f"`qwenlink convert --input {path} --to hf --output DIR`")
    else:
        raise QwenlinkError(f"unknown input format {fmt!r} (expected one of {', '.join(FORMATS)})")

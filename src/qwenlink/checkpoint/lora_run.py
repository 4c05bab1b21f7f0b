"""Reading a LoRA run's checkpoint: a qwenlink step directory holding only the trainable tensors plus `lora.json`.

`lora.json` names the base model the adapters were trained on and their shape (r, alpha, targets). The trainer
writes it (train/lora.py); everything that *reads* one lives here, under checkpoint/, so that loading a checkpoint
never needs the training package. Loading the base itself is the loader's job (loader.py): this module takes the
base as an argument, so it does not depend on the module that detects formats.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from qwenlink.checkpoint import dcp
from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.models.lora import LoraConfig, apply_lora
from qwenlink.models.qwen2 import build_model

LORA_FILE = "lora.json"
# What the base must share with the model the adapters were trained on (other fields, e.g. rope_theta, may differ).
_ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "tie_word_embeddings")


def _step_dir(path: str | os.PathLike) -> Optional[Path]:
    try:
        return dcp.resolve_step_dir(path) if dcp.is_qwenlink_checkpoint(path) else None
    except QwenlinkError:
        return None


def is_lora_checkpoint(path: str | os.PathLike) -> bool:
    """A complete qwenlink checkpoint (step or checkpoint directory) written by a LoRA run."""
    step = _step_dir(path)
    return step is not None and (step / LORA_FILE).is_file()


def read_reference(path: str | os.PathLike) -> dict[str, Any]:
    """The contents of lora.json (of a step directory, or of the newest step in a checkpoint directory)."""
    step = _step_dir(path) or Path(path)
    file = step / LORA_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QwenlinkError(f"{file}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise QwenlinkError(f"{file}: expected a JSON object")
    return data


def checkpoint_lora_config(step_dir: str | os.PathLike) -> LoraConfig:
    """The adapters a LoRA checkpoint was trained with (from its lora.json)."""
    ref = read_reference(step_dir)
    try:
        return LoraConfig(r=ref["r"], alpha=ref["alpha"], dropout=float(ref.get("dropout", 0.0)),
                          target_modules=list(ref["target_modules"]),
                          modules_to_save=list(ref["modules_to_save"]), use_rslora=bool(ref.get("use_rslora")))
    except (KeyError, TypeError) as exc:
        raise QwenlinkError(f"{Path(step_dir) / LORA_FILE}: missing or invalid field {exc}") from None


def base_model_of(step_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> str:
    """The base model lora.json names, which must exist (`path`: what the user passed, for the hint)."""
    step_dir = Path(step_dir)
    base = str(read_reference(step_dir).get("base_model") or "")
    if not base or not Path(base).exists():
        raise QwenlinkError(f"{step_dir / LORA_FILE}: base_model {base!r} not found (a relative path is read from "
                            f"the current directory); export the adapters with `qwenlink convert --input "
                            f"{path or step_dir} --to peft --output DIR` and apply them to the base with --lora DIR")
    return base


def load_lora_checkpoint(path: str | os.PathLike, *, base: Optional[nn.Module] = None,
                         lora: Optional[LoraConfig] = None) -> nn.Module:
    """The model of a LoRA checkpoint with its adapters loaded and not merged.

    `base`: the loaded base model (from `base_model_of`), checked against the architecture the adapters were trained
    on, and adapted in place; without it the base weights are left uninitialised (allocated, never touched), which is
    enough to export the adapters.
    """
    step_dir = dcp.resolve_step_dir(path)
    lora = lora or checkpoint_lora_config(step_dir)
    config = dcp.read_model_config(step_dir)
    if base is None:
        model = build_model(config, dtype=torch.float32, init=False)
    else:
        _check_base(step_dir, base.config, config)
        model = base
    apply_lora(model, lora)
    dcp.load_checkpoint(step_dir, model, None, trainable_only=True)
    return model.eval()


def _check_base(step_dir: Path, have: ModelConfig, want: ModelConfig) -> None:
    have_d, want_d = have.to_hf_dict(), want.to_hf_dict()
    base = read_reference(step_dir).get("base_model")
    for key in _ARCHITECTURE:
        if have_d.get(key) != want_d.get(key):
            raise QwenlinkError(f"{step_dir / LORA_FILE}: base_model {base} has {key} = {have_d.get(key)!r} but the "
                                f"checkpoint was trained on {want_d.get(key)!r}")

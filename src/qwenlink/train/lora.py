"""LoRA in the trainer: the `[lora]` job section turned into adapters, base loading, checkpoints and exports.

Kept apart from trainer.py so the loop only asks three questions: is LoRA on (`lora_of`), what to add to the meta
model (`adapter_hook`) and how to load the base underneath the adapters (`load_base_weights`). Checkpoints of
a LoRA run hold only trainable tensors (adapters + modules_to_save) and their optimizer state, plus `lora.json`
naming the base model; resuming reloads the base from there and refuses a different one.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from qwenlink.checkpoint.lora_run import LORA_FILE, is_lora_checkpoint, read_reference
from qwenlink.errors import QwenlinkError
from qwenlink.models.lora import LoraConfig, apply_lora, cast_frozen_, iter_lora_modules


def lora_of(cfg) -> Optional[LoraConfig]:
    """The LoraConfig of a job, or None when `lora.enabled` is false."""
    section = cfg.lora
    if not section.enabled:
        return None
    try:
        return LoraConfig(r=section.r, alpha=section.alpha, dropout=section.dropout,
                          target_modules=list(section.target_modules), modules_to_save=list(section.modules_to_save),
                          use_rslora=section.use_rslora)
    except QwenlinkError as exc:
        raise QwenlinkError(f"config: {exc}") from None


def validate_section(cfg) -> None:
    """Config-time checks of `[lora]` (called from train/config.validate)."""
    lora = lora_of(cfg)
    if lora is None:
        return
    if not cfg.model.init_from:
        raise QwenlinkError("config: lora.enabled needs model.init_from (the base model the adapters train on)")
    if cfg.lora.base_dtype == "bf16" and cfg.train.dtype != "bf16":
        raise QwenlinkError("config: lora.base_dtype = \"bf16\" needs train.dtype = \"bf16\" (the bf16 precision "
                            "policy computes the bf16 base and the fp32 adapters together)")


def adapter_hook(lora: Optional[LoraConfig], base_dtype: str = "fp32") -> Optional[Callable[[nn.Module], object]]:
    """What the trainer applies to the full meta model before it is split and parallelized (None without LoRA):
    adapters on the target projections and a frozen base, stored in `base_dtype` (lora.base_dtype).

    The base is cast here, on the meta device, so every layout stores it that way from the start: FSDP2 then
    shards bf16 base weights next to fp32 adapters (casting after FSDP2 wrapped them would leave its fp32 shards
    behind)."""
    if lora is None:
        return None

    def adapt(model: nn.Module) -> None:
        apply_lora(model, lora)
        if base_dtype == "bf16":
            cast_frozen_(model, torch.bfloat16)

    return adapt


@contextlib.contextmanager
def adapters_detached(model: nn.Module) -> Iterator[nn.Module]:
    """Hide lora_A / lora_B so base-checkpoint loaders (HF, Megatron, qwenlink) see exactly the base's parameters."""
    stash = []
    for _, module in iter_lora_modules(model):
        stash.append((module, module._parameters.pop("lora_A"), module._parameters.pop("lora_B")))
    try:
        yield model
    finally:
        for module, a, b in stash:
            module._parameters["lora_A"] = a
            module._parameters["lora_B"] = b


def load_base_weights(model: nn.Module, source: str, load: Callable[[nn.Module, str], None]) -> None:
    """Load the base into a LoRA model with the trainer's own loader (into the dtype the base is stored in)."""
    if is_lora_checkpoint(source):
        raise QwenlinkError(f"model.init_from: {source} is a LoRA checkpoint (adapters only); use its base model "
                            f"({read_reference(source).get('base_model')}) as init_from, or merge it first with "
                            f"`qwenlink convert --merge-lora`")
    with adapters_detached(model):
        load(model, source)


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def reference_json(cfg, lora: LoraConfig) -> str:
    """lora.json: what a LoRA checkpoint needs besides its tensors to be used or resumed."""
    data: dict[str, Any] = {"base_model": str(cfg.model.init_from), "base_dtype": cfg.lora.base_dtype,
                            "r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "use_rslora": lora.use_rslora,
                            "target_modules": list(lora.targets()), "modules_to_save": list(lora.saved_modules())}
    return json.dumps(data, indent=2) + "\n"


def check_resume(step_dir: Path, cfg, lora: Optional[LoraConfig]) -> None:
    """A LoRA run resumes only from its own kind of checkpoint, on the same base, with the same adapter shape."""
    has_ref = (step_dir / LORA_FILE).is_file()
    if lora is None:
        if has_ref:
            raise QwenlinkError(f"{step_dir}: is a LoRA checkpoint (adapters only) but lora.enabled is false")
        return
    if not has_ref:
        raise QwenlinkError(f"{step_dir}: is a full-model checkpoint but lora.enabled is true (use another "
                            f"checkpoint.dir for the LoRA run)")
    saved = json.loads((step_dir / LORA_FILE).read_text(encoding="utf-8"))
    now = json.loads(reference_json(cfg, lora))
    for key in ("base_model", "r", "target_modules", "modules_to_save"):
        if saved.get(key) != now[key]:
            raise QwenlinkError(f"{step_dir}: checkpoint was trained with {key} = {saved.get(key)!r} but the config "
                                f"has {now[key]!r}; resuming would mix different models")

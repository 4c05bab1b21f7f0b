"""LoRA in the trainer: the `[lora]` job section turned into adapters, base loading, checkpoints and exports.

Kept apart from trainer.py so the loop only asks three questions: is LoRA on (`lora_of`), what to add to the meta
model (`apply_to_meta_model`) and how to load the base underneath the adapters (`load_base_weights`). Checkpoints of
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

from qwenlink.errors import QwenlinkError
from qwenlink.models.lora import LoraConfig, apply_lora, cast_frozen_, iter_lora_modules

LORA_FILE = "lora.json"


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
        raise QwenlinkError("config: lora.base_dtype = \"bf16\" needs train.dtype = \"bf16\" (autocast runs the bf16 "
                            "base and the fp32 adapters together)")


def apply_to_meta_model(model: nn.Module, cfg) -> nn.Module:
    """Add adapters (and freeze the base) before parallelism and materialisation; also a `before_parallel` hook."""
    lora = lora_of(cfg)
    return apply_lora(model, lora) if lora is not None else model


def before_parallel_hook(cfg) -> Optional[Callable[[nn.Module], None]]:
    """The hook for `parallel.build_parallel_model(..., before_parallel=...)` (None without LoRA)."""
    lora = lora_of(cfg)
    if lora is None:
        return None
    return lambda stage: apply_lora(stage, lora)


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


def load_base_weights(model: nn.Module, source: str, load: Callable[[nn.Module, str], None], cfg) -> None:
    """Load the base into a LoRA model with the trainer's own loader, then store frozen weights in base_dtype."""
    if is_lora_checkpoint(source):
        raise QwenlinkError(f"model.init_from: {source} is a LoRA checkpoint (adapters only); use its base model "
                            f"({read_reference(source).get('base_model')}) as init_from, or merge it first with "
                            f"`qwenlink convert --merge-lora`")
    with adapters_detached(model):
        load(model, source)
    if cfg.lora.base_dtype == "bf16":
        cast_frozen_(model, torch.bfloat16)


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def reference_json(cfg, lora: LoraConfig) -> str:
    """lora.json: what a LoRA checkpoint needs besides its tensors to be used or resumed."""
    data: dict[str, Any] = {"base_model": str(cfg.model.init_from), "base_dtype": cfg.lora.base_dtype,
                            "r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "use_rslora": lora.use_rslora,
                            "target_modules": list(lora.targets()), "modules_to_save": list(lora.saved_modules())}
    return json.dumps(data, indent=2) + "\n"


def _step_dir(path: str | Path) -> Optional[Path]:
    from qwenlink.checkpoint import dcp

    try:
        return dcp.resolve_step_dir(path) if dcp.is_qwenlink_checkpoint(path) else None
    except QwenlinkError:
        return None


def is_lora_checkpoint(path: str | Path) -> bool:
    step = _step_dir(path)
    return step is not None and (step / LORA_FILE).is_file()


def read_reference(path: str | Path) -> dict[str, Any]:
    step = _step_dir(path) or Path(path)
    return json.loads((step / LORA_FILE).read_text(encoding="utf-8"))


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


# ---- using a LoRA checkpoint after the run --------------------------------------------------------------------------
_ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "tie_word_embeddings")


def checkpoint_lora_config(step_dir: Path) -> LoraConfig:
    """The adapters a LoRA checkpoint was trained with (from its lora.json)."""
    ref = read_reference(step_dir)
    try:
        return LoraConfig(r=ref["r"], alpha=ref["alpha"], dropout=float(ref.get("dropout", 0.0)),
                          target_modules=list(ref["target_modules"]),
                          modules_to_save=list(ref["modules_to_save"]), use_rslora=bool(ref.get("use_rslora")))
    except (KeyError, TypeError) as exc:
        raise QwenlinkError(f"{step_dir / LORA_FILE}: missing or invalid field {exc}") from None


def load_lora_checkpoint(path: str | Path, *, with_base: bool = True, lora: Optional[LoraConfig] = None) -> nn.Module:
    """The model of a LoRA checkpoint (adapters only on disk), with its adapters loaded and not merged.

    with_base: load the base model lora.json names underneath (for generating, evaluating or merging); without it
    the base weights are left uninitialised (allocated, never touched), enough to export the adapters.
    """
    from qwenlink.checkpoint import dcp
    from qwenlink.models.qwen2 import build_model

    step_dir = dcp.resolve_step_dir(path)
    lora = lora or checkpoint_lora_config(step_dir)
    config = dcp.read_model_config(step_dir)
    if with_base:
        from qwenlink.checkpoint.convert import load_any_model

        base = str(read_reference(step_dir).get("base_model") or "")
        if not base or not Path(base).exists():
            raise QwenlinkError(f"{step_dir / LORA_FILE}: base_model {base!r} not found (a relative path is read from "
                                f"the current directory); export the adapters with `qwenlink convert --input "
                                f"{path} --to peft --output DIR` and apply them to the base with --lora DIR")
        model = load_any_model(base, dtype=torch.float32)
        have, want = model.config.to_hf_dict(), config.to_hf_dict()
        for key in _ARCHITECTURE:
            if have.get(key) != want.get(key):
                raise QwenlinkError(f"{step_dir / LORA_FILE}: base_model {base} has {key} = {have.get(key)!r} but "
                                    f"the checkpoint was trained on {want.get(key)!r}")
    else:
        model = build_model(config, dtype=torch.float32, init=False)
    apply_lora(model, lora)
    dcp.load_checkpoint(step_dir, model, None, trainable_only=True)
    return model.eval()

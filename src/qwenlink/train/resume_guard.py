"""Resume only the run a checkpoint belongs to: refuse settings that changed what the checkpoint's step means.

Why: a resume continues at the checkpoint's data position (consumed samples). The sample order follows from
`job.seed` (shuffling, blending), `data.path`, `data.weights`, `train.global_batch_size` and `data.seq_length`;
change any of them and "continue at sample N" silently trains on another order (repeating or skipping data). A
changed model shape cannot continue at all; naming the setting beats a tensor-shape mismatch. Each step directory
holds the job that wrote it (job.toml), its train_state.json and the architecture (config.json), so nothing extra
is stored; a checkpoint without one of them (older runs) skips that comparison.

`checkpoint.allow_config_change = true` resumes anyway (e.g. the data moved to another directory, or a deliberate
change of mixture mid-run); to start a new run from the weights, use model.init_from with train.finetune = true.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.train.config import JobConfig

# Fields of the architecture that decide the parameters' shapes (and so what a checkpoint's tensors are).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings", "qkv_bias")


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_job(step_dir: Path) -> Optional[dict]:
    from qwenlink.train.config import tomllib

    try:
        data = tomllib.loads((step_dir / "job.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _paths(values: Any) -> list[str]:
    return [os.path.normpath(str(v)) for v in values] if isinstance(values, list) else [str(values)]


def changes(step_dir: Path, cfg: JobConfig, model_config: ModelConfig) -> list[tuple[str, Any, Any]]:
    """(setting, value in the checkpoint, value now) for each guarded setting that differs."""
    found: list[tuple[str, Any, Any]] = []
    state = _read_json(step_dir / "train_state.json") or {}
    for key, now in (("train.global_batch_size", cfg.train.global_batch_size),
                     ("data.seq_length", cfg.data.seq_length)):
        saved = state.get(key.split(".")[1])
        if saved is not None and saved != now:
            found.append((key, saved, now))
    job = _read_job(step_dir)
    if job is not None:
        saved_seed = job.get("job", {}).get("seed")
        if saved_seed is not None and saved_seed != cfg.job.seed:
            found.append(("job.seed", saved_seed, cfg.job.seed))
        data = job.get("data", {})
        if "path" in data and _paths(data["path"]) != _paths(cfg.data.path):
            found.append(("data.path", data["path"], cfg.data.path))
        if "weights" in data and [float(w) for w in data["weights"]] != [float(w) for w in cfg.data.weights]:
            found.append(("data.weights", data["weights"], cfg.data.weights))
    arch = _read_json(step_dir / "config.json")
    if arch is not None:
        saved_model = ModelConfig.from_hf_dict(arch, source=str(step_dir / "config.json"))
        for name in SHAPE_FIELDS:
            if getattr(saved_model, name) != getattr(model_config, name):
                found.append((f"model {name}", getattr(saved_model, name), getattr(model_config, name)))
    return found


def check_unchanged(step_dir: Path, cfg: JobConfig, model_config: ModelConfig) -> None:
    """Refuse a resume whose guarded settings changed, naming each, unless checkpoint.allow_config_change."""
    if cfg.checkpoint.allow_config_change:
        return
    found = changes(step_dir, cfg, model_config)
    if not found:
        return
    listed = "; ".join(f"{key} was {saved!r}, now {now!r}" for key, saved, now in found)
    raise QwenlinkError(f"{step_dir}: the config changed since this checkpoint ({listed}); resuming would not "
                        f"continue the same run (set checkpoint.allow_config_change = true to resume anyway, or use "
                        f"model.init_from with train.finetune = true to start a new run from it)")

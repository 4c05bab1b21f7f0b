"""The [dpo] section's checks (train/config.py runs them with the others): they need neither files nor devices.

A module of its own so that the config can validate the section without importing the objective (train/dpo.py
builds on the training data types, which build on the config)."""

from __future__ import annotations

from qwenlink.errors import QwenlinkError

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")


def validate_section(cfg) -> None:
    """One line per mistake, before anything is loaded."""
    d = cfg.dpo
    if cfg.job.mode != "dpo":
        return
    if d.beta <= 0:
        raise QwenlinkError(f"config: dpo.beta must be positive, got {d.beta}")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise QwenlinkError(f"config: dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
    if d.ftx < 0:
        raise QwenlinkError(f"config: dpo.ftx (the chosen replies' NLL weight) must be >= 0, got {d.ftx}")
    if d.label_smoothing and d.loss_type not in ("sigmoid", "simpo"):
        raise QwenlinkError(f"config: dpo.label_smoothing applies to loss_type sigmoid or simpo, not "
                            f"{d.loss_type!r}")
    if d.precompute_reference and d.loss_type == "simpo":
        raise QwenlinkError("config: dpo.precompute_reference: simpo uses no reference model")
    if cfg.data.pack:
        raise QwenlinkError("config: data.pack is not supported for job.mode = \"dpo\" (each pair is padded)")
    if cfg.data.valid_path:
        raise QwenlinkError("config: data.valid_path is not supported for job.mode = \"dpo\" yet")

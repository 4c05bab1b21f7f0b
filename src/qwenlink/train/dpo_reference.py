"""dpo.precompute_reference: the reference model's log-probabilities of every pair, computed once and stored next to
the data, so training holds no second model and runs no second forward per step.

The file is `PREFIX_dpo_reference_KEY.npy` ([pairs, 2] float32: chosen, rejected) beside the pairwise dataset. KEY
hashes what decides the values - the initial weights (path and the size / modification time of its files), the model
architecture, seq_length, the compute dtype, LoRA's base dtype and the data files - so a run with another reference
computes its own file instead of reading a stale one. The pass is the trainer's own forward (every layout; a
pipeline runs its schedule forward only) over the policy before its first update: for LoRA the adapters are off (the
base, which stays the reference all run long), for full fine-tuning the initial weights themselves, which is why a
full fine-tuning run that resumes without the file is refused rather than computed from trained weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from qwenlink.errors import QwenlinkError
from qwenlink.fileio import atomic_path


def _stat(path: Path) -> list:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()]


def reference_path(cfg, model_config, prefix: str) -> Path:
    """Where this run's precomputed reference log-probabilities live (see the module docstring for KEY)."""
    from qwenlink.data.pairwise import PAIR_KEYS

    init = Path(cfg.model.init_from).resolve() if cfg.model.init_from else None
    identity = {
        "init_from": str(init) if init else f"random init, seed {cfg.job.seed}",
        "init_files": _stat(init) if init and init.exists() else [],
        "arch": {k: v for k, v in dataclasses.asdict(model_config).items() if k != "extra"},
        "seq_length": cfg.data.seq_length, "dtype": cfg.train.dtype,
        "lora_base_dtype": cfg.lora.base_dtype if cfg.lora.enabled else None,
        "data": [_stat(Path(f"{prefix}_packed_{k}_document.bin")) for k in PAIR_KEYS],
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(f"{prefix}_dpo_reference_{key}.npy")


def load_reference(path: Path, pairs: int) -> np.ndarray:
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise QwenlinkError(f"{path}: not a readable reference log-probability file ({exc}); delete it to "
                            f"recompute") from None
    if values.shape != (pairs, 2) or not np.isfinite(values).all():
        raise QwenlinkError(f"{path}: expected {pairs} finite (chosen, rejected) pairs, got shape {values.shape}; "
                            f"delete it to recompute")
    return values


@torch.no_grad()
def compute_reference(step, objective, dataset, *, micro_batch_size: int, micro_batches: int, collate: Callable,
                      log: Callable[[str], None]) -> np.ndarray:
    """[pairs, 2] reference log-probabilities, every data-parallel replica computing its strided share with the
    policy's forward as it is before any update (collective: every rank calls it and gets the whole array)."""
    from qwenlink.train.step import all_reduce_sum

    layout, plan = step.layout, step.plan
    n = len(dataset)
    mine = list(range(layout.dp_rank, n, plan.dp))
    per_call = micro_batch_size * micro_batches  # one call = the training step's micro batch count (pp schedule)
    calls = math.ceil(math.ceil(n / plan.dp) / per_call)
    mine += [mine[0] if mine else 0] * (calls * per_call - len(mine))  # padding rows: computed, never written
    real = len(range(layout.dp_rank, n, plan.dp))
    # One writer per replica (tp and cp rank 0 of the first pipeline stage: every rank has the values), so the sum
    # over the world counts each pair once, exactly.
    writer = layout.tp_rank == 0 and layout.pp_rank == 0 and layout.cp_rank == 0
    out = torch.zeros(n, 2, dtype=torch.float32, device=step.device)                  # [pairs, 2]
    for c in range(calls):
        group = mine[c * per_call:(c + 1) * per_call]
        batches = [collate([dataset[i] for i in group[k:k + micro_batch_size]])
                   for k in range(0, per_call, micro_batch_size)]
        for k, logps in enumerate(objective.reference_logps(step, batches, policy=True)):
            start = c * per_call + k * micro_batch_size
            keep = [j for j in range(micro_batch_size) if start + j < real]
            if not keep or not writer:
                continue
            idx = torch.tensor([mine[start + j] for j in keep], dtype=torch.long)
            b = logps.shape[0] // 2
            pick = torch.tensor(keep, dtype=torch.long).to(step.device, non_blocking=True)
            values = torch.stack([logps[:b].index_select(0, pick), logps[b:].index_select(0, pick)], dim=1)
            out.index_copy_(0, idx.to(step.device, non_blocking=True), values)
        if (c + 1) % max(calls // 10, 1) == 0 or c + 1 == calls:
            log(f"dpo: reference log-probabilities {min((c + 1) * per_call * plan.dp, n):,}/{n:,} pairs")
    return all_reduce_sum(out).cpu().numpy()


def precomputed_reference(cfg, model_config, step, objective, dataset, *, micro_batches: int, resumed: bool,
                          lora: Optional[object], rank: int, log: Callable[[str], None]) -> np.ndarray:
    """Read this run's reference file, or compute and write it (rank 0 writes, atomically)."""
    from qwenlink.train import distributed as distrib
    from qwenlink.train.data import collate

    path = reference_path(cfg, model_config, dataset.prefix)
    if path.is_file():
        log(f"dpo: reference log-probabilities from {path}")
        return load_reference(path, len(dataset))
    if resumed and lora is None:
        raise QwenlinkError(f"dpo.precompute_reference: {path} is missing and this full fine-tuning run resumes "
                            f"from trained weights, which are no longer the reference; restore the file or start "
                            f"the run again")
    values = compute_reference(step, objective, dataset, micro_batch_size=cfg.train.micro_batch_size,
                               micro_batches=micro_batches, collate=lambda s: collate(s, cfg), log=log)
    if not np.isfinite(values).all():
        raise QwenlinkError("dpo.precompute_reference: the reference model gave non-finite log-probabilities")
    if rank == 0:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, values, allow_pickle=False)
            os.chmod(tmp, 0o644)
        log(f"dpo: wrote {path}")
    distrib.barrier()  # no rank trains (or could fail) before the file is complete
    return values

"""Measure one rank of a job for real: the trainer's own step on real CPU tensors under the plan's memory tracker.

Usage: [torchrun --nproc-per-node N] plan_accuracy_worker.py JOB_TOML OUT_DIR
Each rank builds its parts as the Trainer does (`build_step_parts`), runs two optimizer steps of the job's
micro-batch count on synthetic batches, and writes `rank{R}.json` with the tracker's peak over the second step
(the first also creates the optimizer state) - the number `qwenlink plan` predicts for that rank's role.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from qwenlink.train import lora as lora_train
from qwenlink.train.config import accumulation_steps, load_config, parallel_plan
from qwenlink.train.memory import MemoryTracker
from qwenlink.train.plan_sim import group_names
from qwenlink.train.simulate import synthetic_batches
from qwenlink.train.trainer import build_step_parts, resolve_model_config, run_step


def main(job: Path, out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    cfg = load_config(job)
    model_config = resolve_model_config(cfg)
    plan = parallel_plan(cfg, world, model_config)
    total = accumulation_steps(cfg, plan.dp)
    parts = build_step_parts(cfg, model_config, plan, torch.device("cpu"), lora=lora_train.lora_of(cfg),
                             load_weights=False)
    # Token ids within the first tensor-parallel vocabulary shard: under a TorchDispatchMode, DTensor's sharding
    # propagation of a vocabulary-sharded embedding on real tensors looks the global ids up in the local shard
    # ("index out of range"); fake tensors never check. The ids' values change no tensor's size.
    batches = synthetic_batches(cfg, model_config.vocab_size // plan.tp, total, seed=rank)
    tracker = MemoryTracker("cpu", group_names(parts.layout))
    tracker.mark(parts.chunks.modules, parts.optimizer)
    with tracker:
        run_step(parts, batches, 1, clip_grad=cfg.optim.clip_grad)
        tracker.reset_peak()
        run_step(parts, batches, 2, clip_grad=cfg.optim.clip_grad)
    report = tracker.report()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "pp_rank": parts.layout.pp_rank, "peak_bytes": report.peak_bytes,
        "by_category": report.by_category}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

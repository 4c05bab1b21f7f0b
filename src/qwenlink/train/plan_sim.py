"""The plan's simulation of one rank role, in its own process (qwenlink.train.plan runs it by name).

Kept apart from plan.py because it builds the rank with the trainer's own functions, and the trainer calls the
plan's fit check: plan.py stays below trainer.py, this module above it.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from qwenlink.parallel.mesh import ParallelPlan
from qwenlink.train.config import accumulation_steps, load_config, parallel_plan
from qwenlink.train.memory import MemoryTracker
from qwenlink.train.plan_attention import FlashAttention


def group_names(layout: Any) -> dict[str, str]:
    """Process group name -> the mesh dimension it belongs to (the world group as `world`)."""
    import torch.distributed as dist

    world = dist.group.WORLD  # None in one process: its one-rank group is not the default one
    names = {world.group_name: "world"} if world is not None else {}
    if layout.mesh is not None:
        for dim in layout.mesh.mesh_dim_names:
            names[layout.mesh.get_group(dim).group_name] = dim
        if getattr(layout, "cp_mesh", None) is not None:  # FSDP2's group under context parallelism (flattened)
            names[layout.dp_mesh.get_group(layout.dp_mesh.ndim - 1).group_name] = "dp_shard_cp"
    if layout.tied_group is not None:
        names[layout.tied_group.group_name] = "pp-tied-embedding"
    return names


def _in_flight(schedule: Any, pp_rank: int) -> Optional[dict[int, int]]:
    """Per stage of this pipeline rank: the most micro batches whose activations are held at once (forwards not yet
    through their weight or full backward), read from the schedule's own action list; None when the schedule
    exposes none."""
    order = getattr(schedule, "pipeline_order", None)
    if not order or pp_rank not in order:
        return None
    held: dict[int, int] = {}
    most: dict[int, int] = {}
    for action in order[pp_rank]:
        if action is None:
            continue
        kind = str(getattr(action.computation_type, "value", action.computation_type))
        stage = action.stage_index
        if kind == "F":
            held[stage] = held.get(stage, 0) + 1
            most[stage] = max(most.get(stage, 0), held[stage])
        elif kind in ("B", "W"):
            held[stage] = held.get(stage, 0) - 1
    return most


def micro_batch_counts(parts: Any, plan: ParallelPlan, total: int) -> tuple[int, int]:
    """(step 1's, step 2's) micro batches: fewer than `total` where that reaches the same peak (module docstring)."""
    if plan.pp == 1:
        return (min(total, 2), min(total, 3))
    from qwenlink.parallel.pipeline import build_schedule

    stages = list(zip(parts.chunks.stage_ids, parts.chunks.modules))

    def flight(n: int) -> Optional[dict[int, int]]:
        schedule = build_schedule(plan, stages, device=parts.layout.device, pp_group=parts.layout.pp_group,
                                  n_microbatches=n, loss_fn=lambda *a: None)
        return _in_flight(schedule, parts.layout.pp_rank)

    step = plan.pp if plan.vpp > 1 else 1
    first = plan.pp if plan.schedule != "gpipe" else 1
    candidates = list(range(first, total + 1, step))
    if not candidates or candidates[-1] != total:
        return (total, total)
    target = flight(total)
    if target is None:
        return (total, total)
    index = next(i for i, n in enumerate(candidates) if flight(n) == target)
    index = max(index, 1) if len(candidates) > 1 else 0
    return (candidates[index - 1] if index else candidates[0], candidates[index])


@contextlib.contextmanager
def values_skipped() -> Iterator[None]:
    """Inside a simulation: no weight initialisation. `init_weights` draws every parameter's values (minutes of
    host work at 72B, even on fake tensors) and allocates nothing that outlives it; values do not change memory."""
    import qwenlink.train.trainer as trainer

    original = trainer.init_weights
    trainer.init_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        trainer.init_weights = original


def simulate_role(job_toml: str, world_size: int, rank: int, device_type: str) -> dict[str, Any]:
    """In the simulation's process: build `rank` as the Trainer does, run two steps under the tracker, report."""
    from contextlib import nullcontext

    from qwenlink.parallel.simulate import pipeline_handshake, simulated_rank
    from qwenlink.train import lora as lora_train
    from qwenlink.train.simulate import stage_inputs, synthetic_batches
    from qwenlink.train.step import pad_to_length
    from qwenlink.train.trainer import build_step_parts, resolve_model_config, run_step

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.toml"
        path.write_text(job_toml)
        cfg = load_config(path)
    model_config = resolve_model_config(cfg)
    plan = parallel_plan(cfg, world_size, model_config)
    total = accumulation_steps(cfg, plan.dp)
    lora = lora_train.lora_of(cfg)
    with values_skipped(), simulated_rank(world_size, rank, device_type=device_type) as sim:
        parts = build_step_parts(cfg, model_config, plan, sim.device, lora=lora, load_weights=False)
        counts = micro_batch_counts(parts, plan, total)
        batches = synthetic_batches(cfg, model_config.vocab_size, max(counts), seed=rank)
        handshake: Any = nullcontext()
        if plan.pp > 1:  # what the other pipeline ranks' stages would send: computed before tracking
            padded = pad_to_length(batches[:1], cfg.data.seq_length, cfg.data.pad_id)[0]
            micro = parts.step_fn.context_shard(padded).input_ids  # this cp rank's tokens, as the step sends them
            inputs = stage_inputs(cfg, model_config, parts.layout, lora, sim.device, micro,
                                  [s for s in parts.chunks.stage_ids if s > 0])
            handshake = pipeline_handshake(lambda stage: inputs[stage])
        gc.collect()
        tracker = MemoryTracker(sim.device.type, group_names(parts.layout))
        objective = parts.step_fn.objective  # dpo: a frozen reference copy is parameters too
        reference = list(objective.reference_chunks.modules) if getattr(objective, "reference_chunks", None) else []
        tracker.mark(list(parts.chunks.modules) + reference, parts.optimizer)
        with handshake, FlashAttention(sim.device.type), tracker:
            run_step(parts, batches[:counts[0]], 1, clip_grad=cfg.optim.clip_grad)
            first_comm = dict(tracker.comm_bytes)
            before = tracker.current
            parts.step_fn._schedules.clear()  # the job keeps one schedule; its receive buffers are per micro batch
            gc.collect()
            buffers = (before - tracker.current) // counts[0] if plan.pp > 1 else 0
            tracker.reset_peak()
            run_step(parts, batches[:counts[1]], 2, clip_grad=cfg.optim.clip_grad)
        report = tracker.report()
    second_comm = {k: v - first_comm.get(k, 0) for k, v in tracker.comm_bytes.items()}
    comm = {}
    for dim in set(first_comm) | set(second_comm):
        per_micro = ((second_comm.get(dim, 0) - first_comm.get(dim, 0)) / (counts[1] - counts[0])
                     if counts[1] > counts[0] else 0.0)
        comm[dim] = int(second_comm.get(dim, 0) + max(per_micro, 0.0) * (total - counts[1]))
    return {"rank": rank, "pp_rank": parts.layout.pp_rank, "stages": list(parts.chunks.stage_ids),
            "report": report.to_dict(), "counts": list(counts), "buffer_bytes_per_micro": int(buffers),
            "peak_bytes": int(report.peak_bytes + buffers * (total - counts[1])), "comm": comm}

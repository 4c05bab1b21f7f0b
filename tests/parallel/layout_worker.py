"""Run 5 optimizer steps of a tiny model under one parallel layout (launched by torchrun); write losses + weights.

Usage: torchrun --nproc-per-node N layout_worker.py OUT_DIR JSON_SPEC
The spec gives the layout (tp, pp, vpp, dp_shard, dp_replicate, schedule), the model (tied or not) and the seed;
the data and initial weights are derived from the seed exactly as the single-process reference derives them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_reference import STEPS, make_batches, make_config, make_initial_state, optimizer_for  # noqa: E402

from qwenlink.parallel.mesh import ParallelPlan  # noqa: E402
from qwenlink.parallel.parallelize import build_parallel_model  # noqa: E402


def train_steps(pm, plan: ParallelPlan, spec: dict, optimizer) -> list[float]:
    """The reference's optimizer steps under the layout: each dp replica takes its slice of every global batch.
    Returns the global loss per step (the same on every rank)."""
    micro = spec["micro_batch"]
    losses = []
    for ids, labels in make_batches(spec):
        valid = int((labels != -100).sum())
        per_dp = ids.shape[0] // plan.dp
        mine = slice(pm.dp_rank * per_dp, (pm.dp_rank + 1) * per_dp)
        optimizer.zero_grad(set_to_none=True)
        micro_batches = [(i, l, None, None) for i, l in zip(ids[mine].split(micro), labels[mine].split(micro))]
        loss = pm.forward_backward(micro_batches, scale=plan.dp / valid)
        total = loss.clone()
        dist.all_reduce(total)  # over every rank: each dp replica's share, counted tp x pp times
        losses.append(float(total) / (plan.tp * plan.pp))
        pm.clip_grad_norm_(1.0)
        optimizer.step()
    return losses


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = make_config(spec)
    plan = ParallelPlan(**spec["layout"])
    pm = build_parallel_model(config, plan, torch.device("cpu"), seed=spec["seed"])
    pm.load_full_state_dict(make_initial_state(spec))
    optimizer = optimizer_for(pm.parameters())
    losses = train_steps(pm, plan, spec, optimizer)
    state = pm.full_state_dict()
    if list(pm.mesh.get_coordinate())[1:] == [0, 0, 0]:  # one rank per pipeline stage group writes its stages
        torch.save({"losses": losses, "state": state}, out / f"pp{pm.pp_rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

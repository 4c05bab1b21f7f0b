"""Train context_reference's steps under several layouts in one torchrun launch; write each one's losses + weights.

Usage: torchrun --nproc-per-node N context_layout_worker.py OUT_DIR JSON_RUNS
JSON_RUNS maps a run name to its spec (layout, documents, activation checkpointing, ...). All runs share the world
size and run one after the other in the same process group, so a handful of 4-process layouts cost one launch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from context_reference import initial_state, make_batches  # noqa: E402
from layout_worker import load_full_state_dict  # noqa: E402
from lora_reference import lora_config  # noqa: E402
from parallel_reference import make_config, optimizer_for  # noqa: E402

from qwenlink.models.lora import apply_lora  # noqa: E402
from qwenlink.parallel.mesh import ParallelPlan  # noqa: E402
from qwenlink.parallel.parallelize import (ParallelizeOptions, build_layout, build_model_chunks,  # noqa: E402
                                           full_state_dict)
from qwenlink.train.step import TrainStep  # noqa: E402


def run(out: Path, spec: dict) -> None:
    config = make_config(spec)
    plan = ParallelPlan(**spec["layout"])
    layout = build_layout(plan, torch.device("cpu"), config)
    options = ParallelizeOptions(activation_checkpoint="full" if spec.get("ac") else "none")
    adapt = (lambda model: apply_lora(model, lora_config(spec))) if spec.get("lora") else None
    chunks = build_model_chunks(config, layout, options, adapt=adapt)
    chunks.materialize(torch.device("cpu"))
    load_full_state_dict(chunks, initial_state(spec))
    step = TrainStep(chunks, layout, chunk_size=1024, seq_length=spec["seq"], pad_id=0)
    optimizer = optimizer_for([p for p in chunks.parameters() if p.requires_grad])
    losses = []
    for batches in make_batches(spec):
        per_dp = len(batches) // plan.dp  # the trainer's sampler: each dp replica its slice, cp ranks the same one
        mine = batches[layout.dp_rank * per_dp:(layout.dp_rank + 1) * per_dp]
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(step.forward_backward(mine, step.count_valid(mine))))
        step.clip_grad_norm_(1.0)
        optimizer.step()
    state = full_state_dict(chunks)
    if layout.tp_rank == 0 and layout.dp_rank == 0 and layout.cp_rank == 0:  # one writer per pipeline rank
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"losses": losses, "state": state}, out / f"pp{layout.pp_rank}.pt")
    dist.barrier()


def main() -> None:
    out, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for name, spec in runs.items():
        run(out / name, spec)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

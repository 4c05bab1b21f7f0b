"""Train expert_reference's steps under several expert-parallel (and pipeline) layouts in one torchrun launch; write
each one's (LM loss, aux loss, expert load, gradient norm) per step and full final weights (all pipeline stages).

Usage: torchrun --nproc-per-node N expert_layout_worker.py OUT_DIR JSON_RUNS
JSON_RUNS maps a run name to its spec (layout, activation checkpointing, seed, batch). All runs share the world size
and run one after the other in the same process group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expert_reference import adapt, make_moe_config, make_moe_initial_state, train_moe  # noqa: E402
from layout_worker import load_full_state_dict  # noqa: E402

from qwenlink.models.qwen2_moe import set_expert_impl  # noqa: E402
from qwenlink.parallel.mesh import ParallelPlan, validate_plan  # noqa: E402
from qwenlink.parallel.parallelize import (ParallelizeOptions, build_layout, build_model_chunks,  # noqa: E402
                                           full_state_dict)
from qwenlink.train.moe import RouterAuxLoss  # noqa: E402
from qwenlink.train.step import TrainStep  # noqa: E402


def run(out: Path, spec: dict) -> None:
    set_expert_impl(spec.get("impl", "auto"))  # "loop": the experts' host-count path instead of the grouped GEMM
    config = make_moe_config(spec)
    plan = ParallelPlan(**spec["layout"])
    validate_plan(plan, config)
    layout = build_layout(plan, torch.device("cpu"), config)
    options = ParallelizeOptions(activation_checkpoint="full" if spec.get("ac") else "none")
    chunks = build_model_chunks(config, layout, options, adapt=adapt(spec))  # LoRA, as the trainer adds it
    chunks.materialize(torch.device("cpu"))
    load_full_state_dict(chunks, make_moe_initial_state(spec))
    step = TrainStep(chunks, layout, chunk_size=1024, seq_length=spec["seq"], pad_id=0)
    step.router_aux = RouterAuxLoss.for_model(chunks.state_module, config, plan.tp)
    losses = train_moe(step, chunks, layout, spec)
    state = full_state_dict(chunks)  # this rank's stages' weights, gathered over its dp / ep / tp ranks
    if plan.pp > 1:  # every pipeline rank's stages, into one state
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, state)
        state = {k: v for part in parts for k, v in part.items()}
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"losses": losses, "state": state}, out / "result.pt")
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

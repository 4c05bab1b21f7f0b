"""Run the LoRA steps of lora_reference under one parallel layout (launched by torchrun); write losses + weights.

Usage: torchrun --nproc-per-node N lora_layout_worker.py OUT_DIR JSON_SPEC
Adapters are added by `before_parallel` on each meta stage, exactly as the trainer does, so tensor parallelism sees
LoraLinear modules and places A / B by its LoRA-aware styles.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_reference import lora_config, make_lora_initial_state  # noqa: E402
from layout_worker import build, load_full_state_dict, train_steps  # noqa: E402
from parallel_reference import make_config, optimizer_for  # noqa: E402

from qwenlink.models.lora import apply_lora  # noqa: E402
from qwenlink.parallel.mesh import ParallelPlan  # noqa: E402
from qwenlink.parallel.parallelize import full_state_dict  # noqa: E402


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    config, cfg = make_config(spec), lora_config(spec)
    plan = ParallelPlan(**spec["layout"])
    chunks, step = build(config, plan, spec, adapt=lambda model: apply_lora(model, cfg))
    load_full_state_dict(chunks, make_lora_initial_state(spec))
    trainable = [p for p in chunks.parameters() if p.requires_grad]
    optimizer = optimizer_for(trainable)
    losses = train_steps(step, spec, optimizer)
    state = full_state_dict(chunks)
    n_state = sum(len(s) for s in optimizer.state.values())
    if list(step.layout.mesh.get_coordinate())[1:] == [0, 0, 0]:
        torch.save({"losses": losses, "state": state, "optimizer_states": len(optimizer.state),
                    "trainable": len(trainable), "n_state": n_state}, out / f"pp{step.layout.pp_rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

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

from qwenlink.models.config import ModelConfig  # noqa: E402
from qwenlink.parallel.mesh import ParallelPlan  # noqa: E402
from qwenlink.parallel.parallelize import (ModelChunks, ParallelizeOptions, build_layout,  # noqa: E402
                                           build_model_chunks, full_state_dict)
from qwenlink.train.data import MicroBatch  # noqa: E402
from qwenlink.train.step import TrainStep  # noqa: E402


def build(config: ModelConfig, plan: ParallelPlan, spec: dict, adapt=None) -> tuple[ModelChunks, TrainStep]:
    """The trainer's own path: layout -> meta chunks, parallelized -> materialised -> TrainStep."""
    bf16 = spec.get("dtype") == "bf16"  # the trainer's mixed-precision policy: FSDP2's, on every layout
    layout = build_layout(plan, torch.device("cpu"), config, mixed_precision=bf16)
    chunks = build_model_chunks(config, layout, ParallelizeOptions(param_dtype=torch.bfloat16 if bf16 else None),
                                adapt=adapt)
    chunks.materialize(torch.device("cpu"))
    return chunks, TrainStep(chunks, layout, chunk_size=1024, seq_length=spec["seq"], pad_id=0)


def load_full_state_dict(chunks: ModelChunks, state: dict[str, torch.Tensor]) -> None:
    """Distribute full tensors, keyed like Qwen2Model.state_dict(), into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    for module in chunks.modules:
        own = module.state_dict().keys()
        subset = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(subset))
        if missing:
            raise KeyError(f"state dict lacks {missing[0]}")
        set_model_state_dict(module, subset, options=StateDictOptions(full_state_dict=True, strict=True))
        module.tie_weights()


def train_steps(step: TrainStep, spec: dict, optimizer) -> list[float]:
    """The reference's optimizer steps under the layout: each dp replica takes its slice of every global batch.
    Returns the global loss per step (the same on every rank)."""
    micro, plan = spec["micro_batch"], step.plan
    losses = []
    for ids, labels in make_batches(spec):
        per_dp = ids.shape[0] // plan.dp
        dp_rank = step.layout.dp_rank
        mine = slice(dp_rank * per_dp, (dp_rank + 1) * per_dp)
        optimizer.zero_grad(set_to_none=True)
        micro_batches = [MicroBatch(i, l) for i, l in zip(ids[mine].split(micro), labels[mine].split(micro))]
        loss = step.forward_backward(micro_batches, step.count_valid(micro_batches))
        losses.append(float(loss))
        step.clip_grad_norm_(1.0)
        optimizer.step()
    return losses


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = make_config(spec)
    plan = ParallelPlan(**spec["layout"])
    chunks, step = build(config, plan, spec)
    load_full_state_dict(chunks, make_initial_state(spec))
    optimizer = optimizer_for(chunks.parameters())
    losses = train_steps(step, spec, optimizer)
    for schedule in step._schedules.values():  # the last stage keeps no logits once the step is done
        stages = getattr(schedule, "_stages", None) or [schedule._stage]
        assert all(not stage.output_chunks for stage in stages), "pipeline stage kept its micro batches' outputs"
    state = full_state_dict(chunks)
    if list(step.layout.mesh.get_coordinate())[1:] == [0, 0, 0]:  # one rank per pipeline stage group writes
        torch.save({"losses": losses, "state": state}, out / f"pp{step.layout.pp_rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

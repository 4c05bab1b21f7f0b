"""The trainer's own steps for one rank of a layout, on fake devices in one process (no accelerator needed).

    simulate_training(cfg, world_size=8, ranks=[0, 5])   # one summary per rank; raises on the first problem

Each rank is built exactly as `Trainer` builds it (`build_step_parts`: mesh -> meta model -> TP/SP -> AC -> compile
-> FSDP2 -> materialise -> layout-independent init; no checkpoint is read) and runs `run_step` (count_valid ->
forward_backward -> clip_grad_norm_ -> the update, skipped on the device when not finite) twice on synthetic micro
batches of the job's shape, under `qwenlink.parallel.simulate.simulated_rank`: fake `cuda` tensors, torch's fake
process group, every collective's tensors checked to be on the device, and any host synchronisation an error.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.models.qwen2_moe import record_routing
from qwenlink.parallel.mesh import stages_of_rank
from qwenlink.parallel.parallelize import Layout, parallelize
from qwenlink.parallel.pipeline import MicroBatchInputs, split_stages
from qwenlink.parallel.simulate import pipeline_handshake, run_simulation, simulated_rank
from qwenlink.train import lora as lora_train
from qwenlink.train.config import JobConfig, accumulation_steps, load_config, parallel_plan
from qwenlink.train.data import MicroBatch
from qwenlink.train.loss import IGNORE_INDEX
from qwenlink.train.moe import RoutingCarry, sparse_layers
from qwenlink.train.step import pad_to_length
from qwenlink.train.trainer import (build_step_parts, parallelize_options, resolve_model_config,
                                    resolve_pad_id, run_step)

STEPS = 2  # the first step also creates the optimizer state (and a pipeline's buffers); the second is steady


def simulate_training(cfg: JobConfig, world_size: int, ranks: Sequence[int], *, device_type: str = "cuda",
                      timeout: float = 600.0) -> list[dict[str, Any]]:
    """Simulate each of `ranks` of `world_size` in a fresh process of its own (qwenlink.parallel.simulate.
    run_simulation: one world per process)."""
    return [run_simulation("qwenlink.train.simulate:simulate_rank", cfg.to_toml(), world_size, rank, device_type,
                           timeout=timeout) for rank in ranks]


def simulate_rank(job_toml: str, world_size: int, rank: int, device_type: str = "cuda") -> dict[str, Any]:
    """In the simulation's process: the job from its TOML, then `simulate_step`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.toml"
        path.write_text(job_toml)
        cfg = load_config(path)
    return simulate_step(cfg, world_size, rank, device_type=device_type)


def synthetic_batches(cfg: JobConfig, vocab_size: int, count: int, seed: int) -> list[MicroBatch]:
    """`count` micro batches of the job's shape as the loader hands them over (CPU tensors); every fourth label is
    masked, as SFT prompts are."""
    g = torch.Generator().manual_seed(seed)
    pairs = cfg.job.mode == "dpo"  # B pairs are [2B, T] (chosen rows, then rejected), reference log-probs given
    shape = (cfg.train.micro_batch_size * (2 if pairs else 1), cfg.data.seq_length)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab_size, shape, generator=g)
        labels = ids.roll(-1, dims=1)
        labels[:, ::4] = IGNORE_INDEX
        if pairs:
            from qwenlink.train.data import PairMicroBatch

            out.append(PairMicroBatch(ids, labels, reference=torch.zeros(shape[0])))
        else:
            out.append(MicroBatch(ids, labels))
    return out


def stage_inputs(cfg: JobConfig, model_config: ModelConfig, layout: Layout, lora: Optional[Any],
                 device: torch.device, micro_ids: torch.Tensor,
                 stage_indices: Sequence[int]) -> dict[int, tuple[torch.Tensor, ...]]:
    """The tensors each pipeline stage in `stage_indices` receives for a micro batch: the stages before them built as
    the ranks that hold them build theirs (this rank's tp / dp meshes have the same shapes as theirs) and run on fake
    tensors, with gradients on as in torch's own first-step inference. One pass through the stages serves every
    index (an interleaved rank's later stages would otherwise run the earlier ones again for each)."""
    plan = layout.plan
    with torch.device("meta"):
        full = Qwen2Model(model_config)
    hook = lora_train.adapter_hook(lora, cfg.lora.base_dtype)
    if hook is not None:
        hook(full)
    # a mixture of experts' stages also send their routing totals on (train/moe.py RoutingCarry)
    carry = RoutingCarry(sparse_layers(model_config), model_config.num_experts, MicroBatchInputs()) \
        if model_config.is_moe else None
    x: tuple = (micro_ids.to(device, non_blocking=True),)
    wanted = set(stage_indices)
    inputs: dict[int, tuple[torch.Tensor, ...]] = {}
    for stage in range(max(wanted, default=0)):
        owner = next(p for p in range(plan.pp) if stage in stages_of_rank(plan, p))
        module = dict(split_stages(full, plan, owner))[stage]
        parallelize(module, layout, parallelize_options(cfg, lora))
        module.to_empty(device=device)
        module.tie_weights()
        if carry is not None:
            record_routing(module)
            carry.attach(module)
        with torch.enable_grad():
            out = module(*x)
        x = out if isinstance(out, tuple) else (out,)
        if stage + 1 in wanted:
            inputs[stage + 1] = x
    if 0 in wanted:
        inputs[0] = (micro_ids.to(device, non_blocking=True),)
    return inputs


def simulate_step(cfg: JobConfig, world_size: int, rank: int, *, device_type: str = "cuda") -> dict[str, Any]:
    """Build `rank`'s model and step as the Trainer does and run STEPS optimizer steps on fake device tensors;
    returns what was checked (devices, dtypes, collectives seen)."""
    model_config = resolve_model_config(cfg)
    cfg = resolve_pad_id(cfg, model_config)
    if cfg.parallel.compile is None:  # compilation is not simulated: fake tensors show the eager step
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, compile=False))
    plan = parallel_plan(cfg, world_size, model_config)
    batches = synthetic_batches(cfg, model_config.vocab_size, accumulation_steps(cfg, plan.dp), seed=rank)
    lora = lora_train.lora_of(cfg)
    with simulated_rank(world_size, rank, device_type=device_type) as sim:
        parts = build_step_parts(cfg, model_config, plan, sim.device, lora=lora, load_weights=False)
        handshake = nullcontext()
        if plan.pp > 1:  # what the other pipeline ranks' stages would send: computed here, before the steps
            micro = pad_to_length(batches[:1], cfg.data.seq_length, cfg.data.pad_id)[0].input_ids
            inputs = stage_inputs(cfg, model_config, parts.layout, lora, sim.device, micro,
                                  [s for s in parts.chunks.stage_ids if s > 0])
            handshake = pipeline_handshake(lambda stage: inputs[stage])
        sim.record.collectives.clear()
        with handshake:
            results = [run_step(parts, batches, step, clip_grad=cfg.optim.clip_grad) for step in range(1, STEPS + 1)]
        local = [p.to_local() if hasattr(p, "to_local") else p for p in parts.chunks.parameters()]
        states = [t for state in parts.optimizer.state.values() for t in state.values()
                  if isinstance(t, torch.Tensor)]
        states = [t.to_local() if hasattr(t, "to_local") else t for t in states]
        last = results[-1]
        return {
            "rank": rank, "world_size": world_size,
            "coordinate": dict(zip(("pp", "dp", "tp"), (parts.layout.pp_rank, parts.layout.dp_rank,
                                                        parts.layout.tp_rank))),
            "stages": list(parts.chunks.stage_ids),
            "loss": [str(last.loss.device), str(last.loss.dtype), list(last.loss.shape)],
            "grad_norm": [str(last.grad_norm.device), str(last.grad_norm.dtype)],
            "finite": [str(last.finite.device), str(last.finite.dtype)],
            "parameter_devices": sorted({str(t.device) for t in local}),
            "parameter_dtypes": sorted({str(t.dtype) for t in local}),
            "local_parameters": sum(t.numel() for t in local),
            "optimizer_state_devices": sorted({str(t.device) for t in states}),
            "collectives": dict(Counter(sim.record.collectives)),
            "host_ops": sim.record.host_ops,
        }

"""Will a job fit, and what will a step cost: the trainer's own step run on fake tensors, memory tracked.

    plan = plan_job(cfg, world_size=16, device=DEVICES["h100"])
    plan.fits, plan.peak_bytes, plan.roles[0].report.by_category, plan.step_seconds, plan.comm_bytes

For each distinct rank role - a pipeline rank; the tensor-parallel ranks of a stage hold equal shards (every
sharded size is checked divisible by tp) and data-parallel rank 0 holds FSDP2's largest shard - one fresh process
(qwenlink.train.simulate's machinery) builds the rank as the Trainer does (`build_step_parts`: mesh -> meta model ->
LoRA -> TP/SP -> AC -> compile -> FSDP2 -> materialise -> init) on fake device tensors under torch's fake process
group of the job's world size, and runs two optimizer steps (`run_step`: forward, backward, clipping, the update;
the first creates the optimizer state) while `qwenlink.train.memory.MemoryTracker` counts live tensor bytes by
category and the bytes each collective sends, by mesh dimension. Nothing is allocated and nothing is computed.

Micro batches: a step's micro batches are alike, so the simulation runs only as many as reach the same peak as the
job's count. Without a pipeline that is 3 (the first creates the accumulated gradients, a middle one runs with
them, the last reduce-scatters them); with one, the smallest count whose schedule (torch's own `pipeline_order`
for this rank) holds as many micro batches in flight per stage as the job's. What does grow with the count is
measured and extrapolated, not assumed: the pipeline stages' receive buffers (one per micro batch, kept for the
schedule's life: measured as what freeing the first step's schedule releases) and the bytes communicated (the two
steps run different counts; per micro batch = the difference).
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.parallel.mesh import ParallelPlan
from qwenlink.train.config import JobConfig, accumulation_steps, parallel_plan
from qwenlink.train import plan_layers
from qwenlink.train.memory import CATEGORIES, MemoryReport, gib

HEADROOM = 0.10  # of device memory kept free for the caching allocator's fragmentation, CUDA context, NCCL buffers
DEFAULT_MFU = 0.40  # model FLOPs utilisation assumed for the step-time estimate (well-tuned Megatron-class runs: 0.35-0.5)


# ---- devices ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSpec:
    """What the plan needs to know about a device: memory, dense peak TFLOP/s, and link bandwidths (GB/s each way)
    within a node (NVLink / HCCS) and between nodes (one 400 Gb/s NIC per device)."""

    name: str
    memory_bytes: int
    bf16_tflops: float
    fp32_tflops: float
    intra_node_gbs: float
    inter_node_gbs: float
    per_node: int = 8
    note: str = ""


# Memory as the driver reports it (nvidia-smi's total; Ascend's 64 GB HBM). TFLOP/s: dense, without sparsity, as in
# qwenlink.train.metrics.PEAK_TFLOPS (fp32 = TF32 tensor cores on NVIDIA).
DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("h100", 81559 * 2**20, 989.0, 494.0, 450.0, 50.0, note="H100 SXM 80GB, NVLink 4"),
    "h200": DeviceSpec("h200", 143771 * 2**20, 989.0, 494.0, 450.0, 50.0, note="H200 SXM 141GB, NVLink 4"),
    "a100-80g": DeviceSpec("a100-80g", 81920 * 2**20, 312.0, 156.0, 300.0, 25.0, note="A100 SXM 80GB, NVLink 3"),
    "910b": DeviceSpec("910b", 64 * 2**30, 376.0, 94.0, 196.0, 25.0, note="Ascend 910B, HCCS"),
    "cpu": DeviceSpec("cpu", 0, 1.0, 1.0, 10.0, 10.0, per_node=1,
                      note="this host: memory = MemAvailable, TFLOP/s measured"),
}


def parse_bytes(text: str, field_name: str = "--device-memory") -> int:
    """`64GiB`, `80GB`, `512MiB`, `1.5T` -> bytes (G/GiB/GB all mean 2**30: accelerator memory is quoted so)."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    raw = text.strip().lower().replace(" ", "")
    for suffix in ("ib", "b"):
        if raw.endswith(suffix):
            raw = raw[:-len(suffix)]
            break
    unit = raw[-1:] if raw[-1:] in units else ""
    try:
        value = float(raw[:-1] if unit else raw) * units[unit]
    except ValueError:
        raise QwenlinkError(f"{field_name}: expected a size like 64GiB or 80GB, got {text!r}") from None
    if value <= 0 or not math.isfinite(value):
        raise QwenlinkError(f"{field_name}: must be positive, got {text!r}")
    return int(value)


def host_device() -> DeviceSpec:
    """The CPU as a device: its available memory and measured fp32 matmul rate."""
    from qwenlink.train.metrics import measure_cpu_tflops

    available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    rate = measure_cpu_tflops()
    return dataclasses.replace(DEVICES["cpu"], memory_bytes=available, bf16_tflops=rate, fp32_tflops=rate)


# ---- the result ------------------------------------------------------------------------------------------------
@dataclass
class RolePlan:
    """One rank role's memory (pipeline rank `pp_rank`; its tp ranks are alike) and communication per step."""

    pp_rank: int
    rank: int                      # the global rank simulated
    stages: list[int]
    report: MemoryReport
    micro_batches: tuple[int, int]  # simulated in step 1, step 2
    buffer_bytes_per_micro: int    # pipeline receive buffers per micro batch (extrapolated to the job's count)
    peak_bytes: int                # at the job's micro-batch count
    comm_bytes: dict[str, int]     # per step at the job's count, by mesh dimension


@dataclass
class Plan:
    world_size: int
    layout: ParallelPlan
    device: DeviceSpec
    device_memory_bytes: int
    micro_batches: int             # per optimizer step on each data-parallel rank
    roles: list[RolePlan]
    tokens_per_step: int
    flops_per_step: float
    mfu: float
    seconds: float = 0.0           # the plan's own runtime
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(r.peak_bytes for r in self.roles)

    @property
    def usable_bytes(self) -> int:
        return int(self.device_memory_bytes * (1 - HEADROOM))

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    @property
    def peak_tflops(self) -> float:
        return self.device.bf16_tflops if self.dtype == "bf16" else self.device.fp32_tflops

    dtype: str = "bf16"

    @property
    def step_seconds(self) -> float:
        """Model FLOPs of a step over every device's peak at the assumed MFU."""
        return self.flops_per_step / (self.world_size * self.peak_tflops * 1e12 * self.mfu)

    @property
    def tokens_per_second_per_device(self) -> float:
        return self.tokens_per_step / self.step_seconds / self.world_size

    def comm_seconds(self) -> dict[str, float]:
        """Each mesh dimension's bytes of the busiest role at its link's bandwidth (within a node when the dimension
        and those inside it span at most a node's devices: the mesh is pp x dp_replicate x dp_shard x cp x tp, tp
        innermost)."""
        sizes = {"pp": self.layout.pp, "dp_replicate": self.layout.dp_replicate, "dp_shard": self.layout.dp_shard,
                 "tp": self.layout.tp, "cp": self.layout.cp}
        inner, span = 1, {}
        for dim in ("tp", "cp", "dp_shard", "dp_replicate", "pp"):
            inner *= sizes[dim]
            span[dim] = inner
        span["dp_shard_cp"] = span["dp_shard"]  # FSDP2's flattened group under context parallelism
        out = {}
        for dim, nbytes in self.comm_bytes.items():
            local = span.get(dim.split("-")[0], self.world_size) <= self.device.per_node
            bandwidth = self.device.intra_node_gbs if local else self.device.inter_node_gbs
            out[dim] = nbytes / (bandwidth * 1e9)
        return out

    @property
    def comm_bytes(self) -> dict[str, int]:
        dims: dict[str, int] = {}
        for role in self.roles:
            for dim, nbytes in role.comm_bytes.items():
                dims[dim] = max(dims.get(dim, 0), nbytes)
        return dims

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size, "device": self.device.name, "device_memory_bytes": self.device_memory_bytes,
            "headroom": HEADROOM, "usable_bytes": self.usable_bytes, "peak_bytes": self.peak_bytes, "fits": self.fits,
            "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "vpp": self.layout.vpp,
                       "dp_shard": self.layout.dp_shard, "dp_replicate": self.layout.dp_replicate,
                       "cp": self.layout.cp, "ep": self.layout.ep,
                       "sequence_parallel": self.layout.sequence_parallel, "schedule": self.layout.schedule},
            "micro_batches": self.micro_batches,
            "ranks": [{
                "pp_rank": r.pp_rank, "rank": r.rank, "tp_ranks": self.layout.tp, "stages": r.stages,
                "params_bytes": r.report.by_category["params"], "gathered_params_bytes": r.report.by_category["gathered"],
                "grads_bytes": r.report.by_category["grads"], "optimizer_bytes": r.report.by_category["optimizer"],
                "activations_bytes": r.report.by_category["activations"] + r.peak_bytes - r.report.peak_bytes,
                "peak_bytes": r.peak_bytes, "simulated_micro_batches": list(r.micro_batches),
                "pipeline_buffer_bytes_per_micro_batch": r.buffer_bytes_per_micro,
                "top": r.report.top, "comm_bytes_per_step": r.comm_bytes} for r in self.roles],
            "estimate": {"tokens_per_step": self.tokens_per_step, "model_flops_per_step": self.flops_per_step,
                         "peak_tflops": self.peak_tflops, "mfu": self.mfu, "step_seconds": self.step_seconds,
                         "tokens_per_second_per_device": self.tokens_per_second_per_device},
            "comm_bytes_per_step": self.comm_bytes, "comm_seconds_per_step": self.comm_seconds(),
            "plan_seconds": self.seconds, "notes": self.notes,
        }


# ---- FLOPs -----------------------------------------------------------------------------------------------------
def model_flops_per_token(config: ModelConfig, seq_length: int, lora: bool) -> float:
    """Training FLOPs per token (ModelConfig.flops_per_token: 6 x matmul parameters + attention). With LoRA the
    frozen base computes no weight gradients: 4 x its matmul parameters instead of 6 (the adapters' share is
    negligible at rank 16). Recomputation (activation checkpointing) is not model FLOPs: MFU absorbs it."""
    full = config.flops_per_token(seq_length)
    if not lora:
        return full
    attention = 12.0 * config.num_hidden_layers * config.hidden_size * seq_length
    return (full - attention) * 4.0 / 6.0 + attention


# ---- the plan ----------------------------------------------------------------------------------------------------
def plan_config(cfg: JobConfig) -> JobConfig:
    """The job as the plan simulates it: no checkpoint or data is read (memory does not depend on them), and an
    unset SFT pad id (the tokenizer's, which may not be on this machine) becomes the eos id or 0."""
    data = cfg.data
    if data.pad_id < 0:
        data = dataclasses.replace(data, pad_id=0)
    return dataclasses.replace(cfg, data=data)


def plan_job(cfg: JobConfig, world_size: int, device: DeviceSpec, model_config: ModelConfig, *,
             device_memory: Optional[int] = None,
             mfu: float = DEFAULT_MFU, device_type: str = "cuda", workers: Optional[int] = None,
             timeout: float = 900.0, extrapolate: bool = True) -> Plan:
    """Simulate every rank role of `cfg` at `world_size` and put together memory, FLOPs and communication.
    `extrapolate`: a model with more than 3 layers per stage is simulated at 2 and 3 layers per stage and
    extrapolated (qwenlink.train.plan_layers); False simulates every layer."""
    import time

    from qwenlink.parallel.simulate import run_simulation

    start = time.perf_counter()
    if world_size < 1:
        raise QwenlinkError(f"--world-size must be at least 1, got {world_size}")
    if not 0 < mfu <= 1:
        raise QwenlinkError(f"--mfu must be in (0, 1], got {mfu}")
    cfg = plan_config(cfg)
    if device_type == "cpu":
        # A CPU job is simulated on the fake accelerator too. On fake CPU tensors the simulation cannot tell the host
        # work it runs for real (a factory call making the loader's batches) from DTensor's sharding propagation,
        # whose shape derivation then ran a real embedding on uninitialised ids (tp > 1 failed). Sizes do not depend
        # on the device; what a CPU does differently is kept: no compilation unless the job asks for it.
        if cfg.parallel.compile is None:
            cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, compile=False))
        device_type = "cuda"
    layout = parallel_plan(cfg, world_size, model_config)
    total = accumulation_steps(cfg, layout.dp)
    ranks = [p * layout.dp_cp * layout.tp for p in range(layout.pp)]  # dp 0, cp 0, tp 0 of each pipeline rank
    points = plan_layers.reduced_points(layout, model_config) if extrapolate else None
    tomls = [plan_layers.reduced_config(cfg, layout, k).to_toml() for k in points] if points else [cfg.to_toml()]
    runs = [(toml, r) for r in ranks for toml in tomls]
    workers = workers or max(1, min(len(runs), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(lambda run: run_simulation("qwenlink.train.plan_sim:simulate_role", run[0], world_size,
                                                        run[1], device_type, timeout=timeout), runs))
    if points:  # two reduced simulations per rank -> the rank at its real layer count (qwenlink.train.plan_layers)
        layers = plan_layers.layers_per_rank(layout, model_config)
        results = [plan_layers.extrapolate(done[2 * i], done[2 * i + 1], layers[i]) for i in range(len(ranks))]
    else:
        results = done
    roles = [RolePlan(pp_rank=r["pp_rank"], rank=r["rank"], stages=r["stages"],
                      report=MemoryReport(**{k: r["report"][k] for k in ("peak_bytes", "by_category", "top",
                                                                         "comm_bytes", "comm_calls",
                                                                         "final_bytes")}),
                      micro_batches=tuple(r["counts"]), buffer_bytes_per_micro=r["buffer_bytes_per_micro"],
                      peak_bytes=r["peak_bytes"], comm_bytes=r["comm"]) for r in results]
    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    flops = tokens * model_flops_per_token(model_config, cfg.data.seq_length, cfg.lora.enabled)
    plan = Plan(world_size=world_size, layout=layout, device=device,
                device_memory_bytes=device_memory if device_memory is not None else device.memory_bytes,
                micro_batches=total, roles=roles, tokens_per_step=tokens, flops_per_step=flops, mfu=mfu,
                dtype=cfg.train.dtype)
    if points:
        plan.notes.append(f"simulated with {' and '.join(map(str, points))} decoder layers per stage and extrapolated "
                          f"to the job's {', '.join(map(str, sorted(set(layers))))} (the layers are identical; "
                          f"embedding, head and loss at their real size)")
    plan.seconds = time.perf_counter() - start
    return plan


# ---- the trainer's check -----------------------------------------------------------------------------------------
def check_fits(cfg: JobConfig, model_config: ModelConfig, world_size: int, device: torch.device, *,
               stream: Any = None,
               plan_on_cpu: bool = False) -> Optional[Plan]:
    """Before the trainer allocates anything: plan the job and refuse it (QwenlinkError with the plan's numbers)
    when the busiest rank's peak exceeds the device's memory less the headroom. On a CUDA or NPU device that is a
    refusal unless `train.skip_memory_check` is set; on a CPU it is a warning on `stream`, and planning (tens of
    seconds for a big model) happens only with `plan_on_cpu`, so CPU runs and tests start at once.
    Returns the plan when one was made."""
    import sys

    if cfg.train.skip_memory_check:
        return None
    accelerator = device.type in ("cuda", "npu")
    if not accelerator and not plan_on_cpu:
        return None
    spec = _device_spec(device)
    plan = plan_job(cfg, world_size, spec, model_config, device_type="cuda" if accelerator else "cpu")
    if plan.fits:
        return plan
    worst = max(plan.roles, key=lambda r: r.peak_bytes)
    parts = ", ".join(f"{c} {gib(worst.report.by_category[c])}" for c in CATEGORIES)
    message = (f"memory: the busiest rank (pipeline rank {worst.pp_rank}) needs {gib(plan.peak_bytes)} at its peak "
               f"({parts}) but a {device.type} device has {gib(spec.memory_bytes)}, {gib(plan.usable_bytes)} after "
               f"{HEADROOM:.0%} headroom; change the layout (more tp / pp / dp_shard, activation_checkpoint = "
               f"\"full\", a smaller micro_batch_size) or set train.skip_memory_check = true to run anyway "
               f"(`qwenlink plan --config FILE` shows the breakdown)")
    if accelerator:
        raise QwenlinkError(message)
    print(f"warning: {message}", file=stream or sys.stderr)
    return plan


def _device_spec(device: torch.device) -> DeviceSpec:
    """The running device's memory (as its runtime reports it); the host's for a CPU."""
    if device.type == "cpu":
        return host_device()
    module = getattr(torch, device.type)
    index = device.index if device.index is not None else module.current_device()
    memory = int(module.get_device_properties(index).total_memory)
    return dataclasses.replace(DEVICES["h100"], name=device.type, memory_bytes=memory)

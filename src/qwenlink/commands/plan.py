"""`qwenlink plan --config FILE`: will this job fit its devices, and what will a step cost (qwenlink.train.plan)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional

from qwenlink.errors import QwenlinkError
from qwenlink.parallel.mesh import ParallelPlan
from qwenlink.train.config import JobConfig, load_config
from qwenlink.train.memory import CATEGORIES, gib

# A config's header line naming what it is meant for; `plan` takes it as the default --world-size / --device.
DOES_NOT_FIT = 3  # exit status when the busiest rank's peak exceeds the usable memory (2: bad input, 1: a bug)
_HEADER = re.compile(r"^#\s*plan:\s*(?P<args>.*)$", re.MULTILINE)


def header_defaults(path: Optional[str]) -> dict[str, str]:
    """`# plan: --world-size 16 --device h100` in the config's comments -> {"world_size": "16", "device": "h100"}."""
    if not path or not Path(path).is_file():
        return {}
    match = _HEADER.search(Path(path).read_text(encoding="utf-8"))
    if not match:
        return {}
    words = match.group("args").split()
    out = {}
    for flag, value in zip(words[::2], words[1::2]):
        out[flag.lstrip("-").replace("-", "_")] = value
    return out


def _rate(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.1f} MiB"


def layout_line(layout: ParallelPlan, cfg: JobConfig, micro_batches: int) -> str:
    """The plan's `layout:` line: the mesh sizes (ep, which splits a mixture of experts' routed experts over some of
    the dp_shard ranks, where it is > 1), sequence parallelism, the schedule and what one step computes."""
    experts = f" (experts over ep {layout.ep})" if layout.ep > 1 else ""
    return (f"layout: tp {layout.tp} x pp {layout.pp}{f' (vpp {layout.vpp})' if layout.vpp > 1 else ''} x dp "
            f"{layout.dp_replicate} replicate x {layout.dp_shard} shard{experts}"
            f"{f' x cp {layout.cp}' if layout.cp > 1 else ''}, sequence parallel "
            f"{'on' if layout.sequence_parallel and layout.tp > 1 else 'off'}, "
            f"{layout.schedule if layout.pp > 1 else 'no pipeline'}; {micro_batches} micro batch(es) of "
            f"{cfg.train.micro_batch_size} x {cfg.data.seq_length} per step and data-parallel rank; "
            f"{cfg.train.dtype}, activation checkpointing {cfg.train.activation_checkpoint}"
            f"{', LoRA' if cfg.lora.enabled else ''}")


def run_plan(args: argparse.Namespace) -> int:
    from qwenlink.train.plan import DEVICES, HEADROOM, host_device, parse_bytes, plan_job

    cfg = load_config(args.config, args.overrides)
    defaults = header_defaults(args.config)
    world = args.world_size if args.world_size is not None else defaults.get("world_size")
    if world is None:
        p = cfg.parallel
        world = p.tp * p.pp * p.dp_replicate * max(p.dp_shard, 1)
    try:
        world = int(world)
    except ValueError:
        raise QwenlinkError(f"--world-size: expected a number, got {world!r}") from None
    name = (args.device or defaults.get("device") or "h100").lower()
    if name not in DEVICES:
        raise QwenlinkError(f"--device: {name!r} is not one of {', '.join(DEVICES)}")
    device = host_device() if name == "cpu" else DEVICES[name]
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    from qwenlink.train.trainer import resolve_model_config

    if not args.timeout > 0:
        raise QwenlinkError(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    model_config = resolve_model_config(cfg)
    from qwenlink.parallel.simulate import SimulationError

    try:
        plan = plan_job(cfg, world, device, model_config, device_memory=memory, mfu=args.mfu,
                        device_type="cpu" if name == "cpu" else "cuda", timeout=args.timeout)
    except SimulationError as exc:
        if "did not finish" in str(exc):  # a big interleaved layout on a busy host: say how to wait longer
            raise SimulationError(f"{exc}; `--timeout SECONDS` sets a bigger limit") from None
        raise
    data = plan.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0 if plan.fits else DOES_NOT_FIT
    layout = plan.layout
    print(f"{cfg.job.name}: {world} x {device.name} ({device.note}), {gib(plan.device_memory_bytes)} each, "
          f"{gib(plan.usable_bytes)} usable after {HEADROOM:.0%} headroom for the allocator")
    print(layout_line(layout, cfg, plan.micro_batches))
    if model_config.is_moe:  # a mixture of experts: its FLOPs per token count the routed (top-k) experts only
        print(f"model: {model_config.num_params() / 1e9:.2f}B parameters, "
              f"{model_config.num_params(active=True) / 1e9:.2f}B active per token (top-"
              f"{model_config.num_experts_per_tok} of {model_config.num_experts} experts + the shared expert)")
    print("memory per device at its peak (one training step, simulated on fake tensors):")
    for role in data["ranks"]:
        tp = f", tp ranks 0-{layout.tp - 1} alike" if layout.tp > 1 else ""
        parts = "  ".join(f"{c} {_rate(role[k])}" for c, k in (
            ("params", "params_bytes"), ("gathered", "gathered_params_bytes"), ("grads", "grads_bytes"),
            ("optimizer", "optimizer_bytes"), ("activations", "activations_bytes")))
        verdict = "fits" if role["peak_bytes"] <= plan.usable_bytes else "DOES NOT FIT"
        print(f"  pipeline rank {role['pp_rank']} (stages {', '.join(map(str, role['stages']))}{tp}): "
              f"peak {_rate(role['peak_bytes'])} - {verdict}")
        print(f"    {parts}")
        top = "; ".join(f"{t['category']} {t['what']} {_rate(t['bytes'])}" for t in role["top"][:5])
        print(f"    largest at the peak: {top}")
    verdict = "fits" if plan.fits else "does NOT fit"
    print(f"peak {gib(plan.peak_bytes)} per device: {verdict} ({gib(plan.usable_bytes)} usable)")
    est = data["estimate"]
    print(f"step estimate: {est['tokens_per_step']:,} tokens x {est['model_flops_per_step'] / est['tokens_per_step']:.3g} "
          f"model FLOPs/token on {world} devices at {est['peak_tflops']:g} TFLOP/s {cfg.train.dtype} peak x MFU "
          f"{est['mfu']:.2f} (assumed) -> {est['step_seconds']:.3g} s/step, "
          f"{est['tokens_per_second_per_device']:,.0f} tokens/s/device")
    comm = data["comm_bytes_per_step"]
    if comm:
        seconds = data["comm_seconds_per_step"]
        ranked = sorted(comm, key=lambda d: -comm[d])
        print("bytes each rank sends per step, by mesh dimension (busiest rank; time at the link's bandwidth):")
        for dim in ranked:
            if comm[dim]:
                print(f"  {dim:18s} {_rate(comm[dim]):>12s}  {seconds[dim]:.3g} s")
    for note in plan.notes:
        print(f"note: {note}")
    print(f"(planned in {plan.seconds:.0f} s; `--json` for every number)")
    return 0 if plan.fits else DOES_NOT_FIT


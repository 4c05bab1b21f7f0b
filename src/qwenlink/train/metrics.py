"""Training metrics: throughput (tokens/s, tokens/s per device), TFLOP/s and MFU, memory; console, JSONL, TensorBoard,
Weights & Biases (optional, train/wandb_log.py).

FLOPs per token come from `ModelConfig.flops_per_token` (the single place that counts them). MFU divides achieved
FLOP/s by the device's peak: a table for known accelerators, or on a CPU the measured rate of a large fp32 matmul
(a CPU has no meaningful datasheet number for PyTorch, and "fraction of what matmul reaches here" is the useful one).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TextIO

import torch

if TYPE_CHECKING:
    from qwenlink.train.wandb_log import WandbOptions, WandbSink

# Dense peak TFLOP/s per device (bf16 / fp32-as-TF32), matched by substring of the device name, most specific first.
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 494.0),
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 494.0),
    ("H800", 989.0, 494.0),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("A10G", 70.0, 35.0),
    ("V100", 125.0, 15.7),
    ("Ascend910B", 376.0, 94.0),
    ("910B", 376.0, 94.0),
]

_measured_cpu_tflops: Optional[float] = None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":  # pragma: no cover - needs torch_npu
        return torch.npu.get_device_name(device)  # type: ignore[attr-defined]
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def measure_cpu_tflops(size: int = 1024, repeats: int = 4) -> float:
    """Achieved fp32 matmul TFLOP/s on this CPU with the current thread count (measured once per process)."""
    global _measured_cpu_tflops
    if _measured_cpu_tflops is None:
        gen = torch.Generator().manual_seed(0)  # never the global RNG: dropout must see the same draws on resume
        a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
        a @ b  # warm up
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        elapsed = time.perf_counter() - start
        _measured_cpu_tflops = 2.0 * size**3 * repeats / elapsed / 1e12
    return _measured_cpu_tflops


def peak_tflops(device: torch.device, dtype: str, override: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s per device, where the number came from)."""
    if override > 0:
        return override, "config"
    if device.type == "cpu":
        return measure_cpu_tflops(), "measured fp32 matmul"
    name = device_name(device)
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return (bf16 if dtype == "bf16" else fp32), f"table ({key})"
    return 0.0, f"unknown device {name!r}"


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or on a CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    if device.type == "npu":  # pragma: no cover
        return torch.npu.max_memory_allocated(device) / 1024**3  # type: ignore[attr-defined]
    return peak_rss_bytes() / 1024**3


def peak_rss_bytes() -> int:
    """This process's peak resident set size. On Linux it is read from /proc (VmHWM, the peak of this program's own
    memory): `ru_maxrss` keeps the peak of the process that forked it across exec, so a job started from a large
    parent (a test runner) reported that parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux kibibytes


@dataclass
class Throughput:
    """Derived rates of one logging interval."""

    tokens_per_s: float
    tokens_per_s_per_device: float
    tflops_per_device: float
    mfu: float  # fraction of peak; nan when the peak is unknown


def throughput(tokens: int, seconds: float, *, world_size: int, flops_per_token: float,
               peak: float) -> Throughput:
    """Rates for `tokens` processed by all devices together in `seconds`."""
    tps = tokens / max(seconds, 1e-9)
    per_device = tps / world_size
    tflops = per_device * flops_per_token / 1e12
    return Throughput(tps, per_device, tflops, tflops / peak if peak > 0 else math.nan)


class _ProgressBar:
    """One self-overwriting line with ETA on a terminal."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream, self.start = total, stream, time.perf_counter()
        self.first_step: Optional[int] = None

    def update(self, step: int, text: str) -> None:
        if self.first_step is None:
            self.first_step = step - 1
        done = step - self.first_step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done, 1) * (self.total - step)
        width = 20
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r[{bar}] {text} | ETA {format_seconds(eta)}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The plottable part of a record under its dashboard name: finite numbers, `train/` prefixed unless the key has
    a group of its own (`moe/...`, `rewards/...`). TensorBoard and W&B both get exactly this, so they agree."""
    return {key if "/" in key else f"train/{key}": value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)}


class MetricsLogger:
    """Writes each record to the console, `metrics.jsonl`, TensorBoard and optionally W&B (only rank 0 writes anything).

    On resume the JSONL keeps the lines up to the resumed step and drops later ones (they belong to the abandoned
    continuation), so `qwenlink plot` shows one consistent curve; TensorBoard purges the same steps, and W&B continues
    the same run (train/wandb_log.py).
    """

    def __init__(self, run_dir: str | os.PathLike, *, total_steps: int, jsonl: bool = True,
                 tensorboard: bool = True, progress: str = "auto", enabled: bool = True,
                 resume_step: int = 0, stream: TextIO = sys.stdout, wandb: Optional["WandbOptions"] = None) -> None:
        self.enabled = enabled
        self.stream = stream
        self.jsonl_path = Path(run_dir) / "metrics.jsonl" if jsonl else None
        self._jsonl: Optional[TextIO] = None
        self._tb = None
        self._wandb: Optional["WandbSink"] = None
        use_bar = progress == "bar" or (progress == "auto" and stream.isatty())
        self._bar = _ProgressBar(total_steps, stream) if use_bar and enabled else None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        if self.jsonl_path is not None:
            self._truncate_after(resume_step)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                self.info("tensorboard is not installed: TensorBoard logging is off "
                          "(pip install tensorboard; metrics.jsonl is still written)")
        if wandb is not None:
            from qwenlink.train.wandb_log import WandbSink

            self._wandb = WandbSink.start(run_dir, wandb, resume_step=resume_step, info=self.info)

    def _truncate_after(self, step: int) -> None:
        if self.jsonl_path is None or not self.jsonl_path.is_file():
            return
        kept = []
        for line in self.jsonl_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if record.get("step", 0) <= step:
                kept.append(line)
        from qwenlink.fileio import atomic_write_text  # a kill while trimming must not lose the whole history

        atomic_write_text(self.jsonl_path, "".join(k + "\n" for k in kept))

    def info(self, text: str) -> None:
        """A message on its own line (never mixed into the progress bar)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self.stream.write("\r\x1b[K")
        print(text, file=self.stream, flush=True)

    def log(self, record: dict[str, Any], line: str) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
            self._jsonl.flush()
        if self._tb is not None or self._wandb is not None:
            step, values = record["step"], scalars(record)
            if self._tb is not None:
                for key, value in values.items():
                    self._tb.add_scalar(key, value, step)
            if self._wandb is not None:
                self._wandb.log(step, values)
        if self._bar is not None:
            self._bar.update(record["step"], line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


def format_line(r: dict[str, Any], total_steps: int) -> str:
    """The human-readable summary of one log record."""
    parts = [f"step {r['step']}/{total_steps}", f"loss {r['loss']:.4f}"]
    if "aux_loss" in r:  # a mixture of experts' load-balancing loss, apart from the LM loss
        parts.append(f"aux {r['aux_loss']:.4f}")
    if "moe/load_max_over_mean" in r:  # the busiest expert's tokens over the mean, in the worst sparse layer
        parts.append(f"load {r['moe/load_max_over_mean']:.2f}")
    parts += [f"lr {r['lr']:.3g}", f"grad {r['grad_norm']:.3f}", f"{r['tokens_per_s']:.0f} tok/s",
              f"{r['tokens_per_s_per_device']:.0f} tok/s/p", f"{r['tflops']:.3g} TFLOP/s"]
    if math.isfinite(r.get("mfu", math.nan)):
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"mem {r['peak_memory_gb']:.2f} GB")
    parts.append(f"data {100 * r['data_time_share']:.0f}%")
    if r.get("skipped_nonfinite"):
        parts.append(f"skipped {r['skipped_nonfinite']}")
    return " | ".join(parts)

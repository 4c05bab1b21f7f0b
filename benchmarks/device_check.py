"""The first look at an accelerator: does qwenlink run right and how fast, in one script, one JSON file, < 8 minutes.

qwenlink is developed on CPUs; a GPU is lent rarely and briefly (15 minutes for a whole session). This script makes
that time count: every section is independent (an exception is recorded in the JSON with its traceback and the next
section runs), sections run in order of value and are skipped, with the reason, when the remaining time budget
cannot hold them, the JSON is rewritten after every section (a killed run still leaves its results), and a watchdog
ends the process shortly after the budget with the JSON written, so a hang cannot eat the device time.

Sections (device_check_sections.py):
  environment      torch / CUDA / NCCL / transformers versions, the device and its memory
  parity           logits vs transformers' Qwen2ForCausalLM built from the same config with the same (random)
                   weights: fp32 (TF32 off) and bf16, a small shape and the Qwen1.5-1.8B shape
  moe              (device_check_moe.py) Qwen1.5-MoE: the grouped-GEMM experts against transformers and against
                   qwenlink's loop (bf16 logits and gradients), then benchmarks/bench_moe.py on the device: training
                   and decoding at Qwen1.5-MoE-A2.7B's widths (4 layers) against transformers' default experts and
                   its Python loop; qwenlink eager and with compiled blocks; a profile of one step per training side
  kernels          (device_check_kernels.py) the loss's in-place log_softmax / softmax and the chunked cross
                   entropy and DPO log-probabilities against plain PyTorch, forward and backward; time and memory
  packing          (device_check_kernels.py) packed-document attention: compiled FlexAttention against SDPA per
                   document, forward and backward, fp32 and bf16; time of each
  trainer          `torchrun --nproc-per-node 1 -m qwenlink.cli train` (NCCL, bf16) for a few steps on a synthetic
                   corpus made by `qwenlink preprocess`, compile off, then on (each its own section)
  train            the trainer's step (build_step_parts / run_step) on the Qwen1.5-1.8B shape, bf16, seq 4096:
                   FSDP2 + compile, then + activation checkpointing: tokens/s, MFU, peak memory, next to the
                   prediction of `qwenlink plan` when that command exists
  compiled_decode  the compiled (CUDA graph) decode step's greedy tokens equal eager's (fp32, small shape)
  decode           generated tokens/s at batch 1 and 8 on the 1.8B shape in bf16: eager, compiled, transformers
  trainer_compiled the torchrun trainer again with per-block compilation on
  train_shapes     `train` on the 0.5B shape and the 4B shape (activation checkpointing): MFU per shape

    python benchmarks/device_check.py --out device_check.json              # on one CUDA device (~8 minutes)
    python benchmarks/device_check.py --out smoke.json --smoke              # CPU, tiny shapes (CI; ~30 s)
    python benchmarks/device_check.py --out x.json --sections parity train  # a subset

No downloads: every model is built from a config with random weights, so it runs on a machine with no network. The
script finds qwenlink in ../src when it is not installed (a bare device machine has only torch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
SRC_DIR = BENCH_DIR.parent / "src"
for _path in (str(BENCH_DIR), str(SRC_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

import device_check_sections as sections  # noqa: E402


class Report:
    """The JSON being built: one entry per section, written atomically after each one.

    A section's status is "ok", "failed" (it ran but a check did not hold: its `checks` say which), "error" (an
    exception: message and traceback recorded), "skipped" (with the reason) or "aborted" (the watchdog stopped it)."""

    def __init__(self, path: Path, budget_s: float, settings: dict[str, Any]) -> None:
        self.path = path
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.current: str | None = None
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {
            "script": "benchmarks/device_check.py",
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "budget_s": budget_s, "settings": settings, "sections": {}}

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def write(self) -> None:
        with self.lock:
            self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
            statuses = {name: s["status"] for name, s in self.data["sections"].items()}
            self.data["summary"] = {k: [n for n, s in statuses.items() if s == k]
                                    for k in ("ok", "failed", "error", "skipped", "aborted")}
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
            os.replace(tmp, self.path)

    def run(self, name: str, fn: Callable[[], dict[str, Any]], min_seconds: float) -> None:
        """Run one section unless fewer than `min_seconds` of the budget are left; record whatever happens."""
        left = self.remaining()
        if left < min_seconds:
            self.data["sections"][name] = {"status": "skipped", "reason": f"time budget: {left:.0f} s left, the "
                                           f"section needs about {min_seconds:.0f} s"}
            self.write()
            return
        self.current = name
        self.data["sections"][name] = {"status": "running"}
        t0 = time.monotonic()
        entry: dict[str, Any]
        try:
            result = fn()
            checks = result.get("checks", {})
            if "skipped" in result:
                entry = {"status": "skipped", "reason": result.pop("skipped"), "result": result}
            else:
                entry = {"status": "ok" if all(checks.values()) else "failed", "result": result}
        except Exception as exc:  # noqa: BLE001 - one section's failure must not stop the others
            entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                     "traceback": traceback.format_exc()[-6000:]}
        entry["seconds"] = round(time.monotonic() - t0, 1)
        self.data["sections"][name] = entry
        self.current = None
        sections.release_memory()
        self.write()

    def watchdog(self, grace_s: float) -> None:
        """End the process `grace_s` after the budget, marking the running section aborted (a hang, a slow
        compile): the JSON is on disk either way."""
        def watch() -> None:
            while self.remaining() > -grace_s:
                time.sleep(1.0)
            with self.lock:
                if self.current is not None:
                    self.data["sections"][self.current] = {
                        "status": "aborted", "reason": f"still running {grace_s:.0f} s after the time budget"}
            self.write()
            os._exit(3)

        threading.Thread(target=watch, daemon=True, name="device-check-watchdog").start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke mode: tiny shapes, no compilation, a few steps (keeps the script working)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 420 on a device, 90 in smoke mode)")
    parser.add_argument("--grace", type=float, default=45.0, help="seconds past the budget before the watchdog ends "
                        "the process")
    parser.add_argument("--workdir", default=None, help="scratch space for the corpus and run directories (default: "
                        "a temporary directory, removed at the end)")
    parser.add_argument("--sections", nargs="*", default=None, choices=sections.ORDER,
                        help="run only these (default: all, in the order of --help)")
    args = parser.parse_args(argv)
    settings = sections.Settings.for_smoke() if args.smoke else sections.Settings.for_device()
    if args.device:
        settings.device = args.device
    scratch = None
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        settings.workdir = str(Path(args.workdir).resolve())
    else:
        scratch = tempfile.TemporaryDirectory(prefix="device-check-")
        settings.workdir = scratch.name
    budget = args.budget if args.budget is not None else (90.0 if args.smoke else 420.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = Report(out, budget, settings.as_dict())
    report.watchdog(args.grace)
    chosen = args.sections or sections.ORDER
    if not args.smoke and settings.device.startswith("cuda") and not torch.cuda.is_available():
        report.data["sections"]["environment"] = {"status": "error", "error": "CUDA is not available (use --smoke "
                                                  "on a CPU)", "result": sections.environment(settings)}
        report.write()
        return 1
    for name in sections.ORDER:
        if name in chosen:
            fn, min_seconds = sections.plan_section(name, settings, report.remaining)
            report.run(name, fn, min_seconds)
            print(f"device_check: {name}: {report.data['sections'][name]['status']} "
                  f"({report.data['sections'][name].get('seconds', 0)} s)", flush=True)
    report.write()
    if scratch is not None:
        scratch.cleanup()
    bad = [n for n, s in report.data["sections"].items() if s["status"] in ("failed", "error", "aborted")]
    print(f"device_check: wrote {out} in {report.data['elapsed_s']} s; "
          + (f"problems in: {', '.join(bad)}" if bad else "every section that ran passed"), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of `qwenlink convert` on a ~2 GB model: conversion should need about one model plus one layer.

Usage: python benchmarks/bench_convert_memory.py [--workdir DIR] [--keep]
Makes a random fp32 HF model of ~2.3 GiB (Qwen1.5-0.5B's shape, untied), then converts HF -> Megatron at
TP2 PP2 and Megatron -> HF, each in a fresh process, and reports wall time and peak RSS (ru_maxrss) next to the
model size. RSS includes clean memory-mapped file pages, which the kernel can drop under pressure, so it is an
upper bound of what the conversion needs.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _run_child(args: list[str]) -> tuple[float, float]:
    """Run `qwenlink ARGS` in a child; returns (seconds, peak RSS of that child in GiB)."""
    code = ("import resource, sys; from qwenlink.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr)
    peak_kib = int(next(line for line in res.stdout.splitlines() if line.startswith("PEAK")).split()[1])
    return time.perf_counter() - start, peak_kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    opts = parser.parse_args()
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="qwenlink-convert-bench-"))
    from qwenlink.checkpoint.hf import save_hf_model
    from qwenlink.models.config import ModelConfig
    from qwenlink.models.qwen2 import build_model

    config = ModelConfig(vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16)
    model = build_model(config, dtype=torch.float32, seed=0)
    size_gib = sum(p.numel() * 4 for p in model.parameters()) / 2**30
    layer_gib = sum(p.numel() * 4 for p in model.layers["0"].parameters()) / 2**30
    save_hf_model(model, work / "hf")
    del model
    print(f"model: {size_gib:.2f} GiB fp32, one layer {layer_gib:.3f} GiB")
    for label, args in (
        ("hf -> megatron tp2 pp2", ["convert", "--input", str(work / "hf"), "--output", str(work / "meg"),
                                    "--to", "megatron", "--tp", "2", "--pp", "2"]),
        ("megatron -> hf", ["convert", "--input", str(work / "meg"), "--output", str(work / "hf2"), "--to", "hf"]),
    ):
        seconds, peak = _run_child(args)
        print(f"{label:24s} {seconds:6.1f} s   peak RSS {peak:5.2f} GiB   ({peak / size_gib:.2f} x model)")
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

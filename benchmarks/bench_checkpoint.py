"""The time a training step loses to a checkpoint: synchronous save vs `checkpoint.async = true`.

The trainer's own step (build_step_parts / run_step) on one process, saving with the trainer's two checkpoint paths
(dcp.save_checkpoint, async_save.AsyncCheckpointer). For each mode: the median step time without saves, then
`--saves` times: a step, the save, `--after` more steps, then the wait for an async write still running. The time
lost to a save = the save call (the loop is blocked: the whole write when synchronous, the staging copy when
asynchronous) + how much slower the steps after it ran than the median (the background write competes for cores and
memory bandwidth) + the final wait. Also reported: the checkpoint's size. The model and optimizer state are the
same in both modes, so is the disk.

    python benchmarks/bench_checkpoint.py [--preset qwen-bench] [--seq 256] [--batch 2] [--saves 2] [--after 3]
        [--dir /tmp/bench-ckpt] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch


def _parts(args: argparse.Namespace):
    from qwenlink.train.config import load_config, parallel_plan
    from qwenlink.train.data import MicroBatch
    from qwenlink.train.trainer import build_step_parts, resolve_model_config

    cfg = load_config(None, [f"--model.preset={args.preset}", f"--data.seq_length={args.seq}",
                             f"--train.micro_batch_size={args.batch}", f"--train.global_batch_size={args.batch}",
                             "--train.device=cpu", "--train.dtype=fp32", "--optim.lr=1e-4", "--optim.warmup_iters=0"])
    model_config = resolve_model_config(cfg)
    parts = build_step_parts(cfg, model_config, parallel_plan(cfg, 1, model_config), torch.device("cpu"))
    tokens = torch.randint(0, model_config.vocab_size, (args.batch, args.seq + 1),
                           generator=torch.Generator().manual_seed(0))
    return cfg, parts, [MicroBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())]


def measure(mode: str, args: argparse.Namespace) -> dict:
    from qwenlink.checkpoint import dcp as ckpt
    from qwenlink.checkpoint.async_save import AsyncCheckpointer
    from qwenlink.train.trainer import run_step

    cfg, parts, batches = _parts(args)
    model, optimizer = parts.chunks.state_module, parts.optimizer
    root = Path(args.dir) / mode
    shutil.rmtree(root, ignore_errors=True)
    checkpointer = AsyncCheckpointer()
    save = checkpointer.save if mode == "async" else ckpt.save_checkpoint
    step = 0

    def train_step() -> None:
        nonlocal step
        step += 1
        float(run_step(parts, batches, step, clip_grad=1.0).loss)  # the loop reads the loss: the step is done

    for _ in range(2):
        train_step()  # warm-up (allocations, optimizer state)
    plain = []
    for _ in range(args.plain):
        t0 = time.perf_counter()
        train_step()
        plain.append(time.perf_counter() - t0)
    base = statistics.median(plain)
    lost, blocked, waited = [], [], []
    for _ in range(args.saves):
        train_step()
        t0 = time.perf_counter()
        save(root, step, model, optimizer, train_state={"step": step}, job_toml=cfg.to_toml(), keep_last=1)
        blocked.append(time.perf_counter() - t0)
        slower = 0.0
        for _ in range(args.after):  # steps while an async write runs: their slowdown counts against the save
            t1 = time.perf_counter()
            train_step()
            slower += time.perf_counter() - t1 - base
        t1 = time.perf_counter()
        checkpointer.wait()  # an async write still running after them counts too
        waited.append(time.perf_counter() - t1)
        lost.append(blocked[-1] + max(slower, 0.0) + waited[-1])
    size = sum(f.stat().st_size for f in ckpt.find_latest(root).rglob("*") if f.is_file())
    shutil.rmtree(root, ignore_errors=True)
    return {"mode": mode, "step_seconds": base, "save_call_blocked_seconds": blocked, "wait_seconds": waited,
            "lost_seconds": lost,
            "checkpoint_bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen-bench")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--plain", type=int, default=4, help="timed steps without a save (the baseline)")
    parser.add_argument("--saves", type=int, default=2, help="save sequences per mode")
    parser.add_argument("--after", type=int, default=3, help="steps after each save within its sequence")
    parser.add_argument("--dir", default="/tmp/qwenlink-bench-checkpoint")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(mode, args) for mode in ("sync", "async")]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; {args.preset} fp32 + AdamW, batch {args.batch} x {args.seq}, "
          f"checkpoint {results[0]['checkpoint_bytes'] / 2**30:.2f} GiB under {args.dir}")
    for r in results:
        print(f"{r['mode']:5s}: step {r['step_seconds']:.3f} s | save call blocked "
              f"{', '.join(f'{x:.2f}' for x in r['save_call_blocked_seconds'])} s | time lost per save "
              f"{', '.join(f'{x:.2f}' for x in r['lost_seconds'])} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

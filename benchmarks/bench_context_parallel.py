"""Context parallelism on CPU: per-rank peak memory, step time and communication of one training step at long
sequence lengths, cp1 vs cp2 vs cp4 (issue #17).

Usage: python benchmarks/bench_context_parallel.py [--seqs 8192 16384 32768] [--cps 1 2 4] [--layers 2]
       [--hidden 64] [--json OUT.json]

A narrow Qwen2 (hidden 64, 4 heads of 16 and 4 kv heads - multi-head like Qwen1.5 7B/14B/72B -, FFN 128, vocabulary
1024, fp32) so that what grows with the sequence, not the weights, is what a rank holds. Each (seq, cp) runs in a fresh
torchrun launch of cp gloo processes, through the trainer's own pieces (build_layout -> build_model_chunks ->
TrainStep, AdamW): one micro batch of one row of `seq` tokens per step. After a warm-up step at 512 tokens:

- a timed step (nothing else running in the process): the step's seconds (the slowest rank) and each rank's
  resident-memory growth during it (ru_maxrss after minus RSS before: what the step allocated, attention kernels'
  own scratch included);
- a tracked step under qwenlink.train.memory.MemoryTracker (the tracker `qwenlink plan` uses, here on real tensors):
  each rank's peak of live tensors by category (activations, gradients, ...) and the bytes it sent (ring
  algorithms), split by kind: context attention's k/v all-gathers and their gradients' reduce-scatters (functional
  collectives) and FSDP2's parameter all-gathers and gradient reduce-scatters over the cp ranks (c10d collectives;
  both run on the same ranks here, so the split is by op, not by group).

Threads: 1 per rank (BENCH_THREADS to change it; two threads per process on a shared 2-core machine spent more
time waiting for each other than computing), so cp1 runs on one core, cp2 on two and cp4 oversubscribes two cores
2x: times are indicative, memory is not affected.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(seq: int, layers: int, hidden: int, out: Path) -> None:
    """One rank of one (seq, cp) configuration (under torchrun)."""
    import torch
    import torch.distributed as dist

    from qwenlink.models.config import ModelConfig
    from qwenlink.parallel.init import init_weights
    from qwenlink.parallel.mesh import ParallelPlan
    from qwenlink.parallel.parallelize import ParallelizeOptions, build_layout, build_model_chunks
    from qwenlink.train.data import MicroBatch
    from qwenlink.train.memory import MemoryTracker, _collective_bytes, _group_of
    from qwenlink.train.plan_sim import group_names
    from qwenlink.train.step import TrainStep

    dist.init_process_group("gloo")
    cp = dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 1)))
    config = ModelConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(seq, 512))
    layout = build_layout(ParallelPlan(cp=cp), torch.device("cpu"), config)
    chunks = build_model_chunks(config, layout, ParallelizeOptions())
    chunks.materialize(torch.device("cpu"))
    init_weights(chunks.modules, seed=0, std=0.02)
    step = TrainStep(chunks, layout, chunk_size=1024, seq_length=seq, pad_id=0)
    optimizer = torch.optim.AdamW(chunks.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator().manual_seed(0)

    def one_step(tokens: int) -> float:
        ids = torch.randint(0, config.vocab_size, (1, tokens + 1), generator=gen)
        batch = [MicroBatch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())]
        loss = step.forward_backward(batch, step.count_valid(batch))
        step.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    one_step(512)  # warm-up: lazily loaded kernels, optimizer state
    dist.barrier()
    base = _rss_bytes()
    start = time.perf_counter()
    loss = one_step(seq)
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    dist.barrier()
    class ByKind(MemoryTracker):
        """Bytes sent keyed by the collective's kind: functional (context attention) or c10d (FSDP2)."""

        def _count_collective(self, func, args, out) -> None:
            group = _group_of(func, args)
            kind = "kv" if "_c10d_functional" in str(func) else "fsdp"
            self.comm_bytes[kind] += _collective_bytes(func, args, out, group.size() if group is not None else 1)
            self.comm_calls[kind] += 1

    tracker = ByKind("cpu", group_names(layout))
    tracker.mark(chunks.modules, optimizer)
    with tracker:
        one_step(seq)
    report = tracker.report()
    result = {"rank": dist.get_rank(), "seq": seq, "cp": cp, "loss": loss, "step_s": seconds,
              "rss_growth_bytes": peak_rss, "peak_tensor_bytes": report.peak_bytes,
              "by_category": report.by_category, "comm_bytes": report.comm_bytes, "threads": torch.get_num_threads()}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run(seq: int, cp: int, layers: int, hidden: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp}", __file__,
               "--worker", "--seq", str(seq), "--layers", str(layers), "--hidden", str(hidden), "--out", tmp]
        threads = os.environ.get("BENCH_THREADS", "1")
        env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise SystemExit(f"seq {seq} cp {cp} failed:\n{result.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--json", default="")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.seq, args.layers, args.hidden, Path(args.out))
        return
    rows = []
    print("| seq | cp | step s | loss | peak RSS growth / rank MiB (max) | peak tensors / rank MiB (max) | "
          "activations / rank MiB (max) | sent / rank / step MiB: k/v (cp attention) | FSDP2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seq in args.seqs:
        for cp in args.cps:
            ranks = run(seq, cp, args.layers, args.hidden)
            rows.extend(ranks)
            comm = lambda dim: max(r["comm_bytes"].get(dim, 0) for r in ranks)  # noqa: E731
            print(f"| {seq} | {cp} | {max(r['step_s'] for r in ranks):.2f} | {ranks[0]['loss']:.4f} | "
                  f"{mib(max(r['rss_growth_bytes'] for r in ranks))} | "
                  f"{mib(max(r['peak_tensor_bytes'] for r in ranks))} | "
                  f"{mib(max(r['by_category']['activations'] for r in ranks))} | {mib(comm('kv'))} | "
                  f"{mib(comm('fsdp'))} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

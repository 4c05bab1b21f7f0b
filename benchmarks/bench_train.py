"""Training throughput and peak memory: qwenlink vs HF transformers' Qwen2ForCausalLM, same config, same run.

Config: the `qwen-bench` preset (hidden 512, 8 layers, 8 heads, 2 kv heads, ffn 1408, vocab 151936), batch 4 x 512,
AdamW (fused implementation for both, so the comparison is about model + loss, not the optimizer kernel).
--dtype fp32: both sides in fp32. --dtype bf16: each side's own mixed precision with fp32 master weights - qwenlink's
policy (FSDP2's bf16 compute copies over a one-rank mesh, bf16 residual stream, fp32 gradient reduction) against
transformers under torch.autocast(bf16), the usual HF recipe.
Each side runs in its own subprocess, alternating for --rounds rounds, so peak RSS (ru_maxrss) of one cannot pollute
the other and they do not compete for cores; the best round of each side is reported. Same seed, same token batch,
same number of warm-up and timed steps.

    python benchmarks/bench_train.py [--dtype fp32|bf16] [--rounds 2] [--steps 3] [--warmup 1] [--batch 4]
                                     [--seq 512] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch


def _tokens(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))  # [B, T+1]


def run_qwenlink(args: argparse.Namespace) -> dict:
    from qwenlink.models.presets import get_preset
    from qwenlink.models.qwen2 import build_model
    from qwenlink.train.config import load_config
    from qwenlink.train.data import MicroBatch
    from qwenlink.train.optim import build_optimizer
    from qwenlink.parallel.mesh import ParallelPlan
    from qwenlink.parallel.parallelize import ModelChunks, ParallelizeOptions, build_layout, parallelize
    from qwenlink.train.step import TrainStep

    config = get_preset("qwen-bench")
    model = build_model(config, seed=0)
    bf16 = args.dtype == "bf16"
    # The trainer's own path on the one-process layout (with bf16: the size-1 FSDP2 mesh of its precision policy).
    layout = build_layout(ParallelPlan(), torch.device("cpu"), config, mixed_precision=bf16)
    parallelize(model, layout, ParallelizeOptions(param_dtype=torch.bfloat16 if bf16 else None))
    optim_cfg = load_config(None, ["--optim.lr=1e-4", "--optim.weight_decay=0.1", "--optim.implementation=fused"]).optim
    optimizer = build_optimizer(model, optim_cfg)
    tokens = _tokens(config.vocab_size, args.batch, args.seq)
    batch = MicroBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())   # [B, T] each
    train_step = TrainStep(ModelChunks([model], [0], config, 1), layout, chunk_size=1024, seq_length=args.seq,
                           pad_id=0)

    def step() -> float:
        loss = train_step.forward_backward([batch], train_step.count_valid([batch]))
        train_step.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return _measure(step, args)


def run_hf(args: argparse.Namespace) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwenlink.models.presets import get_preset

    ours = get_preset("qwen-bench")
    hf_config = Qwen2Config(**{k: v for k, v in ours.to_hf_dict().items() if k not in ("architectures", "model_type")})
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(hf_config).float()
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    tokens = _tokens(ours.vocab_size, args.batch, args.seq)
    input_ids = tokens[:, :-1].contiguous()                                          # [B, T]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step() -> float:
        # HF shifts labels itself: labels = input_ids gives the same next-token targets minus the last position.
        with autocast:
            out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss)

    return _measure(step, args)


def _measure(step, args: argparse.Namespace) -> dict:
    losses = [step() for _ in range(args.warmup)]
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    tokens = args.batch * args.seq
    best = min(times)
    # CPU seconds (all threads of the process) are less inflated than wall time by other load on a shared machine.
    return {"tokens_per_s": tokens * len(times) / sum(times), "tokens_per_s_best_step": tokens / best,
            "tokens_per_cpu_s": tokens * len(cpu) / sum(cpu), "step_seconds": times, "step_cpu_seconds": cpu,
            "losses": losses,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def worker(impl: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise SystemExit(f"{impl} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two sides this many times; best kept")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    parser.add_argument("--worker", choices=["qwenlink", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        result = run_qwenlink(args) if args.worker == "qwenlink" else run_hf(args)
        print(json.dumps(result))
        return
    rounds: dict[str, list[dict]] = {"qwenlink": [], "hf": []}
    for _ in range(args.rounds):
        for impl in rounds:
            rounds[impl].append(worker(impl, args))
    results = {impl: max(runs, key=lambda r: r["tokens_per_s"]) for impl, runs in rounds.items()}
    q, h = results["qwenlink"], results["hf"]
    import transformers

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; qwen-bench, batch {args.batch} x {args.seq}, {args.dtype}, AdamW "
          f"(fused); {args.warmup} warm-up + {args.steps} timed steps, best of {args.rounds} alternating rounds")
    print(f"{'':10} {'tokens/s':>10} {'best step':>10} {'tok/CPU-s':>10} {'peak RSS GB':>12} {'first loss':>11}")
    for name, r in results.items():
        print(f"{name:10} {r['tokens_per_s']:10.1f} {r['tokens_per_s_best_step']:10.1f} "
              f"{r.get('tokens_per_cpu_s', float('nan')):10.1f} {r['peak_rss_gb']:12.2f} {r['losses'][0]:11.4f}")
    print(f"ratio qwenlink/hf: tokens/s {q['tokens_per_s'] / h['tokens_per_s']:.2f}x, "
          f"tokens per CPU-s {q.get('tokens_per_cpu_s', 0) / h.get('tokens_per_cpu_s', 1):.2f}x, "
          f"peak RSS {q['peak_rss_gb'] / h['peak_rss_gb']:.2f}x")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

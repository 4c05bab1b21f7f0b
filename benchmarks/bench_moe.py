"""Qwen1.5-MoE training and decoding: qwenlink vs transformers' Qwen2MoeForCausalLM, same config, same run.

Shapes: `tiny` = the qwen-moe-tiny preset (hidden 128, 2 layers, 8 experts top-2, expert ffn 64, shared ffn 256,
vocab 151936); `wide` = a wider CPU shape closer to Qwen1.5-MoE's proportions (hidden 512, 4 layers, 8 heads,
60 experts top-4, expert ffn 256, shared ffn 1024, vocab 151936); `experts` = wide's layers with vocab 8192, where
the experts rather than the 151936-token head are the work (as in the real 24-layer model).
Training: fp32, batch --batch x --seq, AdamW (fused for both), loss = LM loss + 0.001 x load-balancing loss on both
sides (transformers: labels + output_router_logits=True; qwenlink: the trainer's TrainStep with its aux term).
Decoding: greedy, --decode-batch prompts of 32 tokens, --new-tokens new tokens each; qwenlink's engine (prepacked
weights, built and warmed up before the timing) against `model.generate` (use_cache=True, warmed up).
Each side runs in its own subprocess (peak RSS of one cannot pollute the other); the best of --rounds alternating
rounds is kept.

    python benchmarks/bench_moe.py [--shape tiny|wide|experts] [--rounds 2] [--steps 3] [--warmup 1] [--batch 4]
                                   [--seq 256] [--decode-batch 4] [--new-tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

SHAPES = {
    "tiny": {},
    "wide": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, num_experts=60,
                 num_experts_per_tok=4, moe_intermediate_size=256, shared_expert_intermediate_size=1024,
                 intermediate_size=1408),
    # The wide shape's layers with a vocabulary that, as in Qwen1.5-MoE-A2.7B (24 layers), is a small part of the
    # step: there the head is ~13% of the model FLOPs per token; at `wide` (4 layers, vocab 151936) ~80%, here ~20%.
    "experts": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                    num_experts=60, num_experts_per_tok=4, moe_intermediate_size=256,
                    shared_expert_intermediate_size=1024, intermediate_size=1408, vocab_size=8192),
}


def _config(shape: str):
    from qwenlink.models.presets import get_preset

    return dataclasses.replace(get_preset("qwen-moe-tiny"), **SHAPES[shape])


def _tokens(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))  # [B, T+1]


def _hf_model(config):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    hf_config = Qwen2MoeConfig(**{k: v for k, v in config.to_hf_dict().items()
                                  if k not in ("architectures", "model_type")})
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(hf_config).float()


def train_qwenlink(args: argparse.Namespace) -> dict:
    from qwenlink.models.qwen2 import build_model
    from qwenlink.parallel.mesh import ParallelPlan
    from qwenlink.parallel.parallelize import ModelChunks, ParallelizeOptions, build_layout, parallelize
    from qwenlink.train.config import load_config
    from qwenlink.train.data import MicroBatch
    from qwenlink.train.moe import RouterAuxLoss
    from qwenlink.train.optim import build_optimizer
    from qwenlink.train.step import TrainStep

    config = _config(args.shape)
    model = build_model(config, seed=0)
    layout = build_layout(ParallelPlan(), torch.device("cpu"), config, mixed_precision=False)
    parallelize(model, layout, ParallelizeOptions())
    optim_cfg = load_config(None, ["--optim.lr=1e-4", "--optim.weight_decay=0.1", "--optim.implementation=fused"]).optim
    optimizer = build_optimizer(model, optim_cfg)
    tokens = _tokens(config.vocab_size, args.batch, args.seq)
    batch = MicroBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())  # [B, T] each
    step_fn = TrainStep(ModelChunks([model], [0], config, 1), layout, chunk_size=1024, seq_length=args.seq, pad_id=0)
    step_fn.router_aux = RouterAuxLoss.for_model(model, config)

    def step() -> float:
        total = step_fn.count_valid([batch])
        loss = step_fn.forward_backward([batch], total)
        step_fn.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss + 0.001 * step_fn.router_aux.step_mean(total))

    return _measure(step, args)


def train_hf(args: argparse.Namespace) -> dict:
    model = _hf_model(_config(args.shape))
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    input_ids = _tokens(model.config.vocab_size, args.batch, args.seq)[:, :-1].contiguous()  # [B, T]

    def step() -> float:
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False, output_router_logits=True)
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
    return {"tokens_per_s": tokens * len(times) / sum(times), "tokens_per_cpu_s": tokens * len(cpu) / sum(cpu),
            "step_seconds": times, "losses": losses,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def decode_qwenlink(args: argparse.Namespace) -> dict:
    from qwenlink.inference.engine import Engine, Request
    from qwenlink.inference.sampling import SamplingParams
    from qwenlink.models.qwen2 import build_model

    model = build_model(_config(args.shape), seed=0).eval()
    prompts = _tokens(model.config.vocab_size, args.decode_batch, 31).tolist()
    # Built (weights prepacked) and warmed up once, outside the timing, as transformers' model is loaded once.
    engine = Engine(model, max_batch=len(prompts), max_length=32 + args.new_tokens)
    engine.run([Request(p, SamplingParams(max_new_tokens=2)) for p in prompts])
    requests = [Request(p, SamplingParams(max_new_tokens=args.new_tokens)) for p in prompts]
    t0 = time.perf_counter()
    engine.run(requests)
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": sum(len(r.tokens) for r in requests) / seconds, "seconds": seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def decode_hf(args: argparse.Namespace) -> dict:
    model = _hf_model(_config(args.shape)).eval()
    ids = _tokens(model.config.vocab_size, args.decode_batch, 31)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        seconds = time.perf_counter() - t0
    return {"tokens_per_s": (out.shape[1] - ids.shape[1]) * ids.shape[0] / seconds, "seconds": seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


WORKERS = {"train-qwenlink": train_qwenlink, "train-hf": train_hf, "decode-qwenlink": decode_qwenlink,
           "decode-hf": decode_hf}


def worker(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--shape", args.shape, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
           "--decode-batch", str(args.decode_batch), "--new-tokens", str(args.new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise SystemExit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per side")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--decode-batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the sides this many times; best kept")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    runs: dict[str, list[dict]] = {name: [] for name in WORKERS}
    for _ in range(args.rounds):
        for name in WORKERS:
            runs[name].append(worker(name, args))
    best = {name: max(r, key=lambda x: x["tokens_per_s"]) for name, r in runs.items()}
    import transformers

    config = _config(args.shape)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; shape {args.shape} ({config.num_params() / 1e6:.1f}M params, "
          f"{config.num_params(active=True) / 1e6:.1f}M active); best of {args.rounds} alternating rounds")
    tq, th = best["train-qwenlink"], best["train-hf"]
    print(f"training fp32, batch {args.batch} x {args.seq}, {args.warmup} warm-up + {args.steps} timed steps")
    print(f"{'':10} {'tokens/s':>10} {'tok/CPU-s':>10} {'peak RSS GB':>12} {'first loss':>11}")
    for name, r in (("qwenlink", tq), ("hf", th)):
        print(f"{name:10} {r['tokens_per_s']:10.1f} {r['tokens_per_cpu_s']:10.1f} {r['peak_rss_gb']:12.2f} "
              f"{r['losses'][0]:11.4f}")
    print(f"ratio qwenlink/hf: tokens/s {tq['tokens_per_s'] / th['tokens_per_s']:.2f}x, tokens per CPU-s "
          f"{tq['tokens_per_cpu_s'] / th['tokens_per_cpu_s']:.2f}x, peak RSS {tq['peak_rss_gb'] / th['peak_rss_gb']:.2f}x")
    dq, dh = best["decode-qwenlink"], best["decode-hf"]
    print(f"decoding greedy, {args.decode_batch} prompts x 32 tokens, {args.new_tokens} new tokens each: qwenlink "
          f"{dq['tokens_per_s']:.1f} tok/s ({dq['peak_rss_gb']:.2f} GB), hf generate {dh['tokens_per_s']:.1f} tok/s "
          f"({dh['peak_rss_gb']:.2f} GB): {dq['tokens_per_s'] / dh['tokens_per_s']:.2f}x")
    if args.json:
        print(json.dumps(best, indent=2))


if __name__ == "__main__":
    main()

"""Qwen1.5-MoE training and decoding: qwenlink vs transformers' Qwen2MoeForCausalLM, same config, same run.

Shapes: `tiny` = the qwen-moe-tiny preset (hidden 128, 2 layers, 8 experts top-2, expert ffn 64, shared ffn 256,
vocab 151936); `wide` = a wider CPU shape closer to Qwen1.5-MoE's proportions (hidden 512, 4 layers, 8 heads,
60 experts top-4, expert ffn 256, shared ffn 1024, vocab 151936); `experts` = wide's layers with vocab 8192, where
the experts rather than the 151936-token head are the work (as in the real 24-layer model).
`a2.7b-4l` = Qwen1.5-MoE-A2.7B's own widths (hidden 2048, 60 experts of 1408, shared 5632) with 4 of its 24 layers,
for a GPU.
Training: --dtype (fp32, or bf16 weights and optimizer state on both sides), batch --batch x --seq, AdamW (fused for
both), loss = LM loss + 0.001 x load-balancing loss on both sides (transformers: labels + output_router_logits=True;
qwenlink: the trainer's TrainStep with its aux term).
transformers runs twice: with its default experts implementation (5.x: `grouped_mm`, the same torch._grouped_mm
kernel qwenlink uses) and with `experts_implementation="eager"`, its Python loop over the experts that were hit (the
only implementation of transformers 4.x, and what "HF loops over experts in Python" refers to).
Decoding: greedy, --decode-batch prompts of 32 tokens, --new-tokens new tokens each; qwenlink's engine (on CPU
prepacked weights; on CUDA also compiled with CUDA graphs in bf16; built and warmed up before the timing) against
`model.generate` (use_cache=True, warmed up).
Each side runs in its own subprocess (the peak memory of one cannot pollute the other: RSS on CPU, the allocator's
peak on CUDA); the best of --rounds alternating rounds is kept.

    python benchmarks/bench_moe.py [--shape tiny|wide|experts|a2.7b-4l] [--device cpu|cuda] [--dtype fp32|bf16]
                                   [--rounds 2] [--steps 3] [--warmup 1] [--batch 4] [--seq 256] [--decode-batch 4]
                                   [--new-tokens 32] [--compile] [--train-only] [--profile] [--json]
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
from pathlib import Path

import torch

SRC_DIR = Path(__file__).resolve().parent.parent / "src"
if SRC_DIR.is_dir() and str(SRC_DIR) not in sys.path:
    sys.path.append(str(SRC_DIR))

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
    "a2.7b-4l": dict(num_hidden_layers=4),
}
BASE_PRESET = {"a2.7b-4l": "qwen1.5-moe-a2.7b"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _config(shape: str):
    from qwenlink.models.presets import get_preset

    return dataclasses.replace(get_preset(BASE_PRESET.get(shape, "qwen-moe-tiny")), **SHAPES[shape])




def _peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _tokens(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))  # [B, T+1]


def _qwenlink_model(args: argparse.Namespace):
    from qwenlink.models.qwen2 import build_model

    return build_model(_config(args.shape), device=args.device, dtype=DTYPES[args.dtype], seed=0)


def _hf_model(args: argparse.Namespace, experts: str = "default"):
    """transformers' model on --device in --dtype (initialised there: a 3B model's CPU init takes longer than its
    benchmark); experts "default" (its own choice) or "eager" (its Python loop over the experts that were hit)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    hf_config = Qwen2MoeConfig(**{k: v for k, v in _config(args.shape).to_hf_dict().items()
                                  if k not in ("architectures", "model_type")})
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen2MoeForCausalLM(hf_config).to(DTYPES[args.dtype])
    if experts != "default":
        if not hasattr(model, "set_experts_implementation"):  # transformers 4.x: the loop is its only implementation
            raise SystemExit(f"transformers {__import__('transformers').__version__} has no experts implementations")
        model.set_experts_implementation(experts)
    return model


def _hf_experts_implementation(model) -> str:
    return getattr(model.config, "_experts_implementation", None) or "eager (transformers 4.x loop)"


def train_qwenlink(args: argparse.Namespace, compile: bool = False) -> dict:
    """The trainer's TrainStep; compile: each decoder block through torch.compile, as `parallel.compile` does."""
    from qwenlink.parallel.mesh import ParallelPlan
    from qwenlink.parallel.parallelize import ModelChunks, ParallelizeOptions, build_layout, parallelize
    from qwenlink.train.config import load_config
    from qwenlink.train.data import MicroBatch
    from qwenlink.train.moe import RouterAuxLoss
    from qwenlink.train.optim import build_optimizer
    from qwenlink.train.step import TrainStep

    config = _config(args.shape)
    model = _qwenlink_model(args)
    layout = build_layout(ParallelPlan(), torch.device(args.device), config, mixed_precision=False)
    parallelize(model, layout, ParallelizeOptions(compile=compile))
    optim_cfg = load_config(None, ["--optim.lr=1e-4", "--optim.weight_decay=0.1", "--optim.implementation=fused"]).optim
    optimizer = build_optimizer(model, optim_cfg)
    tokens = _tokens(config.vocab_size, args.batch, args.seq)
    # On the host, as the trainer's loader hands them over (pinned on CUDA); TrainStep copies them without a wait.
    batch = MicroBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())  # [B, T] each
    if args.device == "cuda":
        batch = MicroBatch(batch.input_ids.pin_memory(), batch.labels.pin_memory())
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


def train_hf(args: argparse.Namespace, experts: str = "default") -> dict:
    model = _hf_model(args, experts)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    input_ids = _tokens(model.config.vocab_size, args.batch, args.seq)[:, :-1].contiguous().to(args.device)  # [B, T]

    def step() -> float:
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return {**_measure(step, args), "experts_implementation": _hf_experts_implementation(model)}


def _measure(step, args: argparse.Namespace) -> dict:
    losses = [step() for _ in range(args.warmup)]
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    tokens = args.batch * args.seq
    result = {"tokens_per_s": tokens * len(times) / sum(times), "tokens_per_cpu_s": tokens * len(cpu) / sum(cpu),
              "step_seconds": times, "losses": losses, "peak_memory_gb": _peak_memory_gb(args.device)}
    if args.profile:
        result["profile"] = _profile(step, args.device)
    return result


def _profile(step, device: str, top: int = 15) -> dict:
    """One more step under torch.profiler (after the timing): the kernels launched, and the ops that took the most
    device time (CUDA) or CPU time, each with its calls and milliseconds."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    on_device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    return {"kernels": len(on_device), "kernel_ms": round(sum(e.device_time for e in on_device) / 1e3, 2),
            "top": [{"op": e.key[:90], "calls": e.count, "ms": round(getattr(e, key, 0) / 1e3, 2)} for e in rows]}


def decode_qwenlink(args: argparse.Namespace, compile: bool = False) -> dict:
    from qwenlink.inference.engine import Engine, Request
    from qwenlink.inference.sampling import SamplingParams

    model = _qwenlink_model(args).eval()
    prompts = _tokens(model.config.vocab_size, args.decode_batch, 31).tolist()
    # Built (weights prepacked or the step compiled) and warmed up once, outside the timing, as transformers' model
    # is loaded once.
    engine = Engine(model, max_batch=len(prompts), max_length=32 + args.new_tokens, compile=compile)
    engine.run([Request(p, SamplingParams(max_new_tokens=4)) for p in prompts])
    requests = [Request(p, SamplingParams(max_new_tokens=args.new_tokens)) for p in prompts]
    _sync(args.device)
    t0 = time.perf_counter()
    engine.run(requests)
    _sync(args.device)
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": sum(len(r.tokens) for r in requests) / seconds, "seconds": seconds,
            "peak_memory_gb": _peak_memory_gb(args.device)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_hf(args: argparse.Namespace, experts: str = "default") -> dict:
    model = _hf_model(args, experts).eval()
    ids = _tokens(model.config.vocab_size, args.decode_batch, 31).to(args.device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        _sync(args.device)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        _sync(args.device)
        seconds = time.perf_counter() - t0
    return {"tokens_per_s": (out.shape[1] - ids.shape[1]) * ids.shape[0] / seconds, "seconds": seconds,
            "peak_memory_gb": _peak_memory_gb(args.device), "experts_implementation": _hf_experts_implementation(model)}


WORKERS = {"train-qwenlink": train_qwenlink, "train-qwenlink-compiled": lambda args: train_qwenlink(args, True),
           "train-hf": train_hf,
           "train-hf-loop": lambda args: train_hf(args, "eager"),
           "decode-qwenlink": decode_qwenlink,
           "decode-qwenlink-compiled": lambda args: decode_qwenlink(args, compile=True),
           "decode-hf": decode_hf, "decode-hf-loop": lambda args: decode_hf(args, "eager")}


def sides(args: argparse.Namespace) -> list[str]:
    """The workers this run has: the compiled engine where it runs (CUDA, bf16: CUDA graphs), transformers' loop
    unless --no-hf-loop."""
    names = ["train-qwenlink", "train-qwenlink-compiled", "train-hf", "train-hf-loop", "decode-qwenlink",
             "decode-qwenlink-compiled", "decode-hf", "decode-hf-loop"]
    if not (args.device == "cuda" and args.dtype == "bf16"):
        names.remove("decode-qwenlink-compiled")
    if not args.compile:
        names.remove("train-qwenlink-compiled")
    if args.no_hf_loop:
        names = [n for n in names if not n.endswith("-hf-loop")]
    if args.train_only:
        names = [n for n in names if n.startswith("train-")]
    return names


def worker(name: str, args: argparse.Namespace, timeout: float | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--shape", args.shape, "--device", args.device,
           "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch",
           str(args.batch), "--seq", str(args.seq), "--decode-batch", str(args.decode_batch), "--new-tokens",
           str(args.new_tokens)] + ["--profile"] * args.profile + ["--compile"] * args.compile
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # qwenlink importable from ../src where it is not installed (a bare device machine)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC_DIR), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace, remaining=None, in_process: bool = False) -> dict[str, dict]:
    """Every side of `sides(args)` in its own process, --rounds times alternating; the best round of each.

    remaining: a function giving the seconds left to the caller (benchmarks/device_check.py); a side that does not
    start with a minute left is recorded as skipped. in_process: run the sides here (its CPU smoke test)."""
    names = sides(args)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            if remaining is not None and remaining() < 60:
                continue
            try:
                if in_process:
                    runs[name].append(WORKERS[name](args))
                else:
                    runs[name].append(worker(name, args, timeout=remaining() - 10 if remaining else None))
            except Exception as exc:  # noqa: BLE001 - one side's failure must not hide the others' results
                runs[name].append({"error": f"{type(exc).__name__}: {exc}"[-3000:]})
    best = {}
    for name, results in runs.items():
        ran = [r for r in results if "tokens_per_s" in r]
        best[name] = (max(ran, key=lambda x: x["tokens_per_s"]) if ran else results[-1] if results
                      else {"skipped": "time budget"})
    return best


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per side")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--decode-batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the sides this many times; best kept")
    parser.add_argument("--no-hf-loop", action="store_true", help="leave out transformers' Python-loop experts")
    parser.add_argument("--compile", action="store_true",
                        help="also train with each decoder block compiled (parallel.compile; minutes on a CPU)")
    parser.add_argument("--train-only", action="store_true", help="leave out decoding")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more training step per side: kernels launched and the costliest ops")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = parser().parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    best = compare(args)
    failed = {name: r["error"] for name, r in best.items() if "error" in r}
    for name, error in failed.items():
        print(f"{name} failed: {error}", file=sys.stderr)
    best = {name: r for name, r in best.items() if "tokens_per_s" in r}
    import transformers

    config = _config(args.shape)
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{platform.machine()} {os.cpu_count()} cores")
    print(f"machine: {where}, torch {torch.__version__}, transformers {transformers.__version__}; shape {args.shape} "
          f"({config.num_params() / 1e6:.1f}M params, {config.num_params(active=True) / 1e6:.1f}M active); "
          f"{args.dtype}; best of {args.rounds} alternating rounds")
    memory = "peak GiB" if args.device == "cuda" else "peak RSS GB"
    print(f"training, batch {args.batch} x {args.seq}, {args.warmup} warm-up + {args.steps} timed steps")
    print(f"{'':34} {'tokens/s':>10} {'tok/CPU-s':>10} {memory:>12} {'first loss':>11} {'qwenlink/this':>14}")
    for label, r, ratio in _rows(best, "train"):
        print(f"{label:34} {r['tokens_per_s']:10.1f} {r['tokens_per_cpu_s']:10.1f} {r['peak_memory_gb']:12.2f} "
              f"{r['losses'][0]:11.4f} {ratio:13.2f}x")
    if not any(n.startswith("decode-") for n in best):
        return _finish(best, failed, args.json)
    print(f"decoding greedy, {args.decode_batch} prompts x 32 tokens, {args.new_tokens} new tokens each")
    for label, r, ratio in _rows(best, "decode"):
        print(f"{label:34} {r['tokens_per_s']:10.1f} tok/s {r['peak_memory_gb']:8.2f} {memory}, qwenlink eager / "
              f"this {ratio:.2f}x")
    _finish(best, failed, args.json)


def _rows(best: dict, kind: str):
    """(label, result, qwenlink eager's tokens/s over this side's) for each side of `kind` (train / decode)."""
    ours = best.get(f"{kind}-qwenlink", {"tokens_per_s": float("nan")})["tokens_per_s"]
    for name, r in best.items():
        if name.startswith(f"{kind}-"):
            yield _label(name, r), r, ours / r["tokens_per_s"]


def _label(name: str, result: dict) -> str:
    """"hf-loop (eager)" for the worker "train-hf-loop": the side, and transformers' experts implementation."""
    side = name.split("-", 1)[1]
    return f"{side} ({result['experts_implementation']})" if "experts_implementation" in result else side


def _finish(best: dict, failed: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(best, indent=2))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

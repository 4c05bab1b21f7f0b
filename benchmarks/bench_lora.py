"""LoRA vs full fine-tuning on the same small model: trainable parameters, optimizer state and peak training memory.

Usage: python benchmarks/bench_lora.py [--hidden 512] [--layers 4] [--vocab 32000] [--r 16] [--steps 3]
Each mode runs in a fresh process (so peak RSS, ru_maxrss, is its own): build the model, add LoRA (r, alpha 2r,
all projections) or not, run a few AdamW steps with the trainer's chunked loss, and report trainable parameters,
optimizer state bytes (exact, from the optimizer's tensors), peak RSS and step time. The issue's bar: LoRA optimizer
state < 5% of full fine-tuning's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(mode: str, args: argparse.Namespace) -> dict:
    import torch

    from qwenlink.models.config import ModelConfig
    from qwenlink.models.lora import LoraConfig, apply_lora, count_parameters, trainable_parameters
    from qwenlink.models.qwen2 import build_model
    from qwenlink.train.loss import model_loss

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64)
    model = build_model(config, seed=0)
    if mode == "lora":
        apply_lora(model, LoraConfig(r=args.r, alpha=2 * args.r, target_modules=["all-linear"]))
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    start = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = model_loss(model, ids[:, :-1], ids[:, 1:], scale=1.0 / ids[:, 1:].numel(), chunk_size=1024)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - start) / args.steps
    trainable, total = count_parameters(model)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return {"mode": mode, "trainable": trainable, "total": total, "optimizer_state_bytes": state,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "step_s": step_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = []
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", mode], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; LoRA r {args.r} on all "
          f"projections; batch {args.batch} x seq {args.seq}")
    print(f"{'mode':<6} {'trainable':>12} {'of total':>9} {'optimizer state':>16} {'peak RSS':>9} {'step':>7}")
    for r in rows:
        print(f"{r['mode']:<6} {r['trainable']:>12,} {100 * r['trainable'] / r['total']:>8.2f}% "
              f"{r['optimizer_state_bytes'] / 2**20:>12.1f} MiB {r['peak_rss_gib']:>7.2f}G {r['step_s']:>6.2f}s")
    ratio = rows[1]["optimizer_state_bytes"] / rows[0]["optimizer_state_bytes"]
    print(f"LoRA optimizer state = {100 * ratio:.2f}% of full fine-tuning's ({'OK' if ratio < 0.05 else 'ABOVE'} "
          f"the 5% bar)")


if __name__ == "__main__":
    main()

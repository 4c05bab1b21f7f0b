"""Peak memory and time of one packed training step: the dense [B, 1, T, T] document mask vs `DocumentMask`
(and, as the floor, plain causal attention over the whole row, which ignores the documents).

Usage: python benchmarks/bench_packed_attention.py [--seq 8192] [--batch 1] [--layers 2] [--hidden 128]

A narrow Qwen2 (hidden 128, 4 heads of 32, 2 kv heads, vocabulary 1024) so that attention, not the weights, is what
the step holds. One micro batch of `--batch` rows of `--seq` tokens, each packed with SFT-like samples of 64..1024
tokens and a padding tail (seeded), goes through what the trainer does: collate the samples (which builds the mask),
then forward + backward of the chunked loss (train/loss.py model_loss). Each mode runs in a fresh process, after a
warm-up step at 512 tokens (kernels and libraries load lazily); the peak is that process's ru_maxrss minus its
resident memory just before collate, so it counts what the step allocates. Also checks that dense and documents give the same loss.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_mode(mode: str, seq: int, batch: int, layers: int, hidden: int) -> dict:
    """In the child: build the model, pack the samples, and time one step in `mode` (dense | documents)."""
    import numpy as np
    import torch

    from qwenlink.models.config import ModelConfig
    from qwenlink.models.qwen2 import build_model

    torch.set_num_threads(2)
    config = ModelConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
    model = build_model(config, seed=0)
    step(model, mode, pack_rows(np.random.default_rng(1), 512, batch))  # warm-up: lazily loaded kernels, pools
    samples = pack_rows(np.random.default_rng(0), seq, batch)
    base = _rss_bytes()
    start = time.perf_counter()
    loss, documents = step(model, mode, samples)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "loss": loss, "step_s": seconds, "peak_step_mib": (peak - base) / 2**20,
            "documents": documents}


def pack_rows(rng, seq: int, batch: int) -> list[dict]:
    """`batch` packed rows as PackedInstructionDataset makes them: samples of 64..1024 tokens, then padding."""
    import numpy as np
    import torch

    samples = []
    for _ in range(batch):
        segments, positions, used, seg = np.zeros(seq, np.int64), np.zeros(seq, np.int64), 0, 1
        while True:
            n = int(rng.integers(64, 1025))
            if used + n > seq - 32:
                break
            segments[used:used + n], positions[used:used + n] = seg, np.arange(n)
            used, seg = used + n, seg + 1
        ids = rng.integers(0, 1024, seq)
        labels = np.where(segments > 0, np.roll(ids, -1), -100)
        samples.append({k: torch.from_numpy(v) for k, v in (("input_ids", ids), ("labels", labels),
                                                            ("segment_ids", segments), ("position_ids", positions))})
    return samples


def step(model, mode: str, samples: list[dict]) -> tuple[float, int]:
    """Collate (building the mask of `mode`) and forward + backward of the loss; (loss, packed samples)."""
    import torch

    from qwenlink.data.instruction import packed_attention_mask
    from qwenlink.models.documents import DocumentMask
    from qwenlink.train.loss import model_loss

    segments = torch.stack([s["segment_ids"] for s in samples])  # [B, T]
    if mode == "causal":  # the floor: one causal sequence per row, documents not kept apart (wrong for packing)
        mask = None
    else:
        mask = packed_attention_mask(segments) if mode == "dense" else DocumentMask.from_segment_ids(segments)
    input_ids = torch.stack([s["input_ids"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    positions = torch.stack([s["position_ids"] for s in samples])
    loss, _ = model_loss(model, input_ids, labels, scale=1.0, chunk_size=1024, position_ids=positions,
                         attention_mask=mask)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss), int(segments.max(1).values.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.seq, args.batch, args.layers, args.hidden)))
        return
    results = []
    for mode in ("dense", "documents", "causal"):
        cmd = [sys.executable, __file__, "--child", mode, "--seq", str(args.seq), "--batch", str(args.batch),
               "--layers", str(args.layers), "--hidden", str(args.hidden)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"seq {args.seq} x batch {args.batch}, {args.layers} layers, hidden {args.hidden}, "
          f"{results[0]['documents']} packed samples")
    print(f"{'mode':<10} {'peak step memory':>17} {'step':>8} {'loss':>10}")
    for r in results:
        print(f"{r['mode']:<10} {r['peak_step_mib']:>13.0f} MiB {r['step_s']:>7.2f}s {r['loss']:>10.4f}")
    assert abs(results[0]["loss"] - results[1]["loss"]) <= 1e-4 * abs(results[0]["loss"]), results


if __name__ == "__main__":
    main()

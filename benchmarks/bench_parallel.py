"""Training throughput per device under qwenlink's parallel wrappers: plain vs FSDP2, +/- torch.compile, +/- activation
checkpointing, side by side in one run on one device.

GPU (one command, sized for ~10 minutes on one H200; Qwen1.5-1.8B and 4B shapes, random weights, bf16, seq 4096):

    python benchmarks/bench_parallel.py --gpu

CPU (small shapes, so the script stays working where there is no GPU):

    python benchmarks/bench_parallel.py

Each variant trains `--steps` optimizer steps (after `--warmup` untimed ones) on random tokens with the same loss,
optimizer (AdamW) and data as `qwenlink train`, and reports tokens/s/device, TFLOP/s, MFU (FLOPs from
`ModelConfig.flops_per_token`; peak from the GPU table, or a measured fp32 matmul rate on CPU) and peak memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.parallel.data import apply_fsdp
from qwenlink.train.loss import model_loss
from qwenlink.train.metrics import peak_memory_gb, peak_tflops


@dataclass
class Variant:
    shape: str
    fsdp: bool
    compile: bool
    activation_checkpoint: bool

    @property
    def name(self) -> str:
        parts = ["fsdp" if self.fsdp else "plain"]
        if self.compile:
            parts.append("compile")
        if self.activation_checkpoint:
            parts.append("ac")
        return f"{self.shape} {'+'.join(parts)}"


def _build(variant: Variant, device: torch.device, param_dtype: torch.dtype | None) -> Qwen2Model:
    config = get_preset(variant.shape)
    with torch.device("meta"):
        model = Qwen2Model(config)
    if variant.activation_checkpoint:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for name in list(model.layers.keys()):
            model.layers[name] = checkpoint_wrapper(model.layers[name], preserve_rng_state=False)
    if variant.compile:
        for layer in model.layers.values():
            layer.compile()
    if variant.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
        apply_fsdp(model, mesh, param_dtype=param_dtype)
    model.to_empty(device=device)
    model.tie_weights()
    torch.manual_seed(0)
    model.init_weights(0.01)
    return model


def run_variant(variant: Variant, *, device: torch.device, bf16: bool, seq: int, micro: int, steps: int,
                warmup: int) -> dict:
    config = get_preset(variant.shape)
    # FSDP computes in bf16 through its mixed-precision policy; the plain model uses autocast. Both keep fp32 master
    # weights and optimizer state, as `qwenlink train` does.
    model = _build(variant, device, torch.bfloat16 if bf16 and variant.fsdp else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not variant.fsdp)
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        ids = torch.randint(0, config.vocab_size, (micro, seq + 1), generator=gen).to(device)
        with autocast:
            loss, _ = model_loss(model, ids[:, :-1], ids[:, 1:], scale=1.0 / (micro * seq), chunk_size=4096)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = steps * micro * seq
    flops = config.flops_per_token(seq) * tokens
    peak, source = peak_tflops(device, "bf16" if bf16 else "fp32")
    tps = tokens / elapsed
    result = {"variant": variant.name, "tokens_per_s_per_device": tps, "tflops": flops / elapsed / 1e12,
              "mfu": flops / elapsed / 1e12 / peak if peak else float("nan"), "peak_memory_gb": peak_memory_gb(device),
              "loss": loss, "peak_source": source, "seq": seq, "micro": micro}
    print(f"{variant.name:32s} {tps:10.1f} tok/s/device  {result['tflops']:7.2f} TFLOP/s  MFU {result['mfu']:.1%}  "
          f"peak {result['peak_memory_gb']:.1f} GB  (loss {loss:.3f})", flush=True)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="Qwen1.5-1.8B and 4B shapes, bf16, seq 4096 on cuda")
    parser.add_argument("--shapes", nargs="*", default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--micro", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if args.gpu:
        device, bf16 = torch.device("cuda"), True
        shapes, seq, steps = args.shapes or ["qwen1.5-1.8b", "qwen1.5-4b"], args.seq or 4096, args.steps or 5
        dist.init_process_group("nccl", rank=0, world_size=1)
    else:
        device, bf16 = torch.device("cpu"), False
        shapes, seq, steps = args.shapes or ["qwen-tiny"], args.seq or 256, args.steps or 2
        dist.init_process_group("gloo", rank=0, world_size=1)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__} device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} {'bf16' if bf16 else 'fp32'} "
          f"seq {seq} micro {args.micro}", flush=True)
    variants = []
    for shape in shapes:
        variants += [Variant(shape, False, False, False), Variant(shape, True, False, False),
                     Variant(shape, True, True, False), Variant(shape, True, False, True)]
    results = [run_variant(v, device=device, bf16=bf16, seq=seq, micro=args.micro, steps=steps, warmup=args.warmup)
               for v in variants]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

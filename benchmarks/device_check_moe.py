"""device_check's `moe` section: Qwen1.5-MoE on the device (issue #18).

On CUDA the experts run as one `torch._grouped_mm` (bf16) instead of the CPU's loop, a path CPU tests reach only
through the CPU kernel of the same op. This section checks it against transformers' Qwen2MoeForCausalLM and against
qwenlink's own loop on the same device, forward and backward, then runs benchmarks/bench_moe.py's comparison
(training and decoding against transformers' default experts and its Python loop) on the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@contextlib.contextmanager
def _experts(impl: str):
    from qwenlink.models import qwen2_moe

    saved = qwen2_moe._IMPL["experts"]
    qwen2_moe.set_expert_impl(impl)
    try:
        yield
    finally:
        qwen2_moe.set_expert_impl(saved)


def _grads(model, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the summed cross entropy w.r.t. the first layer's stacked expert weights and router."""
    model.zero_grad(set_to_none=True)
    logits = model(ids)                                                         # [B, T, V]
    F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum").backward()
    mlp = model.layers["0"].mlp
    return {name: p.grad.float().clone() for name, p in mlp.named_parameters() if p.grad is not None}


def parity(device_name: str, tokens: tuple[int, int]) -> dict[str, Any]:
    """qwen-moe-tiny's layers (vocabulary 4096) with random weights, through qwenlink's HF writer into
    transformers' from_pretrained: logits in fp32 (TF32 off; the loop on both sides) equal; in bf16, the grouped
    GEMM's logits and first-layer expert gradients are as close to fp32's as the loop's and as transformers'."""
    from transformers import Qwen2MoeForCausalLM

    from qwenlink.checkpoint.hf import save_hf_model
    from qwenlink.models.presets import get_preset
    from qwenlink.models.qwen2 import build_model
    from qwenlink.models.qwen2_moe import use_grouped_gemm

    device = torch.device(device_name)
    config = dataclasses.replace(get_preset("qwen-moe-tiny"), vocab_size=4096)
    ours = build_model(config, device=device, seed=0)
    with torch.no_grad():  # routers drawn wider than the init, so tokens spread over the experts decisively
        for name, p in ours.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    batch, length = tokens
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=gen).to(device)
    labels = torch.randint(0, config.vocab_size, (batch, length), generator=gen).to(device)
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_model(ours, tmp)
            hf = Qwen2MoeForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            ref = ours.eval()(ids).float()
            theirs = hf(ids).logits.float()
        scale = max(float(ref.abs().max()), 1.0)
        ref_grads = _grads(ours, ids, labels)
        ours16 = build_model(config, device=device, dtype=torch.bfloat16, init=False)
        ours16.load_state_dict(ours.state_dict())
        ours16.eval()
        hf16 = hf.to(torch.bfloat16)
        probe = torch.zeros(1, device=device, dtype=torch.bfloat16)
        result: dict[str, Any] = {"tokens": [batch, length], "logit_abs_max": scale,
                                  "fp32_max_abs_diff": _max_diff(ref, theirs),
                                  "bf16_experts_auto": "grouped" if use_grouped_gemm(probe) else "loop",
                                  "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None)}
        errors: dict[str, Any] = {}
        for impl in ("grouped", "loop"):
            with _experts(impl), torch.no_grad():
                errors[f"qwenlink_{impl}"] = float((ours16(ids).float() - ref).abs().mean())
            with _experts(impl):
                grads = _grads(ours16, ids, labels)
            errors[f"qwenlink_{impl}_grad_rel"] = max(
                _max_diff(grads[k], ref_grads[k]) / max(float(ref_grads[k].abs().max()), 1e-12) for k in ref_grads)
        with torch.no_grad():
            errors["transformers"] = float((hf16(ids).logits.float() - ref).abs().mean())
        result["bf16_mean_abs_err_vs_fp32"] = errors
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    result["checks"] = {
        "fp32_equal": result["fp32_max_abs_diff"] <= 1e-4 * scale,
        "bf16_grouped_within_2x_transformers": errors["qwenlink_grouped"] <= 2 * errors["transformers"] + 1e-6,
        "bf16_grouped_within_2x_loop": errors["qwenlink_grouped"] <= 2 * errors["qwenlink_loop"] + 1e-6,
        "bf16_grouped_grads_within_2x_loop": errors["qwenlink_grouped_grad_rel"]
        <= 2 * errors["qwenlink_loop_grad_rel"] + 1e-3}
    if device.type == "cuda":
        result["checks"]["cuda_bf16_takes_grouped_gemm"] = result["bf16_experts_auto"] == "grouped"
    return result


def benchmark(device_name: str, shape: str, dtype: str, batch: int, seq: int, steps: int, warmup: int,
              decode_batch: int, new_tokens: int, remaining: Optional[Callable[[], float]],
              in_process: bool, flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """benchmarks/bench_moe.py's sides on this device (`flags`: more of its options, e.g. --compile --profile): each
    side's result, and each qwenlink side's speed over each transformers side."""
    import bench_moe

    args = bench_moe.parser().parse_args(
        ["--shape", shape, "--device", device_name, "--dtype", dtype, "--batch", str(batch), "--seq", str(seq),
         "--steps", str(steps), "--warmup", str(warmup), "--decode-batch", str(decode_batch), "--new-tokens",
         str(new_tokens), *flags])
    best = bench_moe.compare(args, remaining=remaining, in_process=in_process)
    config = bench_moe._config(shape)
    speedup = {}  # "qwenlink side / transformers side": tokens/s over tokens/s
    for ours, r_ours in best.items():
        for theirs, r_theirs in best.items():
            same_kind = ours.split("-")[0] == theirs.split("-")[0]
            if (same_kind and "-qwenlink" in ours and "-hf" in theirs and r_ours.get("tokens_per_s")
                    and r_theirs.get("tokens_per_s")):
                speedup[f"{ours} / {theirs}"] = round(r_ours["tokens_per_s"] / r_theirs["tokens_per_s"], 3)
    checks = {f"{name}_ran": "error" not in r for name, r in best.items()}
    checks.update({f"{name}_losses_finite": all(x == x and abs(x) < 1e4 for x in r["losses"])
                   for name, r in best.items() if "losses" in r})
    return {"shape": shape, "params_m": round(config.num_params() / 1e6, 1),
            "active_params_m": round(config.num_params(active=True) / 1e6, 1), "dtype": dtype,
            "train_tokens_per_step": batch * seq, "sides": best, "qwenlink_speedup_over": speedup, "checks": checks}


def moe(settings, remaining: Callable[[], float]) -> dict[str, Any]:
    """parity, then the benchmark while the budget holds it."""
    result: dict[str, Any] = {"parity": parity(settings.device, settings.moe_parity_tokens)}
    checks = {f"parity_{k}": v for k, v in result["parity"].pop("checks").items()}
    bench = benchmark(settings.device, settings.moe_shape, "bf16" if settings.device == "cuda" else "fp32",
                      settings.moe_batch, settings.moe_seq, settings.moe_steps, settings.moe_warmup,
                      settings.moe_decode_batch, settings.moe_new_tokens,
                      None if settings.smoke else remaining, in_process=settings.smoke,
                      # a compiled qwenlink side where compiling is quick enough (qwenlink train compiles blocks by
                      # default on CUDA); a profile of one more step per training side everywhere
                      flags=("--profile",) + (("--compile",) if settings.compile else ()))
    checks.update({f"bench_{k}": v for k, v in bench.pop("checks").items()})
    result["bench"] = bench
    result["checks"] = checks
    return result

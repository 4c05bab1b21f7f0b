"""device_check sections for kernels that CPU tests cannot vouch for on a GPU: the loss's in-place (log-)softmax and
FlexAttention's document packing.

Both were written and tested on CPUs. The in-place softmaxes rely on the CUDA kernels reading every element of a row
before writing it (true of the code, never run here); the packed-document path takes FlexAttention, compiled, on CUDA
only, while CPU tests could check its mask with the eager forward alone. Each section compares against the plain
PyTorch computation on the same device and times the two where timing means something.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call of fn() after one untimed call (kernels load, FlexAttention compiles)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _peak_after(fn, device: torch.device) -> float | None:
    """GiB the allocator's peak rose to while fn() ran (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 3)


# ---- the loss ---------------------------------------------------------------------------------------------------
def loss_kernels(device_name: str, vocabs: list[int], tokens: int, hidden: int) -> dict[str, Any]:
    """log_softmax / softmax written over their input against the out-of-place ops, at a vocabulary under and over
    CUDA's one-warp-per-row limit (1024; above it a block reduces each row); then the chunked linear cross entropy
    and the DPO token log-probabilities, forward and backward, against F.cross_entropy over the full logits (fp32
    with TF32 off, and bf16), with the time and peak memory of each at `tokens` x the largest vocabulary."""
    from qwenlink.train.logprobs import row_logps_from_hidden
    from qwenlink.train.loss import linear_cross_entropy, log_softmax_in_place, softmax_in_place

    device = torch.device(device_name)
    gen = torch.Generator().manual_seed(0)
    checks: dict[str, bool] = {}
    in_place: dict[str, Any] = {}
    for vocab in vocabs:
        x = (torch.randn(64, vocab, generator=gen) * 4).to(device)  # [64, V] fp32, a wide logit range
        lsm, sm = log_softmax_in_place(x.clone()), softmax_in_place(x.clone())
        d_lsm, d_sm = _max_diff(lsm, torch.log_softmax(x, -1)), _max_diff(sm, torch.softmax(x, -1))
        in_place[str(vocab)] = {"log_softmax_max_abs_diff": d_lsm, "softmax_max_abs_diff": d_sm}
        # An aliasing hazard would leave whole rows wrong (differences of order 1), not rounding.
        checks[f"log_softmax_in_place_v{vocab}"] = d_lsm <= 1e-5
        checks[f"softmax_in_place_v{vocab}"] = d_sm <= 1e-6

    vocab = max(vocabs)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        losses: dict[str, Any] = {}
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            h0 = (torch.randn(tokens, hidden, generator=gen)).to(device, dtype)           # [N, H]
            w0 = (torch.randn(vocab, hidden, generator=gen) * hidden ** -0.5).to(device, dtype)  # [V, H]
            labels = torch.randint(0, vocab, (tokens,), generator=gen)
            labels[::7] = -100  # some positions carry no label
            labels_dev = labels.to(device)

            def ours():
                h, w = h0.detach().requires_grad_(), w0.detach().requires_grad_()
                loss, _ = linear_cross_entropy(h, w, labels, chunk_size=1024)
                loss.backward()
                return loss, h.grad, w.grad

            def reference():
                h, w = h0.detach().requires_grad_(), w0.detach().requires_grad_()
                loss = F.cross_entropy((h @ w.t()).float(), labels_dev, ignore_index=-100, reduction="sum")
                loss.backward()
                return loss, h.grad, w.grad

            (l1, gh1, gw1), (l2, gh2, gw2) = ours(), reference()
            l1, l2 = l1.detach(), l2.detach()
            tol = 1e-4 if dtype == torch.float32 else 2e-2  # relative to each tensor's largest magnitude
            row = {"loss": float(l1), "reference_loss": float(l2),
                   "loss_rel_diff": abs(float(l1) - float(l2)) / abs(float(l2)),
                   "grad_hidden_rel_diff": _max_diff(gh1, gh2) / float(gh2.float().abs().max()),
                   "grad_weight_rel_diff": _max_diff(gw1, gw2) / float(gw2.float().abs().max())}
            for key in ("loss_rel_diff", "grad_hidden_rel_diff", "grad_weight_rel_diff"):
                checks[f"linear_cross_entropy_{name}_{key.removesuffix('_rel_diff')}"] = row[key] <= tol
            # DPO's per-row log-probabilities: 4 rows of the same tokens against log_softmax's gather.
            rows = 4
            h_rows = h0[: tokens // rows * rows].view(rows, tokens // rows, hidden)       # [R, T, H]
            l_rows = labels[: tokens // rows * rows].view(rows, -1)                        # [R, T]
            got = row_logps_from_hidden(h_rows, w0, l_rows, chunk_size=1024)               # [R]
            logp = torch.log_softmax((h_rows @ w0.t()).float(), -1)                        # [R, T, V]
            safe = l_rows.clamp(min=0).to(device)
            want = (logp.gather(-1, safe[..., None]).squeeze(-1) * (l_rows != -100).to(device)).sum(-1)
            row["dpo_row_logps_rel_diff"] = _max_diff(got, want) / float(want.abs().max())
            checks[f"dpo_row_logps_{name}"] = row["dpo_row_logps_rel_diff"] <= tol
            del logp
            if device.type == "cuda":
                row["seconds"] = {"chunked": round(_timed(ours, device, 5), 5),
                                  "full_logits": round(_timed(reference, device, 5), 5)}
                row["peak_gib"] = {"chunked": _peak_after(ours, device), "full_logits": _peak_after(reference, device)}
            losses[name] = row
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return {"in_place": in_place, "linear_cross_entropy": losses, "tokens": tokens, "hidden": hidden,
            "vocab": vocab, "checks": checks}


# ---- packed documents -------------------------------------------------------------------------------------------
def _document_starts(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """[B, T] bool: documents of seq/128..seq/8 tokens (seeded; 64..1024 at 8192), as packed SFT samples are."""
    starts = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        pos = 0
        while pos < seq:
            starts[b, pos] = True
            pos += int(torch.randint(seq // 128, seq // 8 + 1, (1,), generator=gen))
    return starts


def packing(device_name: str, seq: int, heads: int, kv_heads: int, head_dim: int, compiled: bool) -> dict[str, Any]:
    """Causal attention within packed documents: FlexAttention over the block mask (what CUDA takes) against each
    document through SDPA on its own slice (what the CPU takes), forward and backward, fp32 (TF32 off) and bf16;
    then the time of a forward + backward of each at bf16. On the CPU (smoke) FlexAttention has no backward: the
    forward alone, eager."""
    from qwenlink.models.documents import DocumentMask, attention_backend, flex_document_attention, segment_attention

    device = torch.device(device_name)
    gen = torch.Generator().manual_seed(0)
    docs = DocumentMask.from_starts(_document_starts(2, seq, gen)).to(device)
    backward = device.type == "cuda"
    checks: dict[str, bool] = {}
    if device.type == "cuda":
        checks["cuda_takes_flex"] = attention_backend(device) == "flex"
    shape_q, shape_kv = (2, heads, seq, head_dim), (2, kv_heads, seq, head_dim)
    q0 = torch.randn(shape_q, generator=gen).to(device)
    k0, v0 = torch.randn(shape_kv, generator=gen).to(device), torch.randn(shape_kv, generator=gen).to(device)
    grad_out = torch.randn(shape_q, generator=gen).to(device)

    def run(fn, dtype):
        # fresh leaves each call (q0 itself must not collect gradients, and a cast of it would not be a leaf)
        q, k, v = (t.detach().to(dtype, copy=True).requires_grad_(backward) for t in (q0, k0, v0))
        out = fn(q, k, v)
        if not backward:
            return out, ()
        out.backward(grad_out.to(dtype))
        return out, (q.grad, k.grad, v.grad)

    def flex(q, k, v):
        return flex_document_attention(q, k, v, docs, compiled=compiled)

    def segments(q, k, v):
        return segment_attention(q, k, v, docs)

    result: dict[str, Any] = {"seq": seq, "heads": [heads, kv_heads, head_dim], "documents": docs.__repr__(),
                              "backward": backward}
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref_out, ref_grads = run(segments, torch.float32)
        out, grads = run(flex, torch.float32)
        result["fp32_out_max_abs_diff"] = _max_diff(out, ref_out)
        result["fp32_grad_max_abs_diff"] = max((_max_diff(a, b) for a, b in zip(grads, ref_grads)), default=None)
        # A wrong mask moves outputs by O(0.1); these bounds leave room for TF32 inside FlexAttention's kernel.
        checks["flex_equals_segments_fp32"] = result["fp32_out_max_abs_diff"] <= 2e-3 and (
            not backward or result["fp32_grad_max_abs_diff"] <= 2e-2)
        if device.type == "cuda":
            # bf16: each path's error against the fp32 reference; FlexAttention's may be at most twice SDPA's.
            seg16, seg_grads16 = run(segments, torch.bfloat16)
            flex16, flex_grads16 = run(flex, torch.bfloat16)
            result["bf16_out_err_vs_fp32"] = {"flex": _max_diff(flex16, ref_out), "segments": _max_diff(seg16, ref_out)}
            result["bf16_grad_err_vs_fp32"] = {
                "flex": max(_max_diff(a, b) for a, b in zip(flex_grads16, ref_grads)),
                "segments": max(_max_diff(a, b) for a, b in zip(seg_grads16, ref_grads))}
            for key in ("bf16_out_err_vs_fp32", "bf16_grad_err_vs_fp32"):
                errs = result[key]
                checks[f"flex_{key}_within_2x_segments"] = errs["flex"] <= 2 * errs["segments"] + 1e-3
            result["fwd_bwd_seconds_bf16"] = {
                "flex": round(_timed(lambda: run(flex, torch.bfloat16), device, 5), 5),
                "segments": round(_timed(lambda: run(segments, torch.bfloat16), device, 5), 5)}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    result["checks"] = checks
    return result

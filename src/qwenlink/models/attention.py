"""Causal attention of the last n of m positions (lower-right aligned), without an n x m mask in memory.

Two callers need it: chunked prefill (inference/prefill.py: a chunk of n prompt tokens attends to the m cached slots
before and including it) and context parallelism (parallel/context.py: a rank's query chunk attends to the gathered
keys before it). SDPA's `is_causal` is upper-left aligned, which is wrong whenever m > n, and an explicit boolean
mask is the [n, m] tensor that long contexts cannot afford (SDPA turns it into a float mask per layer).

On CUDA it is `causal_lower_right` (flash / memory-efficient kernels, no mask; bf16 goes straight to the flash op that
`causal_lower_right` would pick). On CPU it is an additive mask that is never materialised: with the queries in
reverse order the mask depends only on (query + key index), so it is a [n, m] strided view of one (n + m - 1) vector,
which the CPU flash kernel reads in place (memory linear in m; tests/parallel/test_context_parallel.py checks the
values against a dense mask, tests/inference/test_long_prefill.py that no [n, m] tensor is created). The CUDA path has
not run on a GPU in this project's tests; `qwenlink plan` runs it on fake CUDA tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _strided_lower_right_mask(n: int, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The additive mask of lower-right causal attention for queries given in REVERSE order, [n, m], as a strided
    view.

    Query t (of n) may see key j (of m) iff j <= m - n + t. With the queries reversed (t' = n - 1 - t) that is
    t' + j <= m - 1, a function of t' + j alone: element (t', j) = u[t' + j] of one vector u of n + m - 1 values,
    i.e. `u.as_strided((n, m), (1, 1))`. Nothing of size n x m is allocated, and the keys (the larger side) are
    used in place; only the n queries and outputs are reversed (copies of O(n))."""
    u = torch.full((n + m - 1,), float("-inf"), dtype=dtype, device=device)
    u[:m] = 0
    return u.as_strided((n, m), (1, 1))


def lower_right_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of the last n of m positions: query t sees keys 0 .. m - n + t.

    q [B, Hq, n, D], k/v [B, Hkv, m, D] with m >= n -> [B, Hq, n, D]."""
    n, m = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if n == m:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if q.device.type == "cpu":
        mask = _strided_lower_right_mask(n, m, q.dtype, q.device)
        return F.scaled_dot_product_attention(q.flip(2), k, v, attn_mask=mask, enable_gqa=gqa).flip(2)
    if gqa:  # the lower-right flash / efficient kernels take equal head counts
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    from torch.nn.attention.bias import CausalVariant, causal_lower_right

    # The kernels `causal_lower_right` dispatches to, called directly so that fake tensors (the plan's simulation,
    # which cannot hold CausalBias' tensor subclass) run the same ops; CausalBias itself for other head sizes.
    if q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        if q.dtype in (torch.float16, torch.bfloat16):  # FlashAttention 2: causal is lower-right aligned
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal=True)[0]
        out = torch.ops.aten._efficient_attention_forward(  # [B, T, H, D] layout; fp32 on CUDA
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, None, None, None, 0.0,
            int(CausalVariant.LOWER_RIGHT), torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))[0]
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, m))


class LowerRightCausal:
    """What a model's attention receives as its mask when its queries are the last of its keys (a prefill chunk
    after the slots already cached): `models/qwen2.py` calls `attend` in place of its own kernel."""

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return lower_right_attention(q, k, v)  # [B, Hq, n, D]

"""An optional compiled decode step (`Engine(compile=True)`, `--compile`): static shapes, compiled once.

Eager decoding launches ~40 small kernels per layer, each with Python and dispatch overhead; compiling fuses them.
To compile once and never recompile, every shape is fixed: the step always runs all `max_batch` cache rows and
attends over the whole cache (slots past each row's position are masked). Rows without a request feed token 0 at the
cache's last slot, which no request ever writes or reads (the engine ends a request before its next slot reaches it).
On CUDA the step is captured as a CUDA graph (mode "reduce-overhead"). On CPU inductor's freezing folds the weights
in as constants and prepacks them for oneDNN (without freezing the compiled step is no faster than eager here), so
the compiled step assumes the weights no longer change.
"""

from __future__ import annotations

from typing import Callable

import torch

from qwenlink.models.qwen2 import KVCache, Qwen2Model

Tensor = torch.Tensor


def compile_decode_step(model: Qwen2Model, cache: KVCache) -> Callable[[Tensor, Tensor], Tensor]:
    """A function (tokens [B, 1], positions [B, 1]) -> final hidden states [B, H] over all B = cache.batch_size rows.

    The step stops before the head: the engine applies it, or for greedy rows only screens it (greedy_head.py)."""
    import torch._inductor.config as inductor_config

    span = cache.max_length
    device = next(iter(cache.keys.values())).device

    def decode_step(tokens: Tensor, positions: Tensor) -> Tensor:
        return model(tokens, kv_cache=cache, cache_positions=positions, cache_span=span, apply_head=False)[:, -1]

    if device.type == "cuda":
        # The cache is written in place by every step; marking it static lets the CUDA graph keep it as is (mutated
        # non-static inputs make inductor skip graph capture).
        for tensor in [*cache.keys.values(), *cache.values.values()]:
            torch._dynamo.mark_static_address(tensor)
        return torch.compile(decode_step, fullgraph=True, dynamic=False, mode="reduce-overhead")
    compiled = torch.compile(decode_step, fullgraph=True, dynamic=False)

    def run(tokens: Tensor, positions: Tensor) -> Tensor:
        # Freezing is read when the step compiles (its first call); `options={"freezing": True}` is not honoured.
        with inductor_config.patch(freezing=True):
            return compiled(tokens, positions)

    return run

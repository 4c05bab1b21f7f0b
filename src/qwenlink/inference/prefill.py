"""Chunked prefill: a prompt of up to the model's max positions (32K for Qwen1.5) written into the KV cache a chunk at a
time, so what a prefill holds at once grows linearly with the prompt, never with its square.

Why chunks: a one-shot prefill of L tokens holds every layer's activations for L tokens at once (the MLP's
[L, intermediate] is the largest) and, with a boolean causal mask, an [L, L] one per layer. A chunk of n tokens at
slots s..s+n-1 instead attends to the n + s keys already in the cache ending with its own: lower-right aligned causal
attention (models/attention.py), computed without an [n, s + n] mask. The result is the one-shot prefill's up to
float rounding (the attention sums keys in blocks either way): tests/inference/test_long_prefill.py holds the logits
equal at 1e-5 and the greedy tokens equal to transformers' generate.

Several prompts prefill together, right-padded to the longest: every row's chunk covers the same slots, so one
lower-right pattern serves the batch. A row leaves the batch once its prompt is done; the padding of a shorter row
only writes cache slots past its prompt, which its own decode steps overwrite before they attend to them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from qwenlink.errors import QwenlinkError
from qwenlink.models.qwen2 import KVCache, Qwen2Model

Tensor = torch.Tensor

DEFAULT_PREFILL_CHUNK = 2048  # tokens a prefill forward takes at once: big enough to keep the GEMMs efficient


def check_prefill_chunk(chunk: int, option: str = "--prefill-chunk") -> int:
    """The chunk size, or one line saying why not."""
    if not isinstance(chunk, int) or chunk < 1:
        raise QwenlinkError(f"{option} must be a positive number of tokens, got {chunk}")
    return chunk


def row_selector(rows: Sequence[int], device: torch.device) -> Tensor | slice:
    """Cache rows as the model takes them: a slice when consecutive (the cache is then read in place), else an index
    tensor [b] (the rows' keys and values are gathered, O(b x span) per layer)."""
    if list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(list(rows), dtype=torch.long, device=device)


@torch.inference_mode()
def prefill(model: Qwen2Model, prompts: Sequence[Sequence[int]], cache: KVCache, rows: Sequence[int], *,
            chunk: int = DEFAULT_PREFILL_CHUNK, start: int = 0) -> Tensor:
    """Write each prompt's keys and values at slots start.. of its cache row (rows[i]), `chunk` tokens per forward.

    Returns the final-normed hidden state at each prompt's last token: [b, H] (what lm_head reads for the first
    generated token). Slots before `start` must already hold the rows' prefix."""
    check_prefill_chunk(chunk, "prefill chunk")
    device = next(iter(cache.keys.values())).device
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    width = max(lengths)
    tokens = torch.zeros((len(prompts), width), dtype=torch.long)  # [b, P] right padded
    for i, prompt in enumerate(prompts):
        tokens[i, :lengths[i]] = torch.as_tensor(list(prompt), dtype=torch.long)
    last: list[Tensor | None] = [None] * len(prompts)
    for s in range(0, width, chunk):
        active = [i for i, n in enumerate(lengths) if n > s]  # rows whose prompt reaches this chunk
        e = min(s + chunk, max(lengths[i] for i in active))
        ids = tokens[active, s:e]  # [a, n]
        ends = torch.tensor([min(lengths[i], e) - 1 - s for i in active], device=device)  # [a] within the chunk
        hidden = model(ids.to(device), kv_cache=cache, cache_start=start + s,
                       cache_rows=row_selector([rows[i] for i in active], device),
                       logits_to_keep=ends, apply_head=False)[:, 0]  # [a, H]
        for j, i in enumerate(active):
            if lengths[i] <= e:
                last[i] = hidden[j]
    return torch.stack(last)  # [b, H]

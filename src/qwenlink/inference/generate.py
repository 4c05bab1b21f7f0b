"""Batched autoregressive generation with a static KV cache: prefill the prompts once, then one token per step.

Prompts of different lengths are left-padded to a common length so every sequence writes the same cache slot at each
step; a padding mask keeps pads invisible and positions are counted from each sequence's first real token (as HF
does), so a padded prompt produces exactly what it produces alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from qwenlink.models.qwen2 import KVCache, Qwen2Model

Tensor = torch.Tensor


@dataclass
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_ids: frozenset[int] = field(default_factory=frozenset)

    def validate(self) -> None:
        from qwenlink.errors import QwenlinkError

        if self.max_new_tokens < 1:
            raise QwenlinkError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise QwenlinkError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise QwenlinkError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise QwenlinkError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """One sequence's result: generated tokens (including the stop token if one ended it)."""

    tokens: list[int]
    finish_reason: str  # "stop" or "length"


@dataclass
class GenerationStats:
    prefill_seconds: float
    decode_seconds: float
    prompt_tokens: int
    generated_tokens: int

    @property
    def decode_tokens_per_second(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def next_token(logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> Tensor:
    """logits [B, V] -> token ids [B]: argmax, or a sample after temperature, top-k and top-p filtering."""
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[..., -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop tokens once the mass *before* them already reaches top_p (the most likely token always stays).
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Qwen2Model, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
             pad_id: int = 0) -> tuple[list[Generation], GenerationStats]:
    """Generate continuations for a batch of tokenised prompts."""
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        from qwenlink.errors import QwenlinkError

        raise QwenlinkError("every prompt must contain at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    bsz, prompt_len = len(prompts), max(len(p) for p in prompts)
    total = prompt_len + params.max_new_tokens
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    tokens = torch.full((bsz, prompt_len), pad_id, dtype=torch.long, device=device)  # [B, P] left padded
    mask = torch.zeros((bsz, total), dtype=torch.long, device=device)  # [B, P + N] 1 = real token
    for i, p in enumerate(prompts):
        tokens[i, prompt_len - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
        mask[i, prompt_len - len(p):prompt_len] = 1
    positions = (mask[:, :prompt_len].cumsum(-1) - 1).clamp(min=0)  # [B, P]
    cache = KVCache(model.config, bsz, total, dtype=dtype, device=device, layer_ids=list(model.layers.keys()))

    start = time.perf_counter()
    logits = model(tokens, position_ids=positions, attention_mask=mask[:, :prompt_len], kv_cache=cache,
                   logits_to_keep=1)  # [B, 1, V]
    prefill_time = time.perf_counter() - start

    out: list[list[int]] = [[] for _ in range(bsz)]
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(params.stop_ids), dtype=torch.long, device=device)
    last_pos = positions[:, -1:]  # [B, 1]
    start = time.perf_counter()
    for step in range(params.max_new_tokens):
        nxt = next_token(logits[:, -1], params, generator)  # [B]
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        for i, t in enumerate(nxt.tolist()):
            if not finished[i]:
                out[i].append(t)
        finished |= torch.isin(nxt, stop) if stop.numel() else torch.zeros_like(finished)
        if bool(finished.all()) or step == params.max_new_tokens - 1:
            break
        slot = prompt_len + step
        mask[:, slot] = 1  # the token being fed occupies this slot in every row
        last_pos = last_pos + 1
        logits = model(nxt[:, None], position_ids=last_pos, attention_mask=mask[:, :slot + 1], kv_cache=cache,
                       cache_start=slot)  # [B, 1, V]
    decode_time = time.perf_counter() - start

    results = [Generation(tokens=t, finish_reason="stop" if t and t[-1] in params.stop_ids else "length")
               for t in out]
    stats = GenerationStats(prefill_time, decode_time, sum(len(p) for p in prompts), sum(len(t) for t in out))
    return results, stats

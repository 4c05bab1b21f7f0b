"""Choosing the next token: greedy, temperature, top-k, top-p, repetition penalty, seeded per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from qwenlink.errors import QwenlinkError

Tensor = torch.Tensor


@dataclass
class SamplingParams:
    """How one request's tokens are chosen and when it stops. temperature 0 means greedy (argmax)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise QwenlinkError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise QwenlinkError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise QwenlinkError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise QwenlinkError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise QwenlinkError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop_strings):
            raise QwenlinkError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(scores: Tensor, seen: Sequence[int], penalty: float) -> Tensor:
    """HF/CTRL repetition penalty on one row [V]: seen tokens' positive scores are divided, negative multiplied."""
    if penalty == 1.0 or not seen:
        return scores
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long, device=scores.device)
    picked = scores[idx]
    scores = scores.clone()
    scores[idx] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores


def filter_top_k_top_p(scores: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set scores [..., V] outside the top-k / nucleus to -inf (the most likely token always survives)."""
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]  # [..., 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token once the mass of the tokens before it already reaches top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sample_token(logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator],
                 seen: Sequence[int] = ()) -> int:
    """logits [V] of one sequence -> the chosen token id."""
    scores = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return int(scores.argmax())
    scores = filter_top_k_top_p(scores / params.temperature, params.top_k, params.top_p)
    return int(torch.multinomial(scores.softmax(dim=-1), 1, generator=generator))

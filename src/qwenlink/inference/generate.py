"""Offline batched generation: run a list of tokenised prompts through the engine and collect the results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from qwenlink.errors import QwenlinkError
from qwenlink.inference.engine import Engine, EngineStats, Request
from qwenlink.inference.prefill import DEFAULT_PREFILL_CHUNK
from qwenlink.inference.sampling import SamplingParams
from qwenlink.models.qwen2 import Qwen2Model

__all__ = ["Generation", "SamplingParams", "generate"]


@dataclass
class Generation:
    """One sequence's result: generated tokens (including the stop token if one ended it) and their text."""

    tokens: list[int]
    finish_reason: str  # "stop" or "length"
    text: str = ""
    logprobs: Optional[list[float]] = None


GenerationStats = EngineStats


def generate(model: Qwen2Model, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             *, decode: Optional[Callable[[list[int]], str]] = None, max_batch: Optional[int] = None,
             pad_id: int = 0, prepack: bool = True, compile: bool = False,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> tuple[list[Generation], EngineStats]:
    """Generate continuations for tokenised prompts (all prefilled together, then decoded step by step).

    `params` is shared by all prompts or given per prompt; `decode` (token ids -> text) enables stop strings and
    fills `Generation.text`. pad_id is accepted for API stability; the engine never feeds padding to the model.
    prepack, compile, prefill_chunk: see `Engine` (oneDNN-prepacked linear weights on CPU; a compiled decode step;
    prompt tokens a prefill forward takes). The cache is sized to the requests: rows of the longest prompt +
    max_new_tokens slots, not of the model's max positions.
    """
    if not prompts:
        raise QwenlinkError("no prompts given")
    per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    longest = max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, per_prompt))
    engine = Engine(model, max_batch=max_batch or len(prompts),
                    max_length=min(longest, model.config.max_position_embeddings), prepack=prepack, compile=compile,
                    prefill_chunk=prefill_chunk)
    requests = [Request(list(p), sp, decode=decode) for p, sp in zip(prompts, per_prompt)]
    engine.run(requests)
    results = [Generation(r.tokens, r.finish_reason or "length", r.text, r.logprobs if r.params.logprobs else None)
               for r in requests]
    return results, engine.stats

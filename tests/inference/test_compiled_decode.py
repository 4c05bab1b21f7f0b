"""The compiled decode step (`Engine(compile=True)`): eager's tokens in fp32, eager's states to rounding in bf16."""

from __future__ import annotations

import pytest
import torch

from qwenlink.errors import QwenlinkError
from qwenlink.inference.engine import Engine, Request
from qwenlink.inference.sampling import SamplingParams
from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model


def _model():
    return build_model(get_preset("test-tiny"), seed=0).eval()


def _run(engine: Engine, schedule: list[tuple[int, list[int], SamplingParams]]) -> list[list[int]]:
    """Submit each prompt at its step (requests join mid-flight), step until all end; returns their tokens."""
    requests, step = [], 0
    pending = sorted(schedule, key=lambda item: item[0])
    while pending or any(not r.done for r in requests):
        while pending and pending[0][0] <= step:
            _, prompt, params = pending.pop(0)
            requests.append(engine.submit(Request(prompt, params)))
        engine.step()
        step += 1
    return [r.tokens for r in requests]


def test_compiled_decoding_equals_eager_with_rows_joining_and_leaving():
    greedy = SamplingParams(max_new_tokens=10)
    schedule = [(0, [5, 17, 42, 99, 3], greedy), (0, [7, 8], SamplingParams(max_new_tokens=4)),
                (3, [250, 11, 12, 13, 14], greedy), (5, [1], SamplingParams(max_new_tokens=6, temperature=0.8, seed=2)),
                (6, [9, 9, 9], greedy)]
    eager = _run(Engine(_model(), max_batch=3, max_length=48, prepack=False), schedule)
    compiled = _run(Engine(_model(), max_batch=3, max_length=48, compile=True), schedule)
    assert compiled == eager and all(eager)


def test_compiled_decoding_runs_to_the_context_limit():
    """A request ending at the context length never touches the last slot idle rows write into."""
    prompts = [[3, 4, 5, 6], [8]]
    params = SamplingParams(max_new_tokens=20)
    eager = _run(Engine(_model(), max_batch=3, max_length=24, prepack=False), [(0, p, params) for p in prompts])
    compiled = _run(Engine(_model(), max_batch=3, max_length=24, compile=True), [(0, p, params) for p in prompts])
    assert compiled == eager
    assert len(eager[0]) == 20 and len(eager[1]) == 20


def test_compiled_engine_with_the_smallest_cache():
    """max_length 2 (what `generate` sizes for a 1-token prompt and 1 new token): the warm-up compile still works."""
    engine = Engine(_model(), max_batch=1, max_length=2, compile=True)
    eager = Engine(_model(), max_batch=1, max_length=2, prepack=False)
    assert _run(engine, [(0, [42], SamplingParams(max_new_tokens=1))]) == \
        _run(eager, [(0, [42], SamplingParams(max_new_tokens=1))])


def test_compiled_decoding_refuses_sharded_models(monkeypatch):
    model = _model()
    weight = next(model.parameters())
    monkeypatch.setattr(type(weight), "to_local", lambda self: self, raising=False)
    with pytest.raises(QwenlinkError, match="tensor-parallel"):
        Engine(model, compile=True)


def test_compiled_bf16_step_matches_eager_at_every_span_without_recompiling():
    """The bf16 step (inductor's C++ GEMMs, concatenated projections) agrees with the eager model to bf16 rounding,
    and attention spans of different lengths reuse one compiled graph."""
    from torch._dynamo.utils import counters

    from qwenlink.inference.compiled import compile_decode_step
    from qwenlink.models.qwen2 import KVCache

    model = build_model(get_preset("test-tiny"), seed=0, dtype=torch.bfloat16).eval()
    config = model.config
    prompts = torch.randint(0, config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    cache = KVCache(config, 3, 32, dtype=torch.bfloat16, device="cpu")
    with torch.inference_mode():
        model(prompts, kv_cache=cache, cache_positions=torch.arange(12).expand(3, 12), apply_head=False)
        reference_cache = KVCache(config, 3, 32, dtype=torch.bfloat16, device="cpu")
        reference_cache.keys = {k: v.clone() for k, v in cache.keys.items()}
        reference_cache.values = {k: v.clone() for k, v in cache.values.items()}
        step = compile_decode_step(model, cache)
        graphs_before = counters["stats"]["unique_graphs"]
        for positions in ([12, 5, 9], [13, 6, 10], [20, 21, 3]):  # spans 13, 14 and 22 (rows write ahead freely)
            tokens = torch.tensor([[7], [100], [250]])
            slots = torch.tensor(positions)[:, None]
            got = step(tokens, slots, max(positions) + 1)  # [3, H]
            expected = model(tokens, kv_cache=reference_cache, cache_positions=slots, apply_head=False)[:, -1]
            torch.testing.assert_close(got.float(), expected.float(), rtol=3e-2, atol=3e-2)
        assert counters["stats"]["unique_graphs"] - graphs_before == 1

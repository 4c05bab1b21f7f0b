"""Batched sampling: draws follow the intended distribution, filters hold, rows and seeds stay independent."""

from __future__ import annotations

import math

import torch

from qwenlink.inference.generate import generate
from qwenlink.inference.sampling import SamplingParams, draw, sample_rows
from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_draw_matches_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.15, 0.0, 0.1, 0.05])  # zeros must never come out
    generator = torch.Generator().manual_seed(0)
    n = 20000
    samples = torch.tensor([draw(probs[None], [generator])[0] for _ in range(n)])
    counts = torch.bincount(samples, minlength=len(probs)).double()
    assert counts[1] == 0 and counts[4] == 0
    # 4 degrees of freedom (5 non-zero classes - 1): P(chi2 > 18.47) = 0.001.
    assert _chi_square(counts, probs.double()) < 18.47


def test_draw_over_a_full_vocabulary_matches_multinomial_statistics():
    torch.manual_seed(1)
    logits = torch.randn(151936) * 3
    probs = logits.softmax(-1)
    top = probs.topk(5).indices
    generator = torch.Generator().manual_seed(1)
    n = 1000
    samples = torch.tensor(draw(probs.expand(n, -1), [generator] * n))
    # The mass of the five most likely tokens, estimated from the draws, within 4 standard errors.
    p_top = float(probs[top].sum())
    hit = float(torch.isin(samples, top).double().mean())
    assert abs(hit - p_top) < 4 * math.sqrt(p_top * (1 - p_top) / n)


def test_rows_are_independent_of_their_batch():
    torch.manual_seed(2)
    logits = torch.randn(4, 300)
    params = [SamplingParams(temperature=0.7), SamplingParams(), SamplingParams(temperature=1.3, top_k=20),
              SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.2)]
    seen = [(), (), (), (3, 4, 5)]

    def gens():
        return [torch.Generator().manual_seed(10 + i) for i in range(4)]

    together = [sample_rows(logits, params, gens(), seen) for _ in range(3)]
    assert together[0] == together[1] == together[2]
    alone = [sample_rows(logits[i:i + 1], [params[i]], [gens()[i]], [seen[i]])[0] for i in range(4)]
    assert together[0] == alone
    assert together[0][1] == int(logits[1].argmax())  # temperature 0: greedy


def test_filters_limit_the_candidates():
    torch.manual_seed(3)
    logits = torch.randn(1, 500)
    generator = torch.Generator().manual_seed(0)
    top5 = set(logits[0].topk(5).indices.tolist())
    picks = {sample_rows(logits, [SamplingParams(temperature=2.0, top_k=5)], [generator], [()])[0]
             for _ in range(300)}
    assert picks <= top5 and len(picks) > 1
    nucleus = sample_rows(logits, [SamplingParams(temperature=1.0, top_p=1e-6)], [generator], [()])[0]
    assert nucleus == int(logits[0].argmax())


def test_seeded_generation_does_not_depend_on_batch_mates():
    model = build_model(get_preset("test-tiny"), seed=0).eval()
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11)
    alone, _ = generate(model, [[5, 6, 7]], params)
    batched, _ = generate(model, [[5, 6, 7], [9, 9], [1, 2, 3, 4]],
                          [params, SamplingParams(max_new_tokens=8, temperature=0.5, seed=3), SamplingParams(8)])
    assert batched[0].tokens == alone[0].tokens


def test_non_finite_knobs_and_huge_seeds_are_refused_and_tiny_temperatures_are_greedy():
    """Issue 22: NaN passed every `<` check and sampled garbage; 1e-45 became 0 in fp32 and divided by zero."""
    import pytest

    from qwenlink.errors import QwenlinkError

    for field in ("temperature", "top_p", "repetition_penalty"):
        with pytest.raises(QwenlinkError, match=f"{field} must be a finite number"):
            SamplingParams(**{field: float("nan")}).validate()
    with pytest.raises(QwenlinkError, match="seed"):
        SamplingParams(seed=2**64).validate()
    SamplingParams(seed=2**64 - 1).validate()
    tiny = SamplingParams(temperature=1e-45)
    assert tiny.greedy
    logits = torch.randn(2, 50)
    assert sample_rows(logits, [tiny, tiny], [None, None], [(), ()]) == logits.argmax(dim=-1).tolist()

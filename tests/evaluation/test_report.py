"""Aggregation arithmetic on hand-made results, the published-figure comparison, and the table."""

from __future__ import annotations

import pytest

from qwenlink.evaluation.report import SubjectScore, aggregate, comparison_line, format_table, model_size
from qwenlink.models.presets import get_preset

SCORES = [
    SubjectScore("algebra", "STEM", n=10, correct=9),  # 0.9
    SubjectScore("physics", "STEM", n=90, correct=45),  # 0.5
    SubjectScore("law", "humanities", n=50, correct=10),  # 0.2
]


def test_micro_and_macro_by_hand():
    r = aggregate(SCORES, ["STEM", "humanities", "other"])
    assert r["subjects"]["physics"] == {"category": "STEM", "acc": 0.5, "n": 90, "correct": 45}
    stem = r["categories"]["STEM"]
    assert stem["acc"] == pytest.approx(54 / 100)  # pooled questions: (9 + 45) / (10 + 90)
    assert stem["macro_acc"] == pytest.approx((0.9 + 0.5) / 2)  # mean of subject accuracies
    assert (stem["n"], stem["correct"], stem["subjects"]) == (100, 54, 2)
    assert r["overall"]["acc"] == pytest.approx(64 / 150)
    assert r["overall"]["macro_acc"] == pytest.approx((0.9 + 0.5 + 0.2) / 3)
    assert list(r["categories"]) == ["STEM", "humanities"]  # given order; empty "other" left out


def test_lm_eval_group_weighting_is_micro():
    """lm-eval's group score with weight_by_size is the size-weighted mean of subject scores, i.e. our micro."""
    from lm_eval.api.metrics import aggregate_subtask_metrics

    accs = [s.acc for s in SCORES]
    sizes = [s.n for s in SCORES]
    assert aggregate(SCORES)["overall"]["acc"] == pytest.approx(aggregate_subtask_metrics(accs, sizes, True))
    assert aggregate(SCORES)["overall"]["macro_acc"] == pytest.approx(aggregate_subtask_metrics(accs, sizes, False))


def test_known_sizes_and_comparison_line():
    assert model_size(get_preset("qwen1.5-7b")) == "7b"
    assert model_size(get_preset("qwen1.5-1.8b")) == "1.8b"
    assert model_size(get_preset("qwen1.5-32b")) == "32b"  # differs from 14b only in ffn, layers and kv heads
    assert model_size(get_preset("qwen-tiny")) is None
    line = comparison_line("mmlu", "7b", 0.603, 5)
    assert line == "Qwen1.5-7B published MMLU (5-shot): 61.0; this run: 60.3 (-0.7)"
    assert "note: this run is 0-shot" in comparison_line("ceval", "72b", 0.85, 0)
    assert comparison_line("mmlu", None, 0.5, 5) is None
    assert comparison_line("my-task", "7b", 0.5, 5) is None


def test_table_lists_subjects_categories_and_both_averages():
    text = format_table(aggregate(SCORES, ["STEM", "humanities"]), title="mmlu")
    assert "| physics | STEM | 90 | 50.00 |" in text
    assert "| STEM | 2 | 100 | 54.00 | 70.00 |" in text
    assert "| **overall** | 3 | 150 | 42.67 | 53.33 |" in text

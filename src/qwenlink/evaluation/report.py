"""Accuracy aggregation and reports: per subject, per category, overall micro and macro; JSON and a table.

Why both averages: lm-eval reports a group's accuracy weighted by question count (micro: all questions pooled), which
is what Qwen's and most published MMLU numbers are; the unweighted mean of subject accuracies (macro) is what some
papers and ModelLink-era scripts print instead, so both are shown and named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

# Qwen1.5 base models' published 5-shot accuracy (%), shared/reference/modellink-recipes.md.
PUBLISHED: dict[str, dict[str, float]] = {
    "mmlu": {"0.5b": 39.2, "1.8b": 46.8, "4b": 56.1, "7b": 61.0, "14b": 67.6, "32b": 73.4, "72b": 77.5, "110b": 80.4},
    "ceval": {"0.5b": 50.5, "1.8b": 59.7, "4b": 67.6, "7b": 74.1, "14b": 78.7, "32b": 83.5, "72b": 84.1,
              "110b": 89.1},
}
PUBLISHED_SHOTS = 5


@dataclass(frozen=True)
class SubjectScore:
    name: str
    category: str
    n: int
    correct: int
    display_name: str = ""

    @property
    def acc(self) -> float:
        return self.correct / self.n if self.n else 0.0


def _group(scores: Sequence[SubjectScore]) -> dict[str, Any]:
    n = sum(s.n for s in scores)
    correct = sum(s.correct for s in scores)
    return {
        "acc": correct / n if n else 0.0,  # micro: every question counts once
        "macro_acc": sum(s.acc for s in scores) / len(scores) if scores else 0.0,  # every subject counts once
        "n": n,
        "correct": correct,
        "subjects": len(scores),
    }


def aggregate(scores: Sequence[SubjectScore], categories: Sequence[str] = ()) -> dict[str, Any]:
    """{"subjects": {name: {...}}, "categories": {cat: group}, "overall": group}; categories in the given order, then
    any others in order of appearance. Empty categories are left out."""
    order = list(categories) + [c for c in dict.fromkeys(s.category for s in scores) if c not in categories]
    by_cat = {c: [s for s in scores if s.category == c] for c in order}
    return {
        "subjects": {s.name: {"category": s.category, "acc": s.acc, "n": s.n, "correct": s.correct,
                              **({"name": s.display_name} if s.display_name and s.display_name != s.name else {})}
                     for s in scores},
        "categories": {c: _group(members) for c, members in by_cat.items() if members},
        "overall": _group(scores),
    }


def model_size(config: Any) -> Optional[str]:
    """The Qwen1.5 size ("7b") whose architecture the model has (a preset name resolves to it too), else None.

    Matching the shape rather than a name means an HF directory of Qwen1.5-7B is recognised whatever it is called,
    and a directory merely named "7b" is not."""
    from qwenlink.models.presets import PRESETS

    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads")
    for name, preset in PRESETS.items():
        if name.startswith("qwen1.5-") and all(getattr(config, f, None) == getattr(preset, f) for f in fields):
            return name.removeprefix("qwen1.5-")
    return None


def comparison_line(task: str, size: Optional[str], acc: float, shots: int) -> Optional[str]:
    """'Qwen1.5-7B published MMLU (5-shot): 61.0; this run: 60.3 (-0.7)', or None when there is nothing to compare."""
    if size is None or size not in PUBLISHED.get(task, {}):
        return None
    published = PUBLISHED[task][size]
    ours = 100 * acc
    note = "" if shots == PUBLISHED_SHOTS else f"; note: this run is {shots}-shot"
    label = {"mmlu": "MMLU", "ceval": "C-Eval"}.get(task, task)
    return (f"Qwen1.5-{size.upper()} published {label} ({PUBLISHED_SHOTS}-shot): {published:.1f}; "
            f"this run: {ours:.1f} ({ours - published:+.1f}){note}")


def format_table(results: dict[str, Any], *, title: str = "") -> str:
    """A Markdown table (readable as plain text): subjects, then categories, then the two overall averages."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| subject | category | questions | accuracy |", "|---|---|---:|---:|"]
    for name, s in results["subjects"].items():
        label = f"{name} ({s['name']})" if "name" in s else name
        lines.append(f"| {label} | {s['category']} | {s['n']} | {100 * s['acc']:.2f} |")
    lines += ["", "| category | subjects | questions | accuracy (micro) | accuracy (macro) |", "|---|---:|---:|---:|---:|"]
    for cat, g in results["categories"].items():
        lines.append(f"| {cat} | {g['subjects']} | {g['n']} | {100 * g['acc']:.2f} | {100 * g['macro_acc']:.2f} |")
    o = results["overall"]
    lines.append(f"| **overall** | {o['subjects']} | {o['n']} | {100 * o['acc']:.2f} | {100 * o['macro_acc']:.2f} |")
    return "\n".join(lines) + "\n"

"""Helpers shared by the data-pipeline tests (a module of its own: `conftest` names are ambiguous)."""

from __future__ import annotations

import json
from pathlib import Path

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Megatron indexed datasets store token ids back to back.",
    "",
    "你好，世界！这是一个测试。",
    "Short.",
    "A longer document " * 20,
    "Numbers 12345 and symbols #$%&.",
    "Line one\nLine two\n\nLine four",
]



def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path

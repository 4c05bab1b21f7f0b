"""Shared fixtures for the data-pipeline tests: the real Qwen1.5 tokenizer, small corpora, a CLI runner."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

from qwenlink.tokenizer import Tokenizer, load_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return load_tokenizer("default")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def run_cli(capsys):
    """Run `qwenlink ...` in-process; returns (exit code, stdout, stderr)."""
    from qwenlink.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


@pytest.fixture(scope="session")
def megatron():
    """megatron-core's datasets package (a test dependency: the reference we must match)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset

"""Shared fixtures for the data-pipeline tests: the real Qwen1.5 tokenizer, small corpora, a CLI runner."""

from __future__ import annotations

import os
import warnings

import pytest

from qwenlink.tokenizer import Tokenizer, load_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return load_tokenizer("default")


@pytest.fixture
def cli(capsys):
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

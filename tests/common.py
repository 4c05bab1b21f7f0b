"""Helpers shared by the test suite (a uniquely named module: `conftest` names clash across test folders)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Interop fixtures (Megatron-LM converter outputs, tiny HF models and tokenizers, MMLU CSVs), committed with the
# repository; tests/fixtures/README.md says where each came from. The one place the test suite names this folder.
FIXTURES = REPO / "tests" / "fixtures"


def fixture_dir(*parts: str) -> Path:
    """A path under tests/fixtures. The fixtures are part of the repository, so a missing one fails the test."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"interop fixture {path} is missing (tests/fixtures is committed with the repository)",
                    pytrace=False)
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `qwenlink ARGS...` in a fresh interpreter, as a user would, capturing output."""
    return subprocess.run([sys.executable, "-m", "qwenlink.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def write_counting_corpus(root: Path, documents: int) -> str:
    """A pretraining corpus with learnable structure: each document counts up modulo 50 from a random start (ids
    10..59 of the test-tiny vocabulary), seeded. Returns the dataset prefix."""
    import numpy as np

    from qwenlink.data.indexed import write_documents

    rng = np.random.default_rng(0)
    docs = []
    for _ in range(documents):
        start, n = int(rng.integers(0, 50)), int(rng.integers(20, 60))
        docs.append([(start + i) % 50 + 10 for i in range(n)])
    prefix = str(Path(root) / "count_text_document")
    write_documents(prefix, docs, dtype=np.uint16)
    return prefix


def default_sigint() -> None:
    """`preexec_fn` for a child a test stops with SIGINT (Ctrl-C): a shell's background job (`make test &`)
    inherits SIGINT ignored, Python keeps an inherited SIG_IGN, and the child would never see the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

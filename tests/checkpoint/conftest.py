"""Fixtures for the checkpoint tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def cli_main(capsys):
    """Run `qwenlink ...` in-process; returns (exit code, stdout, stderr)."""
    from qwenlink.cli import main

    def run(*args) -> tuple[int, str, str]:
        rc = main([str(a) for a in args])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run

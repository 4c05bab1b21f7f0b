"""Fixtures shared by the fault-injection tests."""

from __future__ import annotations

import pytest

from reliability_helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("corpus"))

"""Suite-wide pytest setup: thread count and the fixtures every test folder may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from common import fixture_dir

# Tests run on 2 shared cores; more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_fixture_hf() -> Path:
    """The real HF Qwen2 directory (with its own BPE tokenizer) written by transformers."""
    return fixture_dir("megatron-core-tiny-qwen2", "hf")

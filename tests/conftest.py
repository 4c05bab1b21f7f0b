"""Suite-wide pytest setup: thread count and the fixtures every test folder may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from common import fixture_dir

# Tests run on 2 shared cores; more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Every process a test starts (torchrun ranks, CLI runs) prints its Python stacks if it dies of a fatal signal: rare
# native crashes of multi-process runs in CI (a rank's SIGSEGV inside a 4-process gloo run, a finished rank's SIGABRT
# at exit) otherwise leave only the launcher's "Signal 11 received" in the failing test's message.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture
def tiny_fixture_hf() -> Path:
    """The real HF Qwen2 directory (with its own BPE tokenizer) written by transformers."""
    return fixture_dir("megatron-core-tiny-qwen2", "hf")


@pytest.fixture(autouse=True)
def no_process_group_left_behind():
    """A bf16 job in this process opens a one-rank process group (FSDP2's precision policy needs a mesh) and keeps
    it, as a real run keeps torchrun's. Tests end it, so later tests start as a fresh process does: a test that forks
    (the kill tests) must not hand its child an initialised group whose transport threads did not survive the fork."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

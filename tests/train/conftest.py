"""Tiny indexed datasets (test-tiny vocabulary of 320 ids) and a config factory for trainer tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from common import write_counting_corpus
from qwenlink.data.indexed import IndexedDatasetWriter
from qwenlink.train.config import JobConfig, load_config


@pytest.fixture(scope="session")
def pretrain_prefix(tmp_path_factory) -> str:
    """A corpus with learnable structure: each document counts up modulo 50 from a random start."""
    return write_counting_corpus(tmp_path_factory.mktemp("pretrain"), 120)


@pytest.fixture(scope="session")
def sft_prefix(tmp_path_factory) -> str:
    """Instruction samples: a 'prompt' (labels -100) followed by a reply (labels = ids), like preprocess writes."""
    root = tmp_path_factory.mktemp("sft")
    rng = np.random.default_rng(1)
    prefix = root / "toy"
    writers = {k: IndexedDatasetWriter(f"{prefix}_packed_{k}_document", np.int32)
               for k in ("input_ids", "attention_mask", "labels")}
    for w in writers.values():
        w.__enter__()
    for _ in range(64):
        prompt = rng.integers(10, 300, int(rng.integers(4, 12))).tolist()
        reply = list(reversed(prompt[:4])) + [1]
        ids = prompt + reply
        writers["input_ids"].add_document(ids)
        writers["attention_mask"].add_document([1] * len(ids))
        writers["labels"].add_document([-100] * len(prompt) + reply)
    for w in writers.values():
        w.__exit__(None, None, None)
    return str(prefix)


@pytest.fixture
def make_config(tmp_path: Path, pretrain_prefix: str) -> Callable[..., JobConfig]:
    """A tiny CPU pretraining job writing under tmp_path; keyword `overrides` are `section.key=value` strings."""

    def make(*overrides: str, out: str = "run") -> JobConfig:
        base = [
            "--model.preset=test-tiny", f"--data.path={pretrain_prefix}", "--data.seq_length=16",
            "--train.micro_batch_size=2", "--train.global_batch_size=4", "--train.train_iters=6",
            "--train.device=cpu", "--optim.lr=5e-3", "--optim.min_lr=5e-4", "--optim.warmup_iters=1",
            f"--job.output_dir={tmp_path / out}", "--metrics.tensorboard=false", "--metrics.progress=lines",
        ]
        return load_config(None, base + [f"--{o}" if not o.startswith("--") else o for o in overrides])

    return make

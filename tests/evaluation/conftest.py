"""Fixtures for the evaluation tests: the MMLU CSVs in tests/fixtures, the fixture tokenizer, a tiny random HF model."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import fixture_dir


@pytest.fixture(scope="session")
def mmlu_data() -> Path:
    """The real MMLU CSVs in their original layout (dev + test)."""
    return fixture_dir("mmlu", "data")


@pytest.fixture(scope="session")
def fixture_tokenizer_dir() -> Path:
    """The small byte-level BPE tokenizer that came with the tiny HF Qwen2 fixture."""
    return fixture_dir("megatron-core-tiny-qwen2", "hf")


@pytest.fixture(scope="session")
def random_hf_model(tmp_path_factory, fixture_tokenizer_dir) -> Path:
    from eval_helpers import make_random_hf_model

    return make_random_hf_model(tmp_path_factory.mktemp("eval-model"), fixture_tokenizer_dir)


@pytest.fixture(scope="session")
def hflm(random_hf_model):
    """lm-eval's own HF model wrapper around transformers' Qwen2ForCausalLM: the reference scorer."""
    pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[test]')")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(random_hf_model), device="cpu", batch_size=4, dtype="float32")


@pytest.fixture(scope="session")
def qwenlink_model(random_hf_model):
    """The same HF directory loaded by qwenlink, with the same tokenizer."""
    from qwenlink.checkpoint.loader import load_model
    from qwenlink.tokenizer import Tokenizer

    loaded = load_model(str(random_hf_model))
    return loaded.model, Tokenizer.from_dir(random_hf_model)

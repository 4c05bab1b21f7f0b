"""Helpers for the checkpoint-conversion tests: tiny random models, tensor comparison, the in-process CLI."""

from __future__ import annotations

import pytest
import torch

from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2 import Qwen2Model, build_model


def random_model(*, layers: int = 8, heads: int = 8, kv_heads: int = 4, tied: bool = False, qkv_bias: bool = True,
                 vocab: int = 50, hidden: int = 32, ffn: int = 48, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> Qwen2Model:
    """A tiny model whose every tensor (norms and biases included) is random, so any mix-up changes values."""
    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         rope_theta=10000.0, tie_word_embeddings=tied, qkv_bias=qkv_bias,
                         model_type="qwen2" if qkv_bias else "llama")
    model = build_model(config, dtype=torch.float32, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.to(dtype)


def params(model: Qwen2Model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, shapes, dtypes and bits."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture
def cli_main(capsys):
    """Run `qwenlink ...` in-process; returns (exit code, stdout, stderr). Import it into a test module to use it."""
    from qwenlink.cli import main

    def run(*args) -> tuple[int, str, str]:
        rc = main([str(a) for a in args])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run

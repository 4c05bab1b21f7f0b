"""Shared pieces of the LoRA tests: a tiny HF Qwen2 on disk, the same model in qwenlink, adapters with non-zero B."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_helpers import make_hf_model
from qwenlink.checkpoint.hf import load_hf_model
from qwenlink.models.lora import LoraConfig, apply_lora, iter_lora_modules
from qwenlink.models.qwen2 import Qwen2Model

IDS = torch.tensor([[3, 17, 250, 9, 44, 101, 7, 64], [5, 5, 200, 31, 0, 12, 90, 150]])  # [2, 8], < vocab 320


def hf_base(tmp: Path, **kwargs):
    """(transformers model, its directory) of a random tiny Qwen2 (2 layers, GQA, q/k/v biases)."""
    return make_hf_model(tmp / "base", **kwargs)


def qwenlink_base(directory: Path) -> Qwen2Model:
    return load_hf_model(directory, dtype=torch.float32).eval()


@torch.no_grad()
def randomize_adapters(model: Qwen2Model, seed: int = 0, scale: float = 0.05) -> None:
    """Give every B (and A) random values so the adapter visibly changes outputs (at init B = 0 changes nothing)."""
    gen = torch.Generator().manual_seed(seed)
    for _, module in iter_lora_modules(model):
        module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * scale)
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * scale)


def lora_model(directory: Path, cfg: LoraConfig, seed: int = 0) -> Qwen2Model:
    model = apply_lora(qwenlink_base(directory), cfg)
    randomize_adapters(model, seed)
    return model.eval()

"""The single-process ground truth for LoRA under parallel layouts: the same spec as parallel_reference plus `lora`.

Adapters start with random A *and* B (not B = 0), so the adapters' forward and backward through every sharded
projection matter from the first step.
"""

from __future__ import annotations

import torch

from parallel_reference import make_config, make_initial_state, train_steps
from qwenlink.models.lora import LoraConfig, apply_lora, iter_lora_modules, trainable_parameters
from qwenlink.models.qwen2 import build_model


def lora_config(spec: dict) -> LoraConfig:
    return LoraConfig(**spec["lora"])


def make_lora_initial_state(spec: dict) -> dict[str, torch.Tensor]:
    """Base weights of parallel_reference plus random adapters, keyed like the LoRA model's state_dict()."""
    model = apply_lora(build_model(make_config(spec), seed=spec["seed"]), lora_config(spec))
    model.load_state_dict(make_initial_state(spec), strict=False)
    gen = torch.Generator().manual_seed(spec["seed"] + 7)
    with torch.no_grad():
        for _, module in iter_lora_modules(model):
            module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * 0.1)
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def lora_reference_run(spec: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses and final weights of the same LoRA steps on one process (only trainable parameters optimised)."""
    model = apply_lora(build_model(make_config(spec), seed=spec["seed"]), lora_config(spec))
    model.load_state_dict(make_lora_initial_state(spec))
    losses = train_steps(model, list(trainable_parameters(model)), spec)
    return losses, {k: v.clone() for k, v in model.state_dict().items()}

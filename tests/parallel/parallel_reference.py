"""The single-process ground truth for the parallel equivalence tests: model, data and optimizer from a spec."""

from __future__ import annotations

import torch

from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2 import build_model
from qwenlink.train.loss import model_loss

STEPS = 5


def make_config(spec: dict) -> ModelConfig:
    return ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=spec.get("layers", 4),
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       rope_theta=10000.0, tie_word_embeddings=spec.get("tied", False))


def make_initial_state(spec: dict) -> dict[str, torch.Tensor]:
    model = build_model(make_config(spec), seed=spec["seed"])
    with torch.no_grad():  # non-trivial norms so sequence-parallel norm gradients matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def make_batches(spec: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, 256, (spec["global_batch"], spec["seq"] + 1), generator=gen)
        labels = ids[:, 1:].clone()
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = -100  # masked positions, as in SFT
        out.append((ids[:, :-1].contiguous(), labels))
    return out


def optimizer_for(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)


def train_steps(model, params: list, spec: dict) -> list[float]:
    """STEPS optimizer steps of `params` on the spec's batches (accumulating micro batches); the loss of each step."""
    optimizer = optimizer_for(params)
    losses = []
    micro = spec["micro_batch"]
    for ids, labels in make_batches(spec):
        valid = int((labels != -100).sum())
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, ids.shape[0], micro):
            loss, _ = model_loss(model, ids[i:i + micro], labels[i:i + micro], scale=1.0 / valid, chunk_size=64)
            loss.backward()
            total += float(loss.detach())
        losses.append(total)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return losses


def reference_run(spec: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses and final weights of the same steps on one process, without any parallelism."""
    model = build_model(make_config(spec), seed=spec["seed"])
    model.load_state_dict(make_initial_state(spec))
    losses = train_steps(model, list(model.parameters()), spec)
    return losses, {k: v.clone() for k, v in model.state_dict().items()}

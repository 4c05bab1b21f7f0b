"""The single-process ground truth of the expert-parallel tests: a tiny Qwen1.5-MoE, its batches, and the trainer's
own step (LM loss + router aux loss, train/moe.py) in one process without any parallelism."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from parallel_reference import optimizer_for

from qwenlink.models.config import ModelConfig
from qwenlink.models.lora import LoraConfig, apply_lora, iter_lora_modules
from qwenlink.models.qwen2 import build_model
from qwenlink.models.qwen2_moe import set_expert_impl
from qwenlink.train.data import MicroBatch

STEPS = 3


def make_moe_config(spec: dict) -> ModelConfig:
    """8 experts top-2 (a larger aux coefficient than Qwen's 0.001, so the router's gradient carries it visibly)."""
    return ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=spec.get("layers", 2),
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                       tie_word_embeddings=False, model_type="qwen2_moe", num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48, router_aux_loss_coef=0.02)


def adapt(spec: dict) -> Optional[Callable[[torch.nn.Module], None]]:
    """spec["lora"] (LoraConfig fields): LoRA adapters added to the meta model as the trainer adds them."""
    if "lora" not in spec:
        return None
    return lambda model: apply_lora(model, LoraConfig(**spec["lora"]))


def make_moe_initial_state(spec: dict) -> dict[str, torch.Tensor]:
    """Random weights with a sharper router (so tokens spread unevenly over the experts and over the ep ranks).
    spec["router"] = "zeros": a router of zeros, whose tied probabilities send every token to experts 5 and 6 in the
    first step (at ep2 both on rank 1: rank 0 receives no row at all). With spec["lora"], random adapters A and B
    (B not 0, so the experts' adapters change the forward from the first step)."""
    model = build_model(make_moe_config(spec), seed=spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"] + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                sharp = torch.randn(p.shape, generator=gen) * 0.5
                p.copy_(torch.zeros(p.shape) if spec.get("router") == "zeros" else sharp)
            elif name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        if "lora" in spec:
            adapt(spec)(model)
            for _, module in iter_lora_modules(model):
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * 0.1)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def make_moe_batches(spec: dict) -> list[list[MicroBatch]]:
    """STEPS global batches of spec["global_batch"] rows x spec["seq"] tokens in micro batches of spec["micro_batch"]
    rows, 20% of the labels ignored. spec["padded"]: right-padded SFT rows instead, 4 tokens narrower than seq (a
    pipeline pads them to seq) and each row's last 0-5 tokens pads (no label, token mask 0: left out of aux)."""
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    rows, seq, micro = spec["global_batch"], spec["seq"], spec["micro_batch"]
    width = seq - 4 if spec.get("padded") else seq
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, 256, (rows, width + 1), generator=gen)
        labels = ids[:, 1:].clone()
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = -100
        ids = ids[:, :-1].contiguous()
        mask = None
        if spec.get("padded"):
            pads = torch.randint(0, 6, (rows, 1), generator=gen)  # [rows, 1]
            mask = (torch.arange(width)[None] < width - pads).long()  # [rows, width] 1 = real token
            ids[mask == 0], labels[mask == 0] = 0, -100
        out.append([MicroBatch(ids[i:i + micro], labels[i:i + micro],
                               token_mask=None if mask is None else mask[i:i + micro]) for i in range(0, rows, micro)])
    return out


def train_moe(step, chunks, layout, spec: dict) -> list[tuple[float, float, list, float]]:
    """The spec's optimizer steps through a TrainStep (any layout: each dp replica takes its slice of every global
    batch); returns (LM loss, aux loss, expert load [layers][E], gradient norm) per step, the same on every rank."""
    optimizer = optimizer_for([p for p in chunks.parameters() if p.requires_grad])
    out = []
    for batches in make_moe_batches(spec):
        per_dp = len(batches) // layout.plan.dp
        mine = batches[layout.dp_rank * per_dp:(layout.dp_rank + 1) * per_dp]
        optimizer.zero_grad(set_to_none=True)
        total = step.count_valid(mine)
        loss = step.forward_backward(mine, total)
        aux = step.router_aux.step_mean(total)
        load = step.router_aux.step_load.tolist()  # tokens per expert per sparse layer, summed over all ranks
        norm = step.clip_grad_norm_(1.0)  # every gradient counted once, whichever ranks hold copies of it
        optimizer.step()
        out.append((float(loss), float(aux), load, float(norm)))
    return out


def reference_run(spec: dict) -> tuple[list[tuple[float, float, list, float]], dict[str, torch.Tensor]]:
    """Losses and final weights in one process, through the trainer's step (tests/train/test_moe_train.py holds that
    step to transformers' loss + coef x aux)."""
    from qwenlink.parallel.mesh import ParallelPlan
    from qwenlink.parallel.parallelize import ParallelizeOptions, build_layout, build_model_chunks
    from qwenlink.train.moe import RouterAuxLoss
    from qwenlink.train.step import TrainStep

    set_expert_impl(spec.get("impl", "auto"))
    config = make_moe_config(spec)
    layout = build_layout(ParallelPlan(), torch.device("cpu"), config)
    chunks = build_model_chunks(config, layout, ParallelizeOptions(), adapt=adapt(spec))
    chunks.materialize(torch.device("cpu"))
    chunks.modules[0].load_state_dict(make_moe_initial_state(spec))
    step = TrainStep(chunks, layout, chunk_size=1024, seq_length=spec["seq"], pad_id=0)
    step.router_aux = RouterAuxLoss.for_model(chunks.state_module, config)
    losses = train_moe(step, chunks, layout, spec)
    return losses, {k: v.detach().clone() for k, v in chunks.modules[0].state_dict().items()}

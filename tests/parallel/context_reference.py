"""The single-process ground truth of the context-parallel tests: batches with or without documents (positions and
attention restarting inside each row), and their training steps in one process without any parallelism."""

from __future__ import annotations

import torch

from lora_reference import lora_config, make_lora_initial_state
from parallel_reference import make_config, make_initial_state, optimizer_for

from qwenlink.models.documents import DocumentMask
from qwenlink.models.lora import apply_lora, trainable_parameters
from qwenlink.models.qwen2 import build_model
from qwenlink.train.data import MicroBatch
from qwenlink.train.loss import model_loss

STEPS = 3


def make_batches(spec: dict) -> list[list[MicroBatch]]:
    """STEPS global batches of spec["global_batch"] rows x spec["seq"] tokens, as micro batches of spec["micro_batch"]
    rows. With spec["documents"], every row holds 4 documents of random lengths (their boundaries fall inside and
    across the cp chunks) with restarting positions, as data.reset_attention_mask / reset_position_ids make them."""
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    rows, seq, micro = spec["global_batch"], spec["seq"], spec["micro_batch"]
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, 256, (rows, seq + 1), generator=gen)
        labels = ids[:, 1:].clone()
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = -100
        ids = ids[:, :-1].contiguous()
        positions = docs = None
        if spec.get("documents"):
            starts = torch.zeros(rows, seq, dtype=torch.bool)
            for r in range(rows):
                starts[r, torch.randperm(seq - 1, generator=gen)[:3] + 1] = True
            docs = DocumentMask.from_starts(starts)
            positions = docs.positions()
        batches = []
        for i in range(0, rows, micro):
            part = slice(i, i + micro)
            mask = None if docs is None else DocumentMask(docs.doc_ids[part], docs.bounds[part])
            batches.append(MicroBatch(ids[part], labels[part], None if positions is None else positions[part], mask))
        out.append(batches)
    return out


def initial_state(spec: dict) -> dict[str, torch.Tensor]:
    """The full model's starting weights, with random LoRA adapters when spec["lora"] is given."""
    return make_lora_initial_state(spec) if spec.get("lora") else make_initial_state(spec)


def reference_run(spec: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses and final weights of the spec's steps in one process (global-batch mean loss, clip 1.0, AdamW over the
    trainable parameters)."""
    model = build_model(make_config(spec), seed=spec["seed"])
    if spec.get("lora"):
        model = apply_lora(model, lora_config(spec))
    model.load_state_dict(initial_state(spec))
    params = list(trainable_parameters(model)) if spec.get("lora") else list(model.parameters())
    optimizer = optimizer_for(params)
    losses = []
    for batches in make_batches(spec):
        valid = sum(int((b.labels != -100).sum()) for b in batches)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for b in batches:
            loss, _ = model_loss(model, b.input_ids, b.labels, scale=1.0 / valid, chunk_size=64,
                                 position_ids=b.position_ids, attention_mask=b.attention_mask)
            loss.backward()
            total += float(loss.detach())
        losses.append(total)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return losses, {k: v.clone() for k, v in model.state_dict().items()}

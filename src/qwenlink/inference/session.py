"""Loading a model + tokenizer for inference commands (generate, chat, serve) from one `--model` argument."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from qwenlink.device import resolve_device
from qwenlink.errors import QwenlinkError
from qwenlink.models.loader import load_model
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.tokenizer import Tokenizer, load_tokenizer

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class InferenceSession:
    model: Qwen2Model
    tokenizer: Tokenizer
    name: str
    rank: int = 0  # under torchrun: this process's rank; only rank 0 prints results
    world_size: int = 1


def pick_tokenizer(tokenizer_spec: str | None, model_tokenizer_dir) -> Tokenizer:
    """An explicit --tokenizer wins, then the model directory's own tokenizer, then the embedded Qwen vocabulary."""
    if tokenizer_spec is not None:
        return load_tokenizer(tokenizer_spec)
    if model_tokenizer_dir is not None:
        return Tokenizer.from_dir(model_tokenizer_dir)
    return Tokenizer.default()


def check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """A tokenizer producing ids beyond the model's embedding would index out of range mid-run: refuse early."""
    if tokenizer.vocab_size > vocab_size:
        raise QwenlinkError(f"{where}: tokenizer {tokenizer.source or ''} has {tokenizer.vocab_size} ids but the "
                            f"model's vocab_size is {vocab_size}")


def open_session(model: str, *, tokenizer: str | None = None, device: str | None = None, dtype: str = "fp32",
                 seed: int = 0, lora: str | None = None) -> InferenceSession:
    """Load the model (HF dir or preset) and its tokenizer, and check they agree on the vocabulary.

    `lora`: a PEFT adapter directory applied on top (unmerged), validated against the model first: an adapter that
    does not fit is an error, never silently skipped.
    """
    dev = resolve_device(device)
    if dtype not in _DTYPES:
        raise QwenlinkError(f"unknown dtype {dtype!r} (expected fp32, bf16 or fp16)")
    loaded = load_model(model, device=dev, dtype=_DTYPES[dtype], seed=seed)
    if lora is not None:
        from qwenlink.checkpoint.peft import apply_peft_adapter

        adapter = apply_peft_adapter(loaded.model, lora)
        saved = "/".join(adapter.lora.saved_modules())
        print(f"applied LoRA adapter {lora} (r={adapter.lora.r}, {len(adapter.modules)} projections"
              f"{', modules_to_save ' + saved if saved else ''})", file=sys.stderr)
    tok = pick_tokenizer(tokenizer, loaded.tokenizer_dir)
    check_vocab(tok, loaded.model.config.vocab_size, model)
    loaded.model.eval()
    rank, world = _tensor_parallel(loaded.model, dev)
    return InferenceSession(loaded.model, tok, model.rstrip("/").split("/")[-1], rank, world)


def _tensor_parallel(model: Qwen2Model, device) -> tuple[int, int]:
    """Under torchrun, shard the model over all processes (tensor parallel, full logits on every rank).

    Every rank then runs the same engine loop on the same requests: greedy and seeded sampling see identical logits,
    so the ranks stay in lockstep without exchanging tokens.
    """
    from qwenlink.train import distributed

    if not distributed.launched_by_torchrun():
        return 0, 1
    from qwenlink.parallel.mesh import ParallelPlan, validate_plan
    from qwenlink.parallel.tensor import apply_tensor_parallel
    from torch.distributed.device_mesh import init_device_mesh

    info = distributed.init_distributed(device.type)
    validate_plan(ParallelPlan(tp=info.world_size), model.config)
    mesh = init_device_mesh(device.type, (info.world_size,), mesh_dim_names=("tp",))
    apply_tensor_parallel(model, mesh, sequence_parallel=False, full_logits=True)
    return info.rank, info.world_size

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
    return InferenceSession(loaded.model, tok, model.rstrip("/").split("/")[-1])

"""What an inference command (generate, chat, serve, eval) sets up from its arguments: the model and tokenizer from
one `--model` argument (tensor-parallel under torchrun), and the sampling parameters."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from qwenlink.checkpoint.dtypes import parse_dtype
from qwenlink.checkpoint.loader import LoadedModel, load_model, resolve_config
from qwenlink.device import resolve_device
from qwenlink.errors import QwenlinkError
from qwenlink.inference.sampling import SamplingParams
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.tokenizer import Tokenizer, load_tokenizer


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


def sampling_from_args(args: argparse.Namespace, tokenizer: Tokenizer) -> SamplingParams:
    """The sampling options generate and chat share (`--greedy`, `--temperature`, `--top-k`, ...), validated."""
    temperature = 0.0 if args.greedy or args.temperature is None else args.temperature
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop_ids=frozenset(tokenizer.stop_ids()), stop_strings=tuple(args.stop))
    params.validate()
    return params


def check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """A tokenizer producing ids beyond the model's embedding would index out of range mid-run: refuse early."""
    if tokenizer.vocab_size > vocab_size:
        raise QwenlinkError(f"{where}: tokenizer {tokenizer.source or ''} has {tokenizer.vocab_size} ids but the "
                            f"model's vocab_size is {vocab_size}")


def open_session(model: str, *, tokenizer: str | None = None, device: str | None = None, dtype: str = "fp32",
                 seed: int = 0, lora: str | None = None) -> InferenceSession:
    """Load the model (any checkpoint directory or a preset) and its tokenizer, and check they agree on the vocabulary.

    `lora`: a PEFT adapter directory applied on top (unmerged), validated against the model first: an adapter that
    does not fit is an error, never silently skipped.
    """
    dev = resolve_device(device)
    loaded, rank, world = load_for_inference(model, device=dev, dtype=parse_dtype(dtype), seed=seed, lora=lora)
    tok = pick_tokenizer(tokenizer, loaded.tokenizer_dir)
    check_vocab(tok, loaded.model.config.vocab_size, model)
    return InferenceSession(loaded.model, tok, model.rstrip("/").split("/")[-1], rank, world)


def load_for_inference(spec: str, *, device: torch.device, dtype: torch.dtype | None, seed: int = 0,
                       lora: str | None = None) -> tuple[LoadedModel, int, int]:
    """Load `--model` in eval mode; under torchrun, tensor-parallel over all processes. Returns (model, rank, world).

    Every rank then runs the same loop on the same inputs; greedy and seeded sampling see identical logits (the
    head's output is gathered), so the ranks stay in step. An HF directory is sharded before anything is allocated
    and each rank reads only its slices of the checkpoint, so a model that fits the group but not one device loads.
    With a LoRA adapter the model is loaded whole, adapted, then sharded (the adapter must see the full projections).
    """
    shard, rank, world = _tensor_parallel_plan(spec, device)
    loaded = load_model(spec, device=device, dtype=dtype, seed=seed, shard=shard if lora is None else None)
    if lora is not None:
        from qwenlink.checkpoint.peft import apply_peft_adapter

        adapter = apply_peft_adapter(loaded.model, lora)
        saved = "/".join(adapter.lora.saved_modules())
        if rank == 0:
            print(f"applied LoRA adapter {lora} (r={adapter.lora.r}, {len(adapter.modules)} projections"
                  f"{', modules_to_save ' + saved if saved else ''})", file=sys.stderr)
        if shard is not None:
            shard(loaded.model)
    loaded.model.eval()
    return loaded, rank, world


def _tensor_parallel_plan(spec: str, device: torch.device) -> tuple[Optional[Callable[[Qwen2Model], object]], int,
                                                                      int]:
    """Outside torchrun: (None, 0, 1). Under torchrun: join the process group and return the function that shards a
    model over all processes (tensor parallel, no sequence parallelism, full logits on every rank)."""
    from qwenlink.train import distributed

    if not distributed.launched_by_torchrun():
        return None, 0, 1
    from torch.distributed.device_mesh import init_device_mesh

    from qwenlink.parallel.mesh import ParallelPlan, validate_plan
    from qwenlink.parallel.tensor import apply_tensor_parallel

    info = distributed.init_distributed(device.type)
    validate_plan(ParallelPlan(tp=info.world_size), resolve_config(spec))
    mesh = init_device_mesh(device.type, (info.world_size,), mesh_dim_names=("tp",))

    def shard(model: Qwen2Model) -> None:
        apply_tensor_parallel(model, mesh, sequence_parallel=False, full_logits=True)

    return shard, info.rank, info.world_size

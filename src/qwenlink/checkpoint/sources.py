"""Tensor sources: any checkpoint seen as `config` + `get(qwenlink_name) -> tensor`, and the two ways to use one.

A source hands out one tensor at a time under qwenlink's names (HF names without `model.`), already un-fused,
un-split and with any vocab padding removed, each checked for name, shape and dtype as it is read. Conversion streams
sources into another format (convert.py); `model_from_source` builds a model from one and `load_from_source` copies
one into a model that already exists (meta-built then materialised, DTensor-sharded, or a pipeline stage).
`MegatronSource` lives with the Megatron reader (megatron_read.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from qwenlink.checkpoint import hf
from qwenlink.checkpoint.dtypes import check_float
from qwenlink.checkpoint.megatron import TensorSource
from qwenlink.checkpoint.shards import copy_into
from qwenlink.errors import QwenlinkError
from qwenlink.models.qwen2 import Qwen2Model, build_model
from qwenlink.models.qwen2_moe import is_stacked_expert


class HFSource:
    """An HF directory read tensor by tensor (nothing is loaded up front)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.config = hf.read_hf_config(directory)
        self._where: dict[str, Path] = {}
        for file, key, _ in hf.iter_hf_tensors(directory):
            self._where[key] = file
        with torch.device("meta"):
            self._shapes = {n: tuple(p.shape) for n, p in
                            Qwen2Model(self.config).named_parameters(remove_duplicate=False)}

    def get(self, name: str) -> torch.Tensor:
        if is_stacked_expert(name) and name in self._shapes:
            # A mixture of experts' stacked weight: the experts' tensors, each checked, stacked on a new dim 0.
            return torch.stack([self._read(key, name, self._shapes[name][1:])
                                for key, _ in hf.hf_entries(name, self.config.num_experts)])
        key = hf.hf_name(name)
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        return self._read(key, name, self._shapes[name])

    def _read(self, key: str, name: str, shape: tuple) -> torch.Tensor:
        file = self._where.get(key)
        if file is None:
            raise QwenlinkError(f"{self.directory}: tensor {key!r} missing from the checkpoint")
        # Opened per tensor: closing unmaps the file, so pages already copied out do not stay resident.
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(key)
        if tuple(tensor.shape) != tuple(shape):
            raise QwenlinkError(f"{file}: tensor {key!r} has shape {list(tensor.shape)}, expected "
                                f"{list(shape)} from config.json")
        check_float(str(file), key, tensor.dtype)
        return tensor


class ModelSource:
    """An in-memory model (e.g. a loaded qwenlink checkpoint) as a source."""

    def __init__(self, model: Qwen2Model) -> None:
        self.config = model.config
        self._params = dict(model.named_parameters(remove_duplicate=False))

    def get(self, name: str) -> torch.Tensor:
        return self._params[name].detach()


@torch.no_grad()
def model_from_source(source: TensorSource, *, device: torch.device | str = "cpu",
                      dtype: Optional[torch.dtype] = None) -> Qwen2Model:
    """Materialise a Qwen2Model from a source, one tensor at a time (dtype defaults to the source's)."""
    dtype = dtype or source.get("embed_tokens.weight").dtype
    model = build_model(source.config, device=device, dtype=dtype, init=False)
    for name, param in model.named_parameters():  # a tied head is one parameter, listed once
        param.copy_(source.get(name))
    return model


@torch.no_grad()
def load_from_source(model: torch.nn.Module, source: TensorSource, where: str) -> None:
    """Copy every parameter `model` holds from `source`, shapes checked against the model's.

    The model may be a pipeline stage (only the parameters it holds are read; a head tied to an embedding on
    another stage reads the embedding, as the source resolves it) or DTensor-sharded (each rank copies only its
    local slice of each tensor). `where` names the checkpoint in errors.
    """
    for name, param in model.named_parameters():
        key = hf.unwrapped_name(name)
        try:
            tensor = source.get(key)
        except KeyError:
            raise QwenlinkError(f"{where}: tensor {key!r} missing from the checkpoint") from None
        if tuple(tensor.shape) != tuple(param.shape):
            raise QwenlinkError(f"{where}: tensor {key!r} has shape {list(tensor.shape)} in the checkpoint but "
                                f"{list(param.shape)} in the model")
        copy_into(param, lambda index: tensor if index is None else tensor[index])

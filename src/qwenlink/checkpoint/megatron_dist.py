"""Megatron's distributed checkpoint format (`torch_dist`): what it looks like, and writing it from any source.

Megatron-LM and MindSpeed-LLM save `--ckpt-format torch_dist` by default. One iteration directory holds a
torch.distributed.checkpoint (DCP) save plus two megatron-core files:
    DIR/latest_checkpointed_iteration.txt
    DIR/iter_0000001/.metadata           DCP's index: global key -> chunks (offsets, sizes) -> file ranges
    DIR/iter_0000001/__R_N.distcp        the chunks' bytes
    DIR/iter_0000001/common.pt           everything not sharded: `args`, `iteration`, `checkpoint_version`
    DIR/iter_0000001/metadata.json       {"sharded_backend": "torch_dist", ...} (how megatron-core recognises it)
Tensors are stored *global*, under megatron-core's sharded keys: the decoder layers stacked on a leading dimension
(`decoder.layers.self_attention.linear_qkv.weight` [num_layers, (nh + 2 ng) d, h]) and the norms under Transformer
Engine's names whatever the spec (`decoder.layers.self_attention.linear_qkv.layer_norm_weight`). A global tensor is
the TP 1 tensor (qkv grouped per query group, fc1 = [gate; up], the vocab padded), so TP and PP only show in `args`
and in the vocab padding: any layout reads the same way and `dist_checkpointing.load` reshards to whatever model asks.
Reading is in megatron_dist_read.py.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from qwenlink.checkpoint import megatron_layout as ml
from qwenlink.checkpoint.megatron import (CHECKPOINT_VERSION, DEFAULT_DIVISIBLE_BY, TRACKER, Iteration, TensorSource,
                                         iteration_dir_name, megatron_args)
from qwenlink.checkpoint.megatron_names import _CORE_LAYER, _CORE_TE_NORMS, _CORE_TOP
from qwenlink.errors import QwenlinkError
from qwenlink.fileio import atomic_path

METADATA_JSON = "metadata.json"
COMMON_FILE = "common.pt"
DCP_METADATA = ".metadata"
BACKEND_RECORD = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                  "common_backend_version": 1}
LAYER_PREFIX = "decoder.layers."
# Linear layers whose (Transformer Engine or local) `_extra_state` megatron-core saves as one ShardedObject per layer.
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
# Per-layer role -> suffix of its sharded key after `decoder.layers.` (norms as Transformer Engine names them).
LAYER_KEYS: dict[str, str] = dict(_CORE_LAYER, **_CORE_TE_NORMS)
TOP_KEYS: dict[str, str] = dict(_CORE_TOP)


def is_torch_dist_dir(path: str | os.PathLike) -> bool:
    """An iteration directory megatron-core's `dist_checkpointing.save` wrote (metadata.json naming torch_dist)."""
    record = Path(path) / METADATA_JSON
    if not record.is_file():
        return False
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("sharded_backend") == "torch_dist"


def layer_key(role: str) -> str:
    return LAYER_PREFIX + LAYER_KEYS[role]


def sharded_object_key(module: str, layer: int, num_layers: int) -> str:
    """megatron-core's ShardedObject.unique_key for a layer's `_extra_state`: `{key}/shard_{offset}_{shape}`."""
    return f"{LAYER_PREFIX}{module}._extra_state/shard_{layer}_{num_layers}"


# ---- writing --------------------------------------------------------------------------------------------------------
Resolver = Callable[[], object]  # a tensor (the chunk's data) or an io.BytesIO


def _write_items(source: TensorSource, padded: int, dtype: torch.dtype) -> tuple[list, dict]:
    """DCP write items in megatron-core's key order, one chunk per layer (as megatron-core saves at TP 1), and
    for each the function producing its data when DCP writes it, so only one layer's tensors are held at a time."""
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties)
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    cfg = source.config
    n, h, ffn = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    nh, ng, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    items: list = []
    resolvers: dict = {}

    def get(name: str) -> torch.Tensor:
        return source.get(name).to(dtype)

    def tensor(fqn: str, size: tuple[int, ...], offsets: tuple[int, ...], chunk: tuple[int, ...], fn: Resolver):
        index = MetadataIndex(fqn, torch.Size(offsets))
        items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(chunk)),
            properties=TensorProperties(dtype=dtype), size=torch.Size(size))))
        resolvers[index] = fn

    def per_layer(role: str, shape: tuple[int, ...], fn: Callable[[int], torch.Tensor]) -> None:
        for j in range(n):
            tensor(layer_key(role), (n, *shape), (j,) + (0,) * len(shape), (1, *shape),
                   lambda j=j: fn(j).unsqueeze(0).contiguous())

    def extra_state(module: str) -> None:
        for j in range(n):
            index = MetadataIndex(sharded_object_key(module, j, n))
            items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
            resolvers[index] = _none_state

    def qkv(kind: str) -> Callable[[int], torch.Tensor]:
        return lambda j: ml.fuse_qkv(*(get(f"layers.{j}.self_attn.{p}_proj.{kind}") for p in "qkv"), nh, ng)

    rows = (nh + 2 * ng) * d
    tensor(TOP_KEYS["embed"], (padded, h), (0, 0), (padded, h),
           lambda: ml.vocab_shards(get("embed_tokens.weight"), padded, 1)[0])
    per_layer("input_norm", (h,), lambda j: get(f"layers.{j}.input_layernorm.weight"))
    per_layer("proj", (h, nh * d), lambda j: get(f"layers.{j}.self_attn.o_proj.weight"))
    extra_state("self_attention.linear_proj")
    per_layer("qkv.weight", (rows, h), qkv("weight"))
    if cfg.qkv_bias:
        per_layer("qkv.bias", (rows,), qkv("bias"))
    extra_state("self_attention.linear_qkv")
    per_layer("post_norm", (h,), lambda j: get(f"layers.{j}.post_attention_layernorm.weight"))
    for j in range(n):  # fc1 = [gate; up]: megatron-core keeps the halves as separate chunks (TP splits each)
        for half, name in enumerate(("gate_proj", "up_proj")):
            tensor(layer_key("fc1"), (n, 2 * ffn, h), (j, half * ffn, 0), (1, ffn, h),
                   lambda j=j, name=name: get(f"layers.{j}.mlp.{name}.weight").unsqueeze(0).contiguous())
    extra_state("mlp.linear_fc1")
    per_layer("fc2", (h, ffn), lambda j: get(f"layers.{j}.mlp.down_proj.weight"))
    extra_state("mlp.linear_fc2")
    tensor(TOP_KEYS["final_norm"], (h,), (0,), (h,), lambda: get("norm.weight"))
    if not cfg.tie_word_embeddings:  # tied: megatron-core stores no output_layer.weight (the head reads the embedding)
        tensor(TOP_KEYS["head"], (padded, h), (0, 0), (padded, h),
               lambda: ml.vocab_shards(get("lm_head.weight"), padded, 1)[0])
    return items, resolvers


def _none_state() -> io.BytesIO:
    """What megatron-core writes for a linear layer's empty `_extra_state`: torch.save([None]) (a list of the
    rank's ShardedObject data; None for the local spec and for Transformer Engine without FP8 state)."""
    buffer = io.BytesIO()
    torch.save([None], buffer)
    buffer.seek(0)
    return buffer


def _planner(items: list, resolvers: dict):
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import SavePlan

    class SourcePlanner(DefaultSavePlanner):
        """DCP's default planner (global metadata, coverage validation) over items we list ourselves, whose data
        is produced on demand from the source instead of being looked up in an in-memory state dict."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
            self.state_dict, self.is_coordinator = {}, is_coordinator

        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item):
            return resolvers[write_item.index]()

    return SourcePlanner()


def save_torch_dist(source: TensorSource, directory: str | os.PathLike, layout: ml.Layout, *,
                    iteration: Iteration = 1, divisible_by: int = DEFAULT_DIVISIBLE_BY,
                    dtype: Optional[torch.dtype] = None, impl: str = "local") -> Path:
    """Write a megatron-core `torch_dist` checkpoint that `dist_checkpointing.load` (and Megatron-LM's
    `--ckpt-format torch_dist --load`) reads into a GPTModel of any TP/PP; `layout` records the intended TP/PP/VPP in
    `args` and sets the vocab padding (a multiple of divisible_by x TP). The directory appears complete or not at all.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    cfg = source.config
    if cfg.is_moe:
        raise QwenlinkError(f"--format torch_dist: a mixture-of-experts model ({cfg.num_experts} experts) is written "
                            f"in the torch format only (mp_rank_* files; --ep for expert parallelism)")
    padded = ml.padded_vocab_size(cfg.vocab_size, divisible_by, layout.tp)
    out_dtype = dtype or source.get("embed_tokens.weight").dtype
    args = megatron_args(cfg, layout, naming="core", padded_vocab=padded, divisible_by=divisible_by,
                         dtype=out_dtype, iteration=iteration, impl=impl)
    args.ckpt_format = "torch_dist"
    args.use_dist_ckpt, args.dist_ckpt_format = True, "torch_dist"  # the names Megatron-LM used before ckpt_format
    items, resolvers = _write_items(source, padded, out_dtype)
    directory = Path(directory)
    with atomic_path(directory, is_dir=True) as tmp:
        it_dir = tmp / iteration_dir_name(iteration)
        it_dir.mkdir(parents=True)
        writer = dcp.FileSystemWriter(str(it_dir), single_file_per_rank=True, thread_count=1)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save({}, storage_writer=writer, planner=_planner(items, resolvers), no_dist=True)
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            from qwenlink.checkpoint.safe_dcp import user_error_in

            found = user_error_in(exc)
            if found is not None:
                raise found from None
            raise
        torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION,
                    "iteration": 0 if iteration == "release" else int(iteration)}, it_dir / COMMON_FILE)
        (it_dir / METADATA_JSON).write_text(json.dumps(BACKEND_RECORD))
        (tmp / TRACKER).write_text(str(iteration))
    return directory


def refuse_legacy(naming: str) -> None:
    if naming != "core":
        raise QwenlinkError("--format torch_dist is megatron-core's format: use --to megatron (legacy ModelLink "
                            "naming exists only in the torch format)")

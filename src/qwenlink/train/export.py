"""Export from any layout without gathering the model: an HF directory (`checkpoint.export_hf`) and a PEFT adapter
(`lora.export_adapter`), streamed one parameter at a time.

Why: gathering every rank's full state dict to rank 0 (`gather_object`) held world_size x the model on one host, and
under NCCL sent the pickles as CUDA byte tensors. Here each parameter's full value is assembled with DTensor's
`full_tensor()` (collectives on the device tensors, among the ranks that hold its shards), one parameter at a time,
and only the writer of each pipeline rank (its tp 0, dp 0 rank; rank 0 writes the first stage) moves it to the host
and keeps it until the safetensors file it belongs to is written. A writer so holds at most one output shard of its
own stage (`max_shard_bytes`) plus one parameter; the other ranks hold one parameter at a time, on the device.

Files: the writers write `stage-SSSSS-NNNNN.safetensors` into a staging directory `.NAME.tmp-export` next to the
target (on a filesystem every writer sees, as checkpoints need); rank 0 then renames them to HF's names
(`model.safetensors` when there is one file, else `model-0000i-of-0000n.safetensors` + the index read back from their
headers), adds config.json, generation_config.json and the tokenizer, and renames the staging directory onto the
target. Every rank learns whether all others succeeded (one all-reduce on the device) before anything is renamed, so
a failure anywhere leaves neither a half-written directory nor a hang.

Tied embeddings: the head is the embedding (HF drops it), so the last stage's copy of it is never written.
LoRA: the HF export folds each adapter into its base weight as that weight streams by (W + scaling x B @ A on the
host, as `merge_lora` does); the adapter export writes only trainable tensors (adapters, modules_to_save), which are
small: rank 0 assembles them from the stage writers' part files into PEFT's single file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from qwenlink.checkpoint.chat_export import GENERATION_CONFIG
from qwenlink.checkpoint.dtypes import safetensors_dtype
from qwenlink.checkpoint.hf import (hf_entries, shard_file_name, shard_plan, unwrapped_name, write_index,
                                    write_metadata, write_shard)
from qwenlink.models.qwen2_moe import is_stacked_expert
from qwenlink.errors import QwenlinkError
from qwenlink.fileio import atomic_write_text, publish
from qwenlink.models.config import ModelConfig
from qwenlink.models.lora import ADAPTER_SUFFIXES, LoraConfig, iter_lora_modules, merged_weight
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.parallel.parallelize import Layout, ModelChunks
from qwenlink.train import distributed as distrib

STAGING_SUFFIX = ".tmp-export"
MAX_SHARD_BYTES = 5 * 1024**3  # save_hf_model's default: the same files as a one-process save of the same model


@dataclass(frozen=True)
class Item:
    """One exported tensor: its qwenlink name, its size, the parameters its full value is made of (a weight, or a
    weight and its LoRA A and B) and the LoRA scaling when the adapter is folded in."""

    name: str
    nbytes: int
    params: tuple[torch.Tensor, ...]
    scaling: Optional[float] = None


# ---- who writes what ------------------------------------------------------------------------------------------------
def is_stage_writer(layout: Layout) -> bool:
    """The one rank of each pipeline rank that keeps and writes its stages' tensors: tp rank 0 of dp rank 0 (and cp
    rank 0: cp ranks hold the same parameters)."""
    return layout.tp_rank == 0 and layout.dp_rank == 0 and layout.cp_rank == 0


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def staging_dir(target: Path) -> Path:
    """The temporary directory every rank writes into: one name all ranks derive alone (no broadcast needed)."""
    return target.parent / f".{target.name}{STAGING_SUFFIX}"


def _nbytes(param: torch.Tensor) -> int:
    return param.numel() * param.element_size()  # a DTensor's numel is its full (global) size


def hf_items(module: Qwen2Model) -> list[Item]:
    """What one stage contributes to an HF directory, in the model's order: every base parameter, with its LoRA
    adapter folded in where it has one; no adapter tensors, and no head tied to the embedding."""
    tied = module.config.tie_word_embeddings
    adapted = {id(m.weight): m for _, m in iter_lora_modules(module)}
    items = []
    for raw, param in module.named_parameters():
        name = unwrapped_name(raw)
        if name.endswith(ADAPTER_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        lora = adapted.get(id(param))
        if lora is None:
            items.append(Item(name, _nbytes(param), (param,)))
        else:
            items.append(Item(name, _nbytes(param), (param, lora.lora_A, lora.lora_B), lora.scaling))
    return items


def adapter_items(module: Qwen2Model) -> list[Item]:
    """What one stage contributes to a PEFT adapter: its trainable tensors (adapters, modules_to_save). A head tied
    to the embedding is left out: it is the embedding, which rank 0 lists under both names."""
    tied = module.config.tie_word_embeddings
    return [Item(unwrapped_name(raw), _nbytes(p), (p,)) for raw, p in module.named_parameters()
            if p.requires_grad and not (tied and unwrapped_name(raw) == "lm_head.weight")]


# ---- streaming ------------------------------------------------------------------------------------------------------
def _reshard(chunks: ModelChunks) -> None:
    """FSDP2 units left unsharded (a forward without backward under pp keeps them gathered, in the compute dtype)
    go back to their sharded fp32 parameters, so what is exported is always the master weights."""
    from torch.distributed.fsdp import FSDPModule

    for chunk in chunks.modules:
        for module in chunk.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def _full(param: torch.Tensor) -> torch.Tensor:
    """A parameter's full value on its own device; for a DTensor a collective of the ranks of its mesh."""
    tensor = param.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def assemble(item: Item, keep: bool) -> Optional[torch.Tensor]:
    """The item's full value on the host if `keep`, else None. Every rank holding a shard of it must call this (the
    collectives); only the keeper pays the copy to the host and the LoRA merge (fp32 on the host, like merge_lora)."""
    full = [_full(p) for p in item.params]
    if not keep:
        return None
    host = [t.to("cpu") for t in full]
    if item.scaling is not None:
        weight, lora_a, lora_b = host
        return merged_weight(weight, lora_a, lora_b, item.scaling).contiguous()
    return host[0].contiguous()


def _failure(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def write_stage_shards(items: list[Item], staging: Path, stage: int, *, keep: bool,
                       max_shard_bytes: int = MAX_SHARD_BYTES) -> Optional[str]:
    """Stream one stage's items into `stage-SSSSS-NNNNN.safetensors` files, cut as save_hf_model cuts a model.

    Returns the first write error (None: all written). A writer that failed keeps taking part in the collectives of
    the remaining items, so the ranks stay in step and can agree on the outcome afterwards."""
    error: Optional[str] = None
    by_name = {item.name: item for item in items}
    for number, names in enumerate(shard_plan([(i.name, i.nbytes) for i in items], max_shard_bytes), start=1):
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            tensor = assemble(by_name[name], keep=keep and error is None)
            if tensor is not None:  # a mixture of experts' stacked weight is written as one tensor per expert
                for key, row in hf_entries(name, tensor.shape[0] if is_stacked_expert(name) else 0):
                    tensors[key] = tensor if row is None else tensor[row]
        if tensors:
            try:
                write_shard(staging / f"stage-{stage:05d}-{number:05d}.safetensors", tensors)
            except OSError as exc:
                error = _failure(exc)
        del tensors
    return error


def _write_adapter_part(items: list[Item], staging: Path, stage: int, *, keep: bool) -> Optional[str]:
    """One stage's trainable tensors (qwenlink names) as `stage-SSSSS.safetensors`; returns the write error."""
    tensors = {item.name: assemble(item, keep) for item in items}
    if not keep or not tensors:
        return None
    try:
        write_shard(staging / f"stage-{stage:05d}.safetensors", tensors)  # type: ignore[arg-type]
    except OSError as exc:
        return _failure(exc)
    return None


def _stream(chunks: ModelChunks, layout: Layout, write: Callable[[Qwen2Model, int, bool], Optional[str]]) -> \
        Optional[str]:
    """Run `write(stage module, stage id, keep)` over this rank's stages under no_grad; the first error."""
    _reshard(chunks)
    keep = is_stage_writer(layout)
    error = None
    with torch.no_grad():
        for stage, module in zip(chunks.stage_ids, chunks.modules):
            error = error or write(module, stage, keep and error is None)
    return error


# ---- agreeing and finishing -----------------------------------------------------------------------------------------
def _prepare(what: str, target: Path, staging: Path, layout: Layout, option: str) -> None:
    """Rank 0 checks the target (a directory it may replace: absent, empty or a previous export, never a file or
    someone's files), empties the staging directory (a crashed export's leftovers) and creates it; every rank learns
    the outcome (a failure on rank 0 alone would leave the others waiting in the export's collectives)."""
    from qwenlink.train.output_paths import check_export_target

    error = None
    if _is_rank0():
        try:
            check_export_target(str(target), option=option)
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        except (OSError, QwenlinkError) as exc:
            error = _failure(exc)
    _agree(what, target, staging, layout, error)


def _conclude(what: str, target: Path, staging: Path, layout: Layout, error: Optional[str],
              finish: Callable[[], None]) -> None:
    """Agree on the writers' outcome, then let rank 0 `finish` (rename into place) and agree on that too. On any
    failure rank 0 removes the staging directory and every rank raises the same one-line error."""
    _agree(what, target, staging, layout, error)
    if _is_rank0():
        try:
            finish()
        except (OSError, QwenlinkError) as exc:
            error = _failure(exc)
    _agree(what, target, staging, layout, error)


def _agree(what: str, target: Path, staging: Path, layout: Layout, error: Optional[str]) -> None:
    """One all-reduce on the training device: did any rank fail? (Also the barrier between the phases.)"""
    if distrib.all_reduce_max(1 if error else 0, layout.device):
        if _is_rank0():
            shutil.rmtree(staging, ignore_errors=True)
        raise QwenlinkError(f"{what} to {target} failed ({error or 'on another rank'}); nothing was written")


def _read_headers(files: Iterable[Path]) -> dict[str, tuple[Path, torch.dtype, int]]:
    """HF tensor name -> (file, dtype, bytes), read from safetensors headers only (no tensor data)."""
    from safetensors import safe_open

    out: dict[str, tuple[Path, torch.dtype, int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                part = f.get_slice(key)
                dtype = safetensors_dtype(part.get_dtype(), str(file), key)
                numel = 1
                for size in part.get_shape():
                    numel *= size
                out[key] = (file, dtype, numel * dtype.itemsize)
    return out


def _model_order(config: ModelConfig) -> list[str]:
    """HF names of a full model in its own order (a tied head omitted), what save_hf_model's index lists."""
    with torch.device("meta"):
        names = [n for n, _ in Qwen2Model(config).named_parameters()]
    return [key for n in names if not (config.tie_word_embeddings and n == "lm_head.weight")
            for key, _ in hf_entries(n, config.num_experts)]


def publish_hf(staging: Path, target: Path, config: ModelConfig, tokenizer: Any, chat: bool = False) -> None:
    """Rank 0, after every stage is written: HF file names, the index, config, generation config (a chat model's
    when `chat`: trained with ChatML), tokenizer; then the staging directory becomes `target`."""
    parts = sorted(staging.glob("stage-*.safetensors"))
    headers = _read_headers(parts)
    order = _model_order(config)
    missing = sorted(set(order) - set(headers))
    if missing or len(headers) != len(order):
        raise QwenlinkError(f"the stages wrote {len(headers)} of the model's {len(order)} tensors"
                            + (f" ({missing[0]!r} missing)" if missing else ""))
    names = {part: shard_file_name(i, len(parts)) for i, part in enumerate(parts, start=1)}
    for part, name in names.items():
        os.replace(part, staging / name)
    if len(parts) > 1:
        write_index(staging, {n: names[headers[n][0]] for n in order}, sum(h[2] for h in headers.values()))
    write_metadata(staging, config, headers[order[0]][1], tokenizer_dir=None, tokenizer=tokenizer,
                   generation_config=None, chat=chat)
    publish(staging, target, is_dir=True)


# ---- the two exports ------------------------------------------------------------------------------------------------
def export_hf(chunks: ModelChunks, layout: Layout, directory: str | os.PathLike, *,
              tokenizer: Callable[[], Any], max_shard_bytes: int = MAX_SHARD_BYTES,
              chat: Callable[[Any], bool] = lambda tokenizer: False) -> Path:
    """Write the model of every rank's chunks as one HF directory (LoRA adapters merged). Every rank calls this;
    `tokenizer` and `chat(tokenizer)` (was the model trained with ChatML?) are called on rank 0 only."""
    target = Path(directory)
    staging = staging_dir(target)
    _prepare("HF export", target, staging, layout, "checkpoint.export_hf")
    error = _stream(chunks, layout, lambda module, stage, keep: write_stage_shards(
        hf_items(module), staging, stage, keep=keep, max_shard_bytes=max_shard_bytes))
    def finish() -> None:
        tok = tokenizer()
        publish_hf(staging, target, chunks.config, tok, chat=chat(tok))

    _conclude("HF export", target, staging, layout, error, finish)
    return target


def export_adapter(chunks: ModelChunks, layout: Layout, directory: str | os.PathLike, lora: LoraConfig, *,
                   base_model: Optional[str] = None, generation: Optional[Callable[[], dict]] = None) -> Path:
    """Write the trained adapter (+ modules_to_save) of every rank's chunks as one PEFT directory; `generation`
    (rank 0) gives the merged model's generation_config.json, which `convert --merge-lora` carries over."""
    from safetensors.torch import load_file

    from qwenlink.checkpoint.peft import save_peft_adapter

    target = Path(directory)
    staging = staging_dir(target)
    _prepare("adapter export", target, staging, layout, "lora.export_adapter")
    error = _stream(chunks, layout, lambda module, stage, keep: _write_adapter_part(
        adapter_items(module), staging, stage, keep=keep))

    def finish() -> None:
        state: dict[str, torch.Tensor] = {}
        for part in sorted(staging.glob("stage-*.safetensors")):
            state.update(load_file(str(part)))
        if chunks.config.tie_word_embeddings and "embed_tokens.weight" in state:
            # One parameter, saved under both names as PEFT does (a copy: safetensors refuses shared storage).
            state["lm_head.weight"] = state["embed_tokens.weight"].clone()
        save_peft_adapter(target, state, lora, chunks.config, base_model=base_model)
        if generation is not None:
            atomic_write_text(target / GENERATION_CONFIG, json.dumps(generation(), indent=2) + "\n")
        shutil.rmtree(staging, ignore_errors=True)

    _conclude("adapter export", target, staging, layout, error, finish)
    return target


"""Hugging Face model directories: config.json + safetensors (single file or sharded with an index).

Loading streams one tensor at a time from memory-mapped safetensors into an already-allocated model, so peak memory
is the model plus one tensor, not twice the checkpoint. Every tensor is checked by name and shape before it is
copied; problems are reported as one line naming the file and tensor. Saving writes into a temporary directory that
is renamed at the end, so a failed save leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import safe_open

from qwenlink.checkpoint.chat_export import write_generation_config, write_tokenizer
from qwenlink.checkpoint.dtypes import check_float, dtype_name, parse_dtype, safetensors_dtype
from qwenlink.checkpoint.safe_load import confined_file
from qwenlink.checkpoint.safetensors_io import save_file
from qwenlink.checkpoint.shards import copy_into
from qwenlink.errors import QwenlinkError
from qwenlink.fileio import atomic_path, read_json_object
from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2 import Qwen2Model, build_model
from qwenlink.models.qwen2_moe import expert_keys, is_stacked_expert

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# Buffers some exporters write that carry no learned state.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

def hf_name(name: str) -> str:
    """qwenlink parameter name -> HF Qwen2ForCausalLM name (HF adds `model.` to everything but lm_head)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def qwenlink_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def hf_entries(name: str, num_experts: int) -> list[tuple[str, Optional[int]]]:
    """The HF tensors of one qwenlink parameter: (hf name, None) for most; for a mixture of experts' stacked
    [E, ...] weight one (`model....experts.{e}.gate_proj.weight`, e) per expert, slice e of the parameter."""
    if is_stacked_expert(name):
        return [(hf_name(key), e) for e, key in enumerate(expert_keys(name, num_experts))]
    return [(hf_name(name), None)]


def is_hf_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def read_hf_config(directory: str | os.PathLike) -> ModelConfig:
    """Read and validate an HF config.json."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise QwenlinkError(f"{directory}: model directory not found")
    if not path.is_file():
        raise QwenlinkError(f"{path}: missing config.json (not an HF model directory)")
    return ModelConfig.from_hf_dict(read_json_object(path), source=str(path))


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8-sig"))["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise QwenlinkError(f"{index}: not a valid safetensors index (expected a 'weight_map' object)") from None
        if not isinstance(weight_map, dict):
            raise QwenlinkError(f"{index}: not a valid safetensors index (expected a 'weight_map' object)")
        files = sorted({str(confined_file(directory, name, index).relative_to(directory))
                        for name in weight_map.values()})
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise QwenlinkError(f"{index}: shard {missing[0]} listed in the index is missing")
        return [directory / name for name in files]
    if (directory / SAFE_SINGLE).is_file():
        return [directory / SAFE_SINGLE]
    if list(directory.glob("*.bin")):
        raise QwenlinkError(f"{directory}: only pickle (.bin) weights found; qwenlink reads safetensors only "
                            f"(convert with transformers' save_pretrained(safe_serialization=True))")
    raise QwenlinkError(f"{directory}: no model.safetensors or {SAFE_INDEX} found")


class _open:
    """safe_open with errors turned into one line naming the file (truncated or corrupt files)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self):
        try:
            self._ctx = safe_open(str(self.path), framework="pt", device="cpu")
            return self._ctx.__enter__()
        except Exception as exc:
            raise QwenlinkError(f"{self.path}: unreadable safetensors file ({str(exc).strip().splitlines()[0]})") from None

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def iter_hf_tensors(directory: str | os.PathLike) -> Iterator[tuple[Path, str, "object"]]:
    """Yield (file, hf_name, safe_open handle) for every tensor, one file open at a time."""
    for file in _safetensors_files(Path(directory)):
        with _open(file) as f:
            for key in f.keys():
                yield file, key, f


@torch.no_grad()
def load_hf_weights(model: Qwen2Model, directory: str | os.PathLike) -> None:
    """Copy every tensor of an HF checkpoint into `model`, checking names and shapes, streaming tensor by tensor.

    The model may be a pipeline stage (missing modules): tensors for modules it does not hold are skipped, but every
    parameter it does hold must be found exactly once. A tied head on a stage without the embedding (the last of
    several) reads the embedding, which is what the head is.
    """
    directory = Path(directory)
    # Wrappers added from outside (activation checkpointing, torch.compile) do not change the checkpoint's names.
    params = {unwrapped_name(n): p for n, p in model.named_parameters(remove_duplicate=False)}
    tied = model.config.tie_word_embeddings
    # file key -> (param, expert row of a stacked parameter or None)
    targets = {key: (p, row) for n, p in params.items() if not (tied and n == "lm_head.weight")
               for key, row in hf_entries(n, model.config.num_experts)}
    if tied and "lm_head.weight" in params and "embed_tokens.weight" not in params:
        targets[hf_name("embed_tokens.weight")] = (params["lm_head.weight"], None)
    expected = set(targets)
    full_model_names = _full_model_hf_names(model.config)
    seen: set[str] = set()
    for file, key, f in iter_hf_tensors(directory):
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if tied and key == "lm_head.weight":
            continue  # some exporters also write the tied head; the embedding is the source of truth
        if key not in full_model_names:
            raise QwenlinkError(f"{file}: unexpected tensor {key!r} (not part of a {model.config.model_type} model "
                                f"with this config.json)")
        if key not in expected:
            continue  # belongs to another pipeline stage
        param, row = targets[key]
        try:
            stored = f.get_slice(key)
            shape, code = tuple(stored.get_shape()), stored.get_dtype()
        except Exception as exc:
            raise QwenlinkError(f"{file}: tensor {key!r} unreadable ({str(exc).strip().splitlines()[0]})") from None
        expected_shape = tuple(param.shape) if row is None else tuple(param.shape[1:])
        if shape != expected_shape:
            raise QwenlinkError(f"{file}: tensor {key!r} has shape {list(shape)}, expected {list(expected_shape)} "
                                f"from config.json")
        check_float(str(file), key, safetensors_dtype(code, str(file), key))
        try:
            # A tensor-parallel (DTensor) parameter reads only its own shard: `get_slice` copies just those
            # rows/columns out of the memory-mapped file, so a rank never holds more than its shards.
            copy_into(param, lambda index: f.get_tensor(key) if index is None else f.get_slice(key)[index], row)
        except Exception as exc:
            raise QwenlinkError(f"{file}: tensor {key!r} unreadable ({str(exc).strip().splitlines()[0]})") from None
        seen.add(key)
    missing = sorted(expected - seen)
    if missing:
        raise QwenlinkError(f"{directory}: tensor {missing[0]!r} missing from the checkpoint"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def unwrapped_name(name: str) -> str:
    """A parameter's checkpoint name: without the prefixes activation checkpointing and torch.compile insert."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _full_model_hf_names(config: ModelConfig) -> set[str]:
    with torch.device("meta"):
        names = {key for n, _ in Qwen2Model(config).named_parameters(remove_duplicate=False)
                 for key, _ in hf_entries(n, config.num_experts)}
    return names


def load_hf_model(directory: str | os.PathLike, *, device: torch.device | str = "cpu",
                  dtype: str | torch.dtype | None = None,
                  shard: Optional[Callable[[Qwen2Model], object]] = None) -> Qwen2Model:
    """Build a model from an HF directory: config on meta, allocate once on `device`, stream the weights in.

    dtype defaults to the checkpoint's own dtype, so a round trip keeps every bit. `shard` (e.g. tensor parallelism)
    is applied to the meta model before anything is allocated, so each process allocates and reads only its shards.
    """
    config = read_hf_config(directory)
    files = _safetensors_files(Path(directory))
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None:
        with _open(files[0]) as f:
            keys = list(f.keys())
            stored = safetensors_dtype(f.get_slice(keys[0]).get_dtype(), str(files[0]), keys[0]) if keys else None
            torch_dtype = stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    model = build_model(config, device="meta", dtype=torch_dtype)
    if shard is not None:
        shard(model)
    model = model.to_empty(device=device)
    model.tie_weights()
    load_hf_weights(model, directory)
    return model


def shard_plan(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names (in order) into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_name(index: int, count: int) -> str:
    """HF's name for shard `index` (1-based) of `count`; a model in one file is SAFE_SINGLE."""
    return SAFE_SINGLE if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"


def write_index(tmp: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: which shard holds each tensor (what loaders open), and the bytes in all."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file with the metadata transformers expects ({"format": "pt"})."""
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_weights(tmp: Path, sizes: list[tuple[str, int]], fetch, max_shard_bytes: int) -> None:
    """Write safetensors shards, fetching each shard's tensors only when that shard is written, so at most one
    shard is in memory beyond what `fetch` reads from (an in-memory model, or a streamed checkpoint)."""
    shards = shard_plan(sizes, max_shard_bytes)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = shard_file_name(i, len(shards))
        write_shard(tmp / file, {n: fetch(n) for n in names})
        weight_map.update({n: file for n in names})
    if len(shards) > 1:
        write_index(tmp, weight_map, sum(n for _, n in sizes))


def write_metadata(tmp: Path, config: ModelConfig, out_dtype: torch.dtype, *, tokenizer_dir, tokenizer,
                   generation_config: Optional[dict], chat: bool = False) -> None:
    """config.json (torch_dtype = out_dtype), generation_config.json and the tokenizer files: everything of an HF
    directory besides the weights. `chat`: the model was trained with ChatML, so it stops at <|im_end|> as
    Qwen1.5-Chat does; `generation_config`: an input's own, kept as is (chat_export.py)."""
    hf_config = config.to_hf_dict(dtype=dtype_name(out_dtype))
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    written = write_tokenizer(tmp, tokenizer_dir=tokenizer_dir, tokenizer=tokenizer, chat=chat)
    write_generation_config(tmp, written, chat, generation_config)


def save_hf_from_source(source, directory: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                        max_shard_bytes: int = 1 << 30, tokenizer_dir: str | os.PathLike | None = None,
                        tokenizer=None, chat: bool = False, generation_config: Optional[dict] = None) -> Path:
    """Write an HF directory from a tensor source (`.config`, `.get(qwenlink_name)`) one shard at a time.

    Conversion from a Megatron or qwenlink checkpoint never holds the whole model: peak memory is about one output
    shard plus what the source has mapped.
    """
    config: ModelConfig = source.config
    torch_dtype = parse_dtype(dtype) or source.get("embed_tokens.weight").dtype
    with torch.device("meta"):
        shapes = [(n, p.shape) for n, p in Qwen2Model(config).named_parameters()]  # a tied head is listed once
    itemsize = torch.tensor([], dtype=torch_dtype).element_size()
    sizes, parts = [], {}  # parts: hf name -> (qwenlink name, expert row or None)
    for n, shape in shapes:
        for key, row in hf_entries(n, config.num_experts):
            sizes.append((key, int(torch.Size(shape if row is None else shape[1:]).numel()) * itemsize))
            parts[key] = (n, row)
    stacked: dict[str, torch.Tensor] = {}  # the one stacked expert weight being split into its experts

    def fetch(name: str) -> torch.Tensor:
        own, row = parts[name]
        if row is None:
            tensor = source.get(own).detach()
        else:
            if own not in stacked:
                stacked.clear()
                stacked[own] = source.get(own).detach()
            tensor = stacked[own][row]
        if tensor.is_floating_point():
            tensor = tensor.to(torch_dtype)
        return tensor.to("cpu").contiguous()

    directory = Path(directory)
    with atomic_path(directory, is_dir=True) as tmp:
        _write_weights(tmp, sizes, fetch, max_shard_bytes)
        write_metadata(tmp, config, torch_dtype, tokenizer_dir=tokenizer_dir, tokenizer=tokenizer,
                       generation_config=generation_config, chat=chat)
    return directory


def save_hf_model(model: Qwen2Model, directory: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                  max_shard_bytes: int = 5 * 1024**3, tokenizer_dir: str | os.PathLike | None = None,
                  tokenizer=None, generation_config: Optional[dict] = None, chat: bool = False) -> Path:
    """Write an HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Files: config.json, generation_config.json, model.safetensors (or model-0000i-of-0000n.safetensors + index),
    and the tokenizer (copied from `tokenizer_dir`, or saved from a `qwenlink.tokenizer.Tokenizer`).
    """
    directory = Path(directory)
    torch_dtype = parse_dtype(dtype)
    config = model.config
    state: dict[str, torch.Tensor] = {}
    for name, param in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # HF drops the tied head
        tensor = param.detach()
        if torch_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(torch_dtype)
        for key, row in hf_entries(name, config.num_experts):
            state[key] = (tensor if row is None else tensor[row]).to("cpu").contiguous()
    out_dtype = next(iter(state.values())).dtype
    sizes = [(n, t.numel() * t.element_size()) for n, t in state.items()]
    with atomic_path(directory, is_dir=True) as tmp:
        _write_weights(tmp, sizes, state.__getitem__, max_shard_bytes)
        write_metadata(tmp, config, out_dtype, tokenizer_dir=tokenizer_dir, tokenizer=tokenizer,
                       generation_config=generation_config, chat=chat)
    return directory

"""`qwenlink convert`: move weights between HF directories, qwenlink DCP checkpoints and Megatron layouts.

Every input is opened as a *source* that hands out one tensor at a time under qwenlink's names (HF names without
`model.`): HF safetensors are read lazily, Megatron rank files are memory-mapped, a qwenlink checkpoint is loaded into
a model. Megatron output is written one pipeline stage at a time; HF and qwenlink output go through a model (the
target format's own writer), so peak memory stays about one model plus one layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import safe_open

from qwenlink.checkpoint import hf, megatron
from qwenlink.checkpoint.megatron_layout import make_layout
from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2 import Qwen2Model, build_model

FORMATS = ("hf", "qwenlink", "megatron", "megatron-legacy", "peft")
HF_SHARD_BYTES = 1 << 30


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
        key = hf.hf_name(name)
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        file = self._where.get(key)
        if file is None:
            raise QwenlinkError(f"{self.directory}: tensor {key!r} missing from the checkpoint")
        # Opened per tensor: closing unmaps the file, so pages already copied out do not stay resident.
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(key)
        if tuple(tensor.shape) != self._shapes[name]:
            raise QwenlinkError(f"{file}: tensor {key!r} has shape {list(tensor.shape)}, expected "
                                f"{list(self._shapes[name])} from config.json")
        return tensor


class ModelSource:
    """An in-memory model (e.g. a loaded qwenlink checkpoint) as a source."""

    def __init__(self, model: Qwen2Model) -> None:
        self.config = model.config
        self._params = dict(model.named_parameters(remove_duplicate=False))

    def get(self, name: str) -> torch.Tensor:
        return self._params[name].detach()


def detect_format(path: str | os.PathLike) -> str:
    """'hf', 'megatron' or 'qwenlink', from what the directory holds."""
    p = Path(path)
    if not p.exists():
        raise QwenlinkError(f"{p}: not found")
    if not p.is_dir():
        raise QwenlinkError(f"{p}: expected a directory (HF model, qwenlink checkpoint or Megatron checkpoint)")
    if hf.is_hf_dir(p) and not (p / "COMPLETE").exists():
        return "hf"
    if megatron.is_megatron_dir(p):
        return "megatron"
    try:
        from qwenlink.checkpoint import dcp
    except ImportError:
        dcp = None
    if dcp is not None and dcp.is_qwenlink_checkpoint(p):
        return "qwenlink"
    partial = dcp.interrupted_save(p) if dcp is not None else None
    if partial is not None:
        raise QwenlinkError(f"{partial}: qwenlink checkpoint is incomplete (no COMPLETE marker: its save was "
                            f"interrupted) and {p} holds no complete one")
    raise QwenlinkError(f"{p}: unknown checkpoint format (expected an HF directory with config.json, a qwenlink "
                        f"checkpoint with step_*/COMPLETE, or a Megatron directory with {megatron.TRACKER})")


def open_source(path: str | os.PathLike, *, fmt: Optional[str] = None, iteration: Optional[megatron.Iteration] = None,
                reference: Optional[ModelConfig] = None,
                notice: Callable[[str], None] = megatron.notice_to_stderr):
    """A tensor source for any supported input."""
    fmt = fmt or detect_format(path)
    if fmt == "hf":
        return HFSource(path)
    if fmt == "megatron":
        from qwenlink.checkpoint.megatron_read import MegatronSource

        return MegatronSource(path, iteration=iteration, reference=reference, notice=notice)
    if fmt == "qwenlink":
        from qwenlink.checkpoint import dcp

        return ModelSource(dcp.load_model_from_checkpoint(path, device="cpu", dtype=torch.float32))
    raise QwenlinkError(f"unknown input format {fmt!r}")


@torch.no_grad()
def model_from_source(source, *, device: torch.device | str = "cpu",
                      dtype: Optional[torch.dtype] = None) -> Qwen2Model:
    """Materialise a Qwen2Model from a source, one tensor at a time (dtype defaults to the source's)."""
    dtype = dtype or source.get("embed_tokens.weight").dtype
    model = build_model(source.config, device=device, dtype=dtype, init=False)
    for name, param in model.named_parameters():  # a tied head is one parameter, listed once
        param.copy_(source.get(name))
    return model


def load_megatron_model(directory: str | os.PathLike, *, device: torch.device | str = "cpu",
                        dtype: Optional[torch.dtype] = None, iteration: Optional[megatron.Iteration] = None,
                        reference: Optional[ModelConfig] = None) -> Qwen2Model:
    """A Megatron checkpoint as a ready model (for `--model.init_from=MEGATRON_DIR` and for tests)."""
    from qwenlink.checkpoint.megatron_read import MegatronSource

    return model_from_source(MegatronSource(directory, iteration=iteration, reference=reference),
                             device=device, dtype=dtype)


def read_megatron_config(directory: str | os.PathLike, *, iteration: Optional[megatron.Iteration] = None,
                         reference: Optional[ModelConfig] = None) -> ModelConfig:
    """The architecture of a Megatron checkpoint (args cross-checked with its tensors)."""
    from qwenlink.checkpoint.megatron_read import MegatronSource

    return MegatronSource(directory, iteration=iteration, reference=reference).config


@torch.no_grad()
def load_megatron_weights(model: Qwen2Model, directory: str | os.PathLike, *,
                          iteration: Optional[megatron.Iteration] = None) -> None:
    """Copy a Megatron checkpoint into an allocated model (or pipeline stage: only the parameters it holds).

    For the trainer's `--model.init_from=MEGATRON_DIR`, like Megatron's `--load` of a converted checkpoint.
    """
    from qwenlink.checkpoint.megatron_read import MegatronSource

    source = MegatronSource(directory, iteration=iteration)
    for name, param in model.named_parameters():
        tensor = source.get(name)
        if tuple(tensor.shape) != tuple(param.shape):
            raise QwenlinkError(f"{directory}: tensor {name!r} has shape {list(tensor.shape)} in the Megatron "
                                f"checkpoint but {list(param.shape)} in the model")
        param.copy_(tensor)


def load_any_model(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                   dtype: Optional[torch.dtype] = None,
                   shard: Optional[Callable[[Qwen2Model], object]] = None) -> Qwen2Model:
    """HF directory, qwenlink checkpoint or Megatron checkpoint -> model (format detected).

    `shard` (tensor parallelism) is applied in place: a qwenlink checkpoint is sharded before it is allocated, so each
    process reads only its slices; the other formats are loaded whole and sharded afterwards."""
    if detect_format(path) == "qwenlink":
        from qwenlink.checkpoint import dcp

        return dcp.load_model_from_checkpoint(path, device=device, dtype=dtype or torch.float32, shard=shard)
    model = model_from_source(open_source(path), device=device, dtype=dtype)
    if shard is not None:
        shard(model)
    return model


@dataclass
class ConvertOptions:
    to: str
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    layers_per_virtual_stage: Optional[int] = None
    num_layer_list: Optional[Sequence[int]] = None
    dtype: Optional[torch.dtype] = None
    iteration: megatron.Iteration = 1
    input_iteration: Optional[megatron.Iteration] = None
    divisible_by: int = megatron.DEFAULT_DIVISIBLE_BY
    transformer_impl: str = "local"
    config_from: Optional[str] = None  # HF dir whose config.json (and tokenizer) describe a Megatron input
    tokenizer_dir: Optional[str] = None
    overwrite: bool = False
    merge_lora: Optional[str] = None  # a PEFT adapter directory folded into the weights (base + adapter -> merged)


def convert(input_path: str | os.PathLike, output: str | os.PathLike, opts: ConvertOptions,
            notice: Callable[[str], None] = megatron.notice_to_stderr) -> Path:
    """Convert `input_path` to `opts.to` at `output`; returns the output directory."""
    if opts.to not in FORMATS:
        raise QwenlinkError(f"--to {opts.to!r}: expected one of {', '.join(FORMATS)}")
    output = Path(output)
    if Path(input_path).resolve() == output.resolve():
        raise QwenlinkError(f"{output}: output must differ from the input")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not opts.overwrite:
        raise QwenlinkError(f"{output}: already exists and is not empty (pass --overwrite to replace it)")
    if opts.to == "peft":
        return _save_peft(input_path, output, opts)
    fmt = detect_format(input_path)
    reference = hf.read_hf_config(opts.config_from) if opts.config_from else None
    source = open_source(input_path, fmt=fmt, iteration=opts.input_iteration, reference=reference, notice=notice)
    if opts.merge_lora:
        from qwenlink.checkpoint.peft import MergedLoraSource

        source = MergedLoraSource(source, opts.merge_lora)  # validated against the base before anything is written
    if opts.to in ("megatron", "megatron-legacy"):
        layout = make_layout(source.config, opts.tp, opts.pp, opts.vpp, opts.layers_per_virtual_stage,
                             opts.num_layer_list)
        return megatron.save_megatron(source, output, layout, naming="core" if opts.to == "megatron" else "legacy",
                                      impl=opts.transformer_impl, iteration=opts.iteration,
                                      divisible_by=opts.divisible_by, dtype=opts.dtype)
    if (opts.tp, opts.pp, opts.vpp, opts.layers_per_virtual_stage, opts.num_layer_list) != (1, 1, None, None, None):
        raise QwenlinkError(f"--tp/--pp/--vpp/--num-layer-list apply to Megatron output only, not --to {opts.to}")
    if opts.to == "hf":
        tokenizer_dir = opts.tokenizer_dir or opts.config_from or (input_path if fmt == "hf" else None)
        # Streamed shard by shard: safetensors serialises one whole file in memory, so 1 GiB shards bound the peak.
        return hf.save_hf_from_source(source, output, dtype=opts.dtype, tokenizer_dir=tokenizer_dir,
                                      max_shard_bytes=HF_SHARD_BYTES)
    model = model_from_source(source, dtype=opts.dtype)
    del source  # unmaps the input's files before the output is serialised
    return _save_qwenlink(model, output, notice)


def _save_peft(input_path: str | os.PathLike, output: Path, opts: ConvertOptions) -> Path:
    """The adapters of a LoRA run's checkpoint as a PEFT adapter directory (for `--lora`, PEFT or vLLM)."""
    from qwenlink.checkpoint import dcp
    from qwenlink.checkpoint.peft import save_model_adapter
    from qwenlink.train.lora import checkpoint_lora_config, is_lora_checkpoint, load_lora_checkpoint, read_reference

    if not is_lora_checkpoint(input_path):
        raise QwenlinkError(f"{input_path}: --to peft exports the adapters of a LoRA run's checkpoint (a step_* "
                            f"directory with lora.json), which this is not")
    if opts.merge_lora or (opts.tp, opts.pp, opts.vpp, opts.layers_per_virtual_stage,
                           opts.num_layer_list) != (1, 1, None, None, None):
        raise QwenlinkError("--to peft takes none of --merge-lora, --tp, --pp, --vpp, --layers-per-virtual-stage, "
                            "--num-layer-list")
    step_dir = dcp.resolve_step_dir(input_path)
    lora = checkpoint_lora_config(step_dir)
    model = load_lora_checkpoint(step_dir, with_base=False, lora=lora)  # only adapters are written: no base read
    return save_model_adapter(model, output, lora, base_model=read_reference(step_dir).get("base_model"),
                              dtype=opts.dtype)


def _save_qwenlink(model: Qwen2Model, output: Path, notice: Callable[[str], None]) -> Path:
    """A weights-only qwenlink DCP checkpoint (step 0), usable with `--model.init_from` and `qwenlink generate`."""
    try:
        from qwenlink.checkpoint.dcp import save_checkpoint
    except ImportError:
        raise QwenlinkError("--to qwenlink needs qwenlink.checkpoint.dcp (the trainer's checkpoint module), which "
                            "this installation lacks") from None
    from qwenlink.fileio import atomic_path

    with atomic_path(output, is_dir=True) as tmp:
        save_checkpoint(tmp, 0, model, None, train_state={"step": 0, "converted": True},
                        job_toml="# written by `qwenlink convert` (weights only)\n", keep_last=1)
    notice(f"{output}: weights-only qwenlink checkpoint (no optimizer state); use it with --model.init_from")
    return output

"""`qwenlink convert`: move weights between HF directories, qwenlink DCP checkpoints and Megatron layouts.

The input is opened by the loader (loader.py) as a *source* that hands out one tensor at a time under qwenlink's
names (HF names without `model.`): HF safetensors are read lazily, Megatron rank files are memory-mapped, a qwenlink
checkpoint is loaded into a model. Megatron output is written one pipeline stage at a time; HF and qwenlink output go
through a model (the target format's own writer), so peak memory stays about one model plus one layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from qwenlink.checkpoint import chat_export, dcp, hf, lora_run, megatron, megatron_dist
from qwenlink.checkpoint.loader import detect_format, open_source
from qwenlink.checkpoint.megatron_layout import make_layout
from qwenlink.checkpoint.peft import MergedLoraSource, save_model_adapter
from qwenlink.checkpoint.sources import model_from_source
from qwenlink.errors import QwenlinkError
from qwenlink.fileio import atomic_path
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.checkpoint.replaceable import check_replaceable_dir
from qwenlink.outputs import refuse_clobbering
from qwenlink.tokenizer import load_tokenizer

FORMATS = ("hf", "qwenlink", "megatron", "megatron-legacy", "peft")
STORAGES = ("torch", "torch_dist")  # Megatron's --ckpt-format
HF_SHARD_BYTES = 1 << 30


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
    chat: str = "auto"  # HF output: yes / no = trained with ChatML or not; auto = what the input records
    storage: str = "torch"  # Megatron output: torch (mp_rank_* files) or torch_dist (megatron-core's DCP format)
    ep: int = 1  # Megatron output: expert-parallel size (a mixture of experts' routed experts split over EP ranks)


def convert(input_path: str | os.PathLike, output: str | os.PathLike, opts: ConvertOptions,
            notice: Callable[[str], None] = megatron.notice_to_stderr) -> Path:
    """Convert `input_path` to `opts.to` at `output`; returns the output directory."""
    if opts.to not in FORMATS:
        raise QwenlinkError(f"--to {opts.to!r}: expected one of {', '.join(FORMATS)}")
    output = Path(output)
    refuse_clobbering(output, {"input": input_path, "--config-from directory": opts.config_from,
                               "--tokenizer directory": opts.tokenizer_dir, "--merge-lora adapter": opts.merge_lora})
    check_replaceable_dir(output, overwrite=opts.overwrite)
    if opts.to == "peft":
        return _save_peft(input_path, output, opts)
    fmt = detect_format(input_path)
    reference = hf.read_hf_config(opts.config_from) if opts.config_from else None
    source = open_source(input_path, fmt=fmt, iteration=opts.input_iteration, reference=reference, notice=notice)
    if opts.merge_lora:
        source = MergedLoraSource(source, opts.merge_lora)  # validated against the base before anything is written
    if opts.storage not in STORAGES:
        raise QwenlinkError(f"--format {opts.storage!r}: expected one of {', '.join(STORAGES)}")
    if opts.storage != "torch" and opts.to not in ("megatron", "megatron-legacy"):
        raise QwenlinkError(f"--format applies to Megatron output only, not --to {opts.to}")
    if opts.to in ("megatron", "megatron-legacy"):
        layout = make_layout(source.config, opts.tp, opts.pp, opts.vpp, opts.layers_per_virtual_stage,
                             opts.num_layer_list, ep=opts.ep)
        if opts.storage == "torch_dist":
            megatron_dist.refuse_legacy("core" if opts.to == "megatron" else "legacy")
            return megatron_dist.save_torch_dist(source, output, layout, iteration=opts.iteration,
                                                 divisible_by=opts.divisible_by, dtype=opts.dtype,
                                                 impl=opts.transformer_impl)
        return megatron.save_megatron(source, output, layout, naming="core" if opts.to == "megatron" else "legacy",
                                      impl=opts.transformer_impl, iteration=opts.iteration,
                                      divisible_by=opts.divisible_by, dtype=opts.dtype)
    if (opts.tp, opts.pp, opts.vpp, opts.layers_per_virtual_stage, opts.num_layer_list, opts.ep) != \
            (1, 1, None, None, None, 1):
        raise QwenlinkError(f"--tp/--pp/--ep/--vpp/--num-layer-list apply to Megatron output only, not --to {opts.to}")
    if opts.to == "hf":
        tokenizer_dir, tokenizer, chat, carried = _hf_metadata(input_path, fmt, opts, source.config.vocab_size)
        # Streamed shard by shard: safetensors serialises one whole file in memory, so 1 GiB shards bound the peak.
        return hf.save_hf_from_source(source, output, dtype=opts.dtype, tokenizer_dir=tokenizer_dir,
                                      tokenizer=tokenizer, max_shard_bytes=HF_SHARD_BYTES, chat=chat,
                                      generation_config=carried)
    model = model_from_source(source, dtype=opts.dtype)
    del source  # unmaps the input's files before the output is serialised
    return _save_qwenlink(model, output, notice)


def _hf_metadata(input_path: str | os.PathLike, fmt: str, opts: ConvertOptions, vocab_size: int):
    """(tokenizer dir, tokenizer, chat?, generation config kept as is) for HF output.

    The tokenizer: --tokenizer, else the --config-from or HF input directory's, else the tokenizer the run that
    wrote a qwenlink checkpoint trained with (when it fits the model's vocabulary). Chat or base: --chat yes/no; else the generation config of the merged
    adapter's directory, of --config-from, of an HF input; else, for a qwenlink checkpoint, whether its run trained
    on ChatML (chat_export.py)."""
    tokenizer_dir = opts.tokenizer_dir or opts.config_from or (input_path if fmt == "hf" else None)
    tokenizer = None
    step_dir = dcp.resolve_step_dir(input_path) if fmt in ("qwenlink", "qwenlink-lora") else None
    if tokenizer_dir is not None and chat_export.has_tokenizer(tokenizer_dir):
        tokenizer = load_tokenizer(tokenizer_dir)
    elif step_dir is not None:
        tokenizer = chat_export.checkpoint_tokenizer(step_dir)
        if tokenizer is not None and tokenizer.vocab_size > vocab_size:
            tokenizer = None  # not the vocabulary this model was trained with (a test-sized model)
        tokenizer_dir = None
    carried = None
    for directory in (opts.merge_lora, opts.config_from, input_path if fmt == "hf" else None):
        carried = chat_export.read_generation_config(directory)
        if carried is not None:
            break
    detected = step_dir is not None and tokenizer is not None and chat_export.checkpoint_run_is_chat(step_dir,
                                                                                                     tokenizer)
    chat, carried = chat_export.resolve_chat(opts.chat, carried, detected, tokenizer)
    return tokenizer_dir, tokenizer, chat, carried


def _save_peft(input_path: str | os.PathLike, output: Path, opts: ConvertOptions) -> Path:
    """The adapters of a LoRA run's checkpoint as a PEFT adapter directory (for `--lora`, PEFT or vLLM)."""
    if not lora_run.is_lora_checkpoint(input_path):
        raise QwenlinkError(f"{input_path}: --to peft exports the adapters of a LoRA run's checkpoint (a step_* "
                            f"directory with lora.json), which this is not")
    if opts.merge_lora or (opts.tp, opts.pp, opts.vpp, opts.layers_per_virtual_stage,
                           opts.num_layer_list) != (1, 1, None, None, None):
        raise QwenlinkError("--to peft takes none of --merge-lora, --tp, --pp, --vpp, --layers-per-virtual-stage, "
                            "--num-layer-list")
    step_dir = dcp.resolve_step_dir(input_path)
    lora = lora_run.checkpoint_lora_config(step_dir)
    model = lora_run.load_lora_checkpoint(step_dir, lora=lora)  # no base given: only adapters are written, none read
    return save_model_adapter(model, output, lora, base_model=lora_run.read_reference(step_dir).get("base_model"),
                              dtype=opts.dtype)


def _save_qwenlink(model: Qwen2Model, output: Path, notice: Callable[[str], None]) -> Path:
    """A weights-only qwenlink DCP checkpoint (step 0), usable with `--model.init_from` and `qwenlink generate`."""
    with atomic_path(output, is_dir=True) as tmp:
        dcp.save_checkpoint(tmp, 0, model, None, train_state={"step": 0, "converted": True},
                            job_toml="# written by `qwenlink convert` (weights only)\n", keep_last=1)
    notice(f"{output}: weights-only qwenlink checkpoint (no optimizer state); use it with --model.init_from")
    return output

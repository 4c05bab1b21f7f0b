"""The training job's configuration: dataclasses per section, read from TOML, overridden by `--section.key=value`.

Why dataclasses and not a free dict: every key is known, typed and documented in one place, so a typo is an error
with a suggestion (`did you mean optim.lr?`) instead of a silently ignored setting, and the resolved config can be
printed at start and saved next to every checkpoint, which is what makes a run reproducible.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from qwenlink.errors import QwenlinkError

if TYPE_CHECKING:
    from qwenlink.models.config import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass
class JobSection:
    """What the run is and where it writes."""

    name: str = "run"
    mode: str = "pretrain"          # "pretrain" (indexed text), "sft" (instruction data, loss where labels != -100)
    #                                 or "dpo" (preference pairs from `preprocess --handler pairwise`, see [dpo])
    output_dir: str = "runs/run"    # metrics.jsonl, tensorboard/, checkpoints/ (unless checkpoint.dir is set)
    seed: int = 1234


@dataclass
class ModelSection:
    """Architecture (a preset, optionally with field overrides) and where the initial weights come from."""

    preset: str = ""                # a preset name (see `qwenlink info --list`); "" = the architecture of init_from
    # "" = random init; an HF directory; or a qwenlink checkpoint (a step directory or a run's checkpoint dir).
    init_from: str = ""
    # Architecture fields overriding the preset, e.g. {num_hidden_layers = 4} (names as in HF's config.json).
    arch: dict = field(default_factory=dict)
    init_std: Optional[float] = None   # None: the preset's initializer_range (ModelLink recipes use 0.01)


@dataclass
class DataSection:
    """Indexed datasets (`PREFIX.bin/.idx`) and how samples are made from them."""

    # Pretrain: a list of prefixes (e.g. "data/wiki_text_document"); sft: the prefix given to preprocess
    # (e.g. "data/alpaca", which holds alpaca_packed_{input_ids,labels,attention_mask}_document).
    path: list = field(default_factory=list)
    weights: list = field(default_factory=list)  # blending weights, one per path (empty: equal)
    valid_path: list = field(default_factory=list)  # held-out data for validation loss / perplexity
    seq_length: int = 2048
    tokenizer: str = "default"      # "default" = the embedded Qwen1.5 vocabulary, or an HF tokenizer directory
    pad_to_multiple_of: int = 8     # sft: pad each micro batch to the longest sample rounded up to this
    pack: bool = False              # sft: fill fixed seq_length rows with whole samples (document-masked attention)
    pad_id: int = -1                # sft padding id; -1: the tokenizer's pad (else eos) token (151643 for Qwen)
    # pretrain, as Megatron's --reset-attention-mask / --reset-position-ids: inside a sample, attention / positions
    # restart after each end-of-document token (eod_id; -1: the tokenizer's eos, what preprocess --append-eod adds)
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    eod_id: int = -1
    shuffle: bool = True


@dataclass
class TrainSection:
    """Batch geometry, length, precision and failure policy."""

    micro_batch_size: int = 1
    global_batch_size: int = 8      # Megatron's meaning: micro x accumulation steps x data-parallel size
    train_iters: int = 100
    dtype: str = "fp32"             # "fp32", or "bf16" (bf16 compute, fp32 parameters/optimizer state)
    device: str = "auto"
    finetune: bool = False          # load weights only, start at step 0 with a fresh optimizer (ModelLink --finetune)
    activation_checkpoint: str = "none"  # "none", "full" (every layer) or "every_n"
    activation_checkpoint_every: int = 2
    max_nonfinite_steps: int = 5    # abort after this many NaN/inf losses in a row (each one is skipped and counted)
    loss_chunk_size: int = 1024     # tokens per chunk of the memory-efficient cross entropy
    # On CUDA / NPU the trainer plans the job (qwenlink.train.plan) before allocating and refuses one whose busiest
    # rank would not fit the device; true: skip that check (e.g. a plan known to be pessimistic for a layout).
    skip_memory_check: bool = False


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule (ModelLink defaults: 0.9/0.95, eps 1e-8, wd 0.1, clip 1.0)."""

    lr: float = 1.25e-6
    min_lr: float = 1.25e-7
    warmup_iters: int = -1          # -1: use warmup_fraction
    warmup_fraction: float = 0.01
    decay_style: str = "cosine"     # "cosine", "linear" or "constant"
    decay_iters: int = -1           # -1: train_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0          # 0: no clipping (the norm is still computed and logged)
    implementation: str = "auto"    # "auto" (fused where supported, else foreach), "fused", "foreach", "for-loop"


@dataclass
class ParallelSection:
    """Parallel layout (applied by qwenlink.parallel): world size = pp x dp_replicate x dp_shard x cp x tp."""

    tp: int = 1                     # tensor parallel (Megatron's --tensor-model-parallel-size)
    pp: int = 1                     # pipeline stages (--pipeline-model-parallel-size)
    vpp: int = 1                    # model chunks per pipeline rank (interleaved schedule)
    layers_per_virtual_stage: int = 0  # ModelLink's --num-layers-per-virtual-pipeline-stage (sets vpp); 0: unused
    num_layer_list: list = field(default_factory=list)  # ModelLink's --num-layer-list: layers per pipeline rank
    dp_shard: int = -1              # FSDP2 sharding degree (ZeRO-3 like); -1: whatever is left of the world size
    dp_replicate: int = 1           # plain replicas (with dp_shard > 1: HSDP)
    cp: int = 1                     # context parallel: each sequence split over cp ranks (--context-parallel-size)
    ep: int = 1                     # expert parallel: experts over ep of the dp_shard ranks (--expert-model-parallel-size)
    sequence_parallel: bool = True  # with tp > 1, shard norms / residual activations over the sequence
    schedule: str = "1f1b"          # gpipe | 1f1b | interleaved-1f1b | interleaved-zero-bubble
    compile: Optional[bool] = None  # torch.compile each decoder block; unset: on for CUDA, off elsewhere


@dataclass
class CheckpointSection:
    """DCP checkpoints of the full training state; `latest` points at the newest complete one."""

    dir: str = ""                   # "": OUTPUT_DIR/checkpoints
    interval: int = 0               # save every N steps (0: only at the end)
    keep_last: int = 3
    resume: bool = True             # continue from dir/latest when it exists
    # Resume even though job.seed, data.path/weights, the batch, seq_length or the model shape changed since the
    # checkpoint (each changes what its step means; train/resume_guard.py refuses them by default).
    allow_config_change: bool = False
    export_hf: str = ""             # write the final model as an HF directory here
    save_final: bool = True
    async_save: bool = False        # TOML `async`: write in the background while training goes on (async_save.py)


@dataclass
class MetricsSection:
    """Where and how often metrics go; validation settings."""

    log_interval: int = 1
    jsonl: bool = True              # OUTPUT_DIR/metrics.jsonl
    tensorboard: bool = True        # OUTPUT_DIR/tensorboard (skipped with one notice when the package is absent)
    progress: str = "auto"          # "auto" (a progress bar on a terminal), "bar", "lines"
    eval_interval: int = 0          # 0: no validation during training
    eval_iters: int = 10
    peak_tflops: float = 0.0        # override the per-device peak used for MFU (0: table or measured)
    # Weights & Biases (`pip install 'qwenlink[wandb]'`): the TensorBoard scalars, same steps, one run per output_dir
    # across restarts; offline when WANDB_MODE says so or no API key / no network (docs/training.md#metrics).
    wandb: bool = False
    wandb_project: str = "qwenlink"
    wandb_name: str = ""            # "": job.name
    wandb_entity: str = ""          # "": the account's default entity


@dataclass
class LoraSection:
    """LoRA fine-tuning (models/lora.py): adapters on the named projections, everything else frozen."""

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # HF names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) or ModelLink's (query_key_value -> q,k,v;
    # dense -> o; dense_h_to_4h -> gate, up; dense_4h_to_h -> down).
    target_modules: list = field(default_factory=lambda: ["query_key_value", "dense", "dense_h_to_4h",
                                                          "dense_4h_to_h"])
    modules_to_save: list = field(default_factory=list)  # trained in full: embed_tokens / lm_head (word_embeddings..)
    use_rslora: bool = False        # scaling alpha / sqrt(r) instead of alpha / r
    base_dtype: str = "fp32"        # "bf16": keep the frozen base in bf16 (needs train.dtype = "bf16")
    export_adapter: str = ""        # write the final adapter here in PEFT format


@dataclass
class DpoSection:
    """Preference tuning, job.mode = "dpo" (train/dpo.py, docs/dpo.md)."""

    beta: float = 0.1               # strength of the pull towards the reference (the DPO paper's beta)
    loss_type: str = "sigmoid"      # "sigmoid" (DPO), "ipo", "hinge" (SLiC), "simpo" (reference-free)
    label_smoothing: float = 0.0    # sigmoid / simpo: assumed probability that a pair's preference is flipped (cDPO)
    gamma: float = 0.5              # simpo: the target reward margin (the SimPO paper's gamma)
    # Weight of the chosen replies' negative log-likelihood (token mean) added to the loss: TRL's "sft" loss type,
    # LLaMA-Factory's pref_ftx. Keeps the right answers likely while the rejected ones are pushed down.
    ftx: float = 0.0
    # Reference log-probabilities computed once, in a pass over the data before the first step, and stored next to
    # the data; false: computed every step by a frozen copy (full fine-tuning) or the base with adapters off (LoRA).
    precompute_reference: bool = False


@dataclass
class JobConfig:
    job: JobSection = field(default_factory=JobSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    lora: LoraSection = field(default_factory=LoraSection)
    dpo: DpoSection = field(default_factory=DpoSection)

    # ---- derived values -------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.job.output_dir) / "checkpoints"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = dataclasses.asdict(self)
        for (section, key), field_name in KEY_ALIASES.items():  # written under the documented key
            out[section][key] = out[section].pop(field_name)
        return out

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


# TOML keys that are Python keywords, and the field that holds them.
KEY_ALIASES: dict[tuple[str, str], str] = {("checkpoint", "async"): "async_save"}

SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(JobConfig)[f.name] for f in dataclasses.fields(JobConfig)}

VALID_CHOICES: dict[str, tuple[str, ...]] = {
    "job.mode": ("pretrain", "sft", "dpo"),
    "dpo.loss_type": ("sigmoid", "ipo", "hinge", "simpo"),
    "train.dtype": ("fp32", "bf16"),
    "train.activation_checkpoint": ("none", "full", "every_n"),
    "optim.decay_style": ("cosine", "linear", "constant"),
    "optim.implementation": ("auto", "fused", "foreach", "for-loop"),
    "metrics.progress": ("auto", "bar", "lines"),
    "lora.base_dtype": ("fp32", "bf16"),
}


# ---- reading ------------------------------------------------------------------------------------------------------
def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _all_keys() -> list[str]:
    documented = {(s, f): k for (s, k), f in KEY_ALIASES.items()}
    return [f"{s}.{documented.get((s, f.name), f.name)}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Check a TOML value against a field's type (ints are accepted for floats, a scalar for a list)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(where, value, args[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return [value]
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
    name = getattr(hint, "__name__", str(hint))
    raise QwenlinkError(f"{where}: expected {name}, got {value!r}")


def _apply(cfg: JobConfig, data: dict[str, Any], source: str) -> None:
    for section, values in data.items():
        if section not in SECTIONS:
            raise QwenlinkError(f"{source}: unknown section [{section}]{_suggest(section, list(SECTIONS))}")
        if not isinstance(values, dict):
            raise QwenlinkError(f"{source}: [{section}] must be a table")
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            key = KEY_ALIASES.get((section, key), key)
            if key not in hints:
                owners = [k for k in _all_keys() if k.endswith(f".{key}")]  # the right key in the wrong section?
                if owners:
                    close = f"; did you mean {owners[0]!r}?"
                else:
                    close = _suggest(f"{section}.{key}", [f"{section}.{k}" for k in hints]) or \
                        _suggest(f"{section}.{key}", _all_keys())
                raise QwenlinkError(f"{source}: unknown key {section}.{key}{close}")
            setattr(obj, key, _coerce(f"{source}: {section}.{key}", value, hints[key]))


def parse_override(text: str) -> tuple[str, str, Any]:
    """`--section.key=value` (or `section.key=value`) -> (section, key, value); values are parsed as TOML."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise QwenlinkError(f"override {text!r}: expected --section.key=value")
    dotted, raw = body.split("=", 1)
    if "." not in dotted:
        raise QwenlinkError(f"override {text!r}: expected --section.key=value (e.g. --optim.lr=3e-4)")
    section, key = dotted.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words (paths, names) are strings
    return section, key.replace("-", "_"), value


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a TOML job file (optional), apply `--section.key=value` overrides in order, then validate."""
    cfg = JobConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise QwenlinkError(f"{p}: config file not found")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise QwenlinkError(f"{p}: invalid TOML ({str(exc).splitlines()[0]})") from None
        _apply(cfg, data, str(p))
    for text in overrides:
        section, key, value = parse_override(text)
        if section == "model" and key.startswith("arch."):
            cfg.model.arch[key[len("arch."):]] = value
            continue
        _apply(cfg, {section: {key: value}}, f"override {text!r}")
    validate(cfg)
    return cfg


def validate(cfg: JobConfig) -> None:
    """Checks that need no files or devices: choices, positive sizes, batch geometry within one process's view."""
    for dotted, choices in VALID_CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise QwenlinkError(f"config: {dotted} = {value!r} is not one of {', '.join(choices)}"
                                f"{_suggest(str(value), choices)}")
    positive = ("train.micro_batch_size", "train.global_batch_size", "train.train_iters", "data.seq_length",
                "metrics.log_interval", "train.max_nonfinite_steps", "train.loss_chunk_size",
                "train.activation_checkpoint_every", "data.pad_to_multiple_of", "metrics.eval_iters")
    for dotted in positive:
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) <= 0:
            raise QwenlinkError(f"config: {dotted} must be positive, got {getattr(getattr(cfg, section), key)}")
    if cfg.optim.lr < 0 or cfg.optim.min_lr < 0 or cfg.optim.min_lr > cfg.optim.lr:
        raise QwenlinkError(f"config: need 0 <= optim.min_lr ({cfg.optim.min_lr}) <= optim.lr ({cfg.optim.lr})")
    if not 0.0 <= cfg.optim.warmup_fraction <= 1.0:
        raise QwenlinkError(f"config: optim.warmup_fraction must be in [0, 1], got {cfg.optim.warmup_fraction}")
    if cfg.checkpoint.keep_last < 1:
        raise QwenlinkError(f"config: checkpoint.keep_last must be at least 1, got {cfg.checkpoint.keep_last}")
    if (cfg.data.reset_attention_mask or cfg.data.reset_position_ids) and cfg.job.mode != "pretrain":
        raise QwenlinkError("config: data.reset_attention_mask / reset_position_ids are for pretraining; sft keeps "
                            "samples apart with data.pack = true (or padding)")
    if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.path):
        raise QwenlinkError(f"config: data.weights has {len(cfg.data.weights)} entries for {len(cfg.data.path)} "
                            f"data.path entries")
    for size in ("tp", "pp", "vpp", "dp_replicate", "cp", "ep"):
        if getattr(cfg.parallel, size) < 1:
            raise QwenlinkError(f"config: parallel.{size} must be at least 1")
    from qwenlink.train.lora import validate_section

    validate_section(cfg)
    from qwenlink.train import dpo_config

    dpo_config.validate_section(cfg)


def parallel_plan(cfg: JobConfig, world_size: int, model_config: Optional["ModelConfig"] = None):
    """The job's ParallelPlan for a world size: sizes multiplied out, and, given the model, every constraint of the
    layout against the model, the batch and the data (the one place a layout is validated; a bad launch fails here
    in a second, before any model is allocated)."""
    from qwenlink.parallel.mesh import plan_from_sizes, validate_plan

    p = cfg.parallel
    needed = p.tp * p.pp * p.dp_replicate * max(p.dp_shard, 1) * max(p.cp, 1)
    if world_size < needed:
        cp = f" x cp {p.cp}" if p.cp > 1 else ""
        raise QwenlinkError(f"config: the layout needs {needed} "
                            f"processes (tp {p.tp} x pp {p.pp} x dp_replicate {p.dp_replicate} x dp_shard "
                            f"{max(p.dp_shard, 1)}{cp}) but {world_size} process(es) are running (launch with "
                            f"`qwenlink train --nproc N` or torchrun --nproc-per-node N)")
    plan = plan_from_sizes(world_size=world_size, tp=p.tp, pp=p.pp, vpp=p.vpp,
                           layers_per_virtual_stage=p.layers_per_virtual_stage, dp_shard=p.dp_shard,
                           dp_replicate=p.dp_replicate, cp=p.cp, ep=p.ep,
                           num_layers=model_config.num_hidden_layers if model_config is not None else None,
                           sequence_parallel=p.sequence_parallel, schedule=p.schedule,
                           num_layer_list=list(p.num_layer_list) or None)
    if model_config is None:
        return plan
    validate_plan(plan, model_config, micro_batches=accumulation_steps(cfg, plan.dp), seq_length=cfg.data.seq_length)
    if model_config.is_moe:  # what a mixture-of-experts job cannot combine (cp; a PEFT export of expert adapters)
        from qwenlink.train.lora import lora_of
        from qwenlink.train.moe import check_moe_job

        lora = lora_of(cfg)
        check_moe_job(model_config, plan, lora.targets() if lora else (), cfg.lora.export_adapter)
    if plan.pp > 1 and cfg.data.valid_path and cfg.metrics.eval_interval:
        raise QwenlinkError("config: validation (metrics.eval_interval with data.valid_path) is not supported "
                            "with pipeline parallelism yet; evaluate a saved checkpoint instead")
    return plan


def data_parallel_size(cfg: JobConfig, world_size: int) -> int:
    """The data-parallel degree for a world size, checking that the parallel sizes multiply up to it."""
    return parallel_plan(cfg, world_size).dp


def accumulation_steps(cfg: JobConfig, dp_size: int) -> int:
    """Micro batches per optimizer step on each data-parallel rank (Megatron's num_micro_batches)."""
    per_step = cfg.train.micro_batch_size * dp_size
    if cfg.train.global_batch_size % per_step:
        raise QwenlinkError(f"config: train.global_batch_size ({cfg.train.global_batch_size}) is not divisible by "
                            f"train.micro_batch_size ({cfg.train.micro_batch_size}) x data-parallel size ({dp_size})")
    return cfg.train.global_batch_size // per_step


# ---- writing ------------------------------------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        raise TypeError("None has no TOML form")
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dumps_toml(data: dict[str, dict[str, Any]]) -> str:
    """Sections of scalars/lists/inline tables as TOML (None values are omitted: they mean "default")."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)

"""The training loop: one path for every layout, from one process to pp x dp x tp under torchrun.

    config -> plan (validated once, train/config.py) -> model on meta -> parallelize (parallel/parallelize.py)
    -> materialise -> layout-independent init (parallel/init.py) -> initial weights (init_from) -> resume
    -> steps (train/step.py: micro batches -> loss -> backward -> clip) -> optimizer -> metrics, checkpoints, export

One process is the plan whose sizes are all 1: the same functions run, each parallel dimension switched off.
Checkpoints hold model, optimizer, step, data position and RNG (checkpoint/dcp.py), so resuming continues bitwise.

A step never waits for the device: its loss, gradient norm and finiteness stay device tensors (the update of a
non-finite step is skipped on the device) and the loop reads them once per log interval, before a checkpoint and at
the end (`Trainer._settle`). `build_step_parts` builds one rank's model and step from the job alone (no data), which
is also what qwenlink.train.simulate runs on fake devices.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import torch

from qwenlink.checkpoint import dcp as ckpt
from qwenlink.checkpoint.loader import detect_format
from qwenlink.device import resolve_device
from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.parallel.init import init_weights
from qwenlink.parallel.mesh import ParallelPlan
from qwenlink.parallel.parallelize import Layout, ModelChunks, ParallelizeOptions, build_layout, build_model_chunks
from qwenlink.train import distributed as distrib
from qwenlink.train import lora as lora_train
from qwenlink.train.config import JobConfig, accumulation_steps, parallel_plan
from qwenlink.train.data import MicroBatch, MicroBatchStream, build_dataset
from qwenlink.train.loss import IGNORE_INDEX
from qwenlink.train.moe import RouterAuxLoss, check_moe_job
from qwenlink.train.metrics import MetricsLogger, format_line, peak_memory_gb, peak_tflops, throughput
from qwenlink.train.optim import Scheduler, build_optimizer
from qwenlink.train.plan import check_fits
from qwenlink.train.output_paths import check_outputs
from qwenlink.train import wandb_log
from qwenlink.train.resume_guard import check_unchanged
from qwenlink.train.step import TrainStep, all_reduce_sum, step_if_finite


# ---- model ----------------------------------------------------------------------------------------------------------
def resolve_model_config(cfg: JobConfig) -> ModelConfig:
    """The architecture: the preset, else init_from's (any checkpoint format, no weights read); then `[model.arch]`
    field overrides (e.g. `rms_norm_eps`, which a Megatron checkpoint's args do not record exactly)."""
    from qwenlink.checkpoint.loader import read_config
    from qwenlink.models.presets import get_preset

    if cfg.model.preset:
        config = get_preset(cfg.model.preset)
    elif cfg.model.init_from:
        config = read_config(cfg.model.init_from)
    else:
        raise QwenlinkError("config: set model.preset (e.g. qwen1.5-7b) or model.init_from (an HF directory, a "
                            "qwenlink checkpoint or a Megatron checkpoint)")
    if cfg.model.arch:
        names = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "extra"]
        for key in cfg.model.arch:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean 'model.arch.{close[0]}'?" if close else ""
                raise QwenlinkError(f"config: unknown key model.arch.{key}{hint}")
        config = dataclasses.replace(config, **cfg.model.arch)  # re-validated in __post_init__
    return config


def load_initial_weights(model: Qwen2Model, source: str) -> None:
    """Weights from an HF directory, a qwenlink checkpoint or a Megatron checkpoint (any TP/PP/VPP) into the built
    model (sharded or a pipeline stage), names, shapes and dtypes checked tensor by tensor."""
    from qwenlink.checkpoint.loader import load_into

    load_into(model, source)


def resolve_pad_id(cfg: JobConfig, config: ModelConfig) -> JobConfig:
    """The job with `data.pad_id` resolved: the configured id, else (-1) the tokenizer's pad or eos token; refused
    before training when it is not an id of the model's vocabulary (an embedding lookup would fail mid-step)."""
    pad_id = cfg.data.pad_id
    if pad_id < 0:
        if cfg.job.mode not in ("sft", "dpo"):
            return cfg  # pretraining samples are full sequences: nothing is padded
        from qwenlink.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer)
        found = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        if found is None:
            raise QwenlinkError(f"config: data.pad_id is not set and the tokenizer {cfg.data.tokenizer!r} has no pad "
                                f"or eos token; set data.pad_id")
        pad_id = found
    if pad_id >= config.vocab_size:
        raise QwenlinkError(f"config: data.pad_id = {pad_id} is outside the model's vocabulary of {config.vocab_size} "
                            f"ids (set data.pad_id, or leave it unset to take the tokenizer's pad token)")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pad_id=pad_id))


# ---- metrics --------------------------------------------------------------------------------------------------------
def step_flops(config: ModelConfig, batches: Sequence[MicroBatch], dp_size: int = 1) -> float:
    """Training FLOPs of one step from `ModelConfig.flops_per_token`, with the lm_head's share (6 x V x H per token)
    counted only at positions that have a label: the chunked loss never applies the head elsewhere, so counting it
    for SFT prompt tokens would report more FLOPs than were computed (MFU above 100%)."""
    head = 6.0 * config.vocab_size * config.hidden_size
    total = 0.0
    for b in batches:
        valid = int((b.labels != IGNORE_INDEX).sum())
        total += b.num_tokens * (config.flops_per_token(b.input_ids.shape[1]) - head) + valid * head
    return total * dp_size


@dataclass
class TrainState:
    """Everything about progress that is not a tensor (saved as train_state.json)."""

    step: int = 0
    consumed_samples: int = 0
    tokens_seen: int = 0
    skipped_nonfinite: int = 0
    nonfinite_in_row: int = 0
    global_batch_size: int = 0
    seq_length: int = 0


@dataclass
class StepResult:
    """One optimizer step's outcome; loss, grad_norm and finite are device tensors (see `read_results`)."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    finite: torch.Tensor  # False: the update was skipped (loss or gradient norm not finite)
    metrics: Optional[torch.Tensor] = None  # job.mode = "dpo": train/dpo.py's METRIC_NAMES, [6]
    aux_loss: Optional[torch.Tensor] = None  # a mixture of experts' load-balancing loss (train/moe.py), not in `loss`
    expert_load: Optional[torch.Tensor] = None  # MoE: per sparse layer, busiest expert's tokens / mean, [layers]


def read_results(results: Sequence[StepResult]) -> list[tuple[float, float, bool, list[float], Optional[float],
                                                                 Optional[list[float]]]]:
    """(loss, gradient norm, finite, objective metrics, MoE aux loss or None, MoE per-layer expert load or None) of
    each step, read from the device in one copy (one host synchronisation)."""
    if not results:
        return []

    def parts(r: StepResult) -> list[torch.Tensor]:
        none = r.loss.new_zeros(0)
        return [torch.stack([r.loss.float(), r.grad_norm.float(), r.finite.float()]),
                r.metrics.float() if r.metrics is not None else none,
                r.aux_loss.float().reshape(1) if r.aux_loss is not None else none,
                r.expert_load.float() if r.expert_load is not None else none]

    values = torch.stack([torch.cat(parts(r)) for r in results]).tolist()
    out = []
    for r, row in zip(results, values):
        n_metrics = r.metrics.numel() if r.metrics is not None else 0
        aux_at = 3 + n_metrics
        load_at = aux_at + (1 if r.aux_loss is not None else 0)
        out.append((row[0], row[1], row[2] == 1.0, row[3:aux_at], row[aux_at] if r.aux_loss is not None else None,
                    row[load_at:] if r.expert_load is not None else None))
    return out


# ---- one rank's model and step, from the job alone -----------------------------------------------------------------
@dataclass
class StepParts:
    """Everything one optimizer step needs on this rank: the mesh, the model chunks, the step, optimizer, schedule."""

    layout: Layout
    chunks: ModelChunks
    step_fn: TrainStep
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler


def compile_blocks(cfg: JobConfig, device: Optional[torch.device]) -> bool:
    """parallel.compile, or when unset: on for CUDA (fused elementwise kernels around the GEMMs), off elsewhere
    (a CPU run is a first try: compiling costs more than it saves on a few small steps)."""
    if cfg.parallel.compile is not None:
        return cfg.parallel.compile
    return device is not None and device.type == "cuda"


def enable_tf32(device: torch.device) -> None:
    """Any fp32 matmul left on a CUDA device (fp32 jobs, norms' and loss' leftovers) runs on TF32 tensor cores."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def parallelize_options(cfg: JobConfig, lora: Optional[Any], device: Optional[torch.device] = None
                        ) -> ParallelizeOptions:
    return ParallelizeOptions(
        activation_checkpoint=cfg.train.activation_checkpoint,
        activation_checkpoint_every=cfg.train.activation_checkpoint_every,
        # Recomputation must draw the same dropout masks as the forward did.
        preserve_rng_state=lora is not None and lora.dropout > 0,
        compile=compile_blocks(cfg, device),
        param_dtype=compute_dtype(cfg))


def compute_dtype(cfg: JobConfig) -> Optional[torch.dtype]:
    """The dtype parameters are gathered and computed in (None: their own, fp32). One mixed-precision policy for
    every layout: FSDP2's - bf16 compute copies of fp32 master weights, fp32 gradient reduction and optimizer state,
    a bf16 residual stream (norms and softmax accumulate in fp32) - applied over a size-1 mesh when the layout has
    no data parallelism. No autocast anywhere, so one process, TP, PP and FSDP compute the same way."""
    return torch.bfloat16 if cfg.train.dtype == "bf16" else None


def build_chunks(cfg: JobConfig, model_config: ModelConfig, layout: Layout, device: torch.device,
                 lora: Optional[Any], *, load_weights: bool = True) -> ModelChunks:
    """Meta -> (LoRA adapters) -> this rank's stages, parallelized -> materialise -> init -> initial weights
    (init_from, unless `load_weights` is False)."""
    chunks = build_model_chunks(model_config, layout, parallelize_options(cfg, lora, device),
                                adapt=lora_train.adapter_hook(lora, cfg.lora.base_dtype))
    chunks.materialize(device)
    torch.manual_seed(cfg.job.seed)  # the stream dropout draws from; the weights have their own generators
    init_weights(chunks.modules, seed=cfg.job.seed, std=cfg.model.init_std)
    model = chunks.state_module
    if not load_weights:
        return chunks
    if cfg.model.init_from and lora is not None:
        lora_train.load_base_weights(model, cfg.model.init_from, load_initial_weights)
    elif cfg.model.init_from:
        load_initial_weights(model, cfg.model.init_from)
    return chunks


def build_step_parts(cfg: JobConfig, model_config: ModelConfig, plan: ParallelPlan, device: torch.device, *,
                     lora: Optional[Any] = None, load_weights: bool = True) -> StepParts:
    """This rank's mesh (collective), model chunks, TrainStep, optimizer and schedule, as the Trainer trains them."""
    layout = build_layout(plan, device, model_config, mixed_precision=compute_dtype(cfg) is not None)
    chunks = build_chunks(cfg, model_config, layout, device, lora, load_weights=load_weights)
    objective = None
    if cfg.job.mode == "dpo":  # the preference loss strategy, and its frozen reference copy when it needs one
        from qwenlink.train.dpo import build_objective

        objective = build_objective(cfg, lora, lambda: build_chunks(cfg, model_config, layout, device, None,
                                                                    load_weights=load_weights))
    step_fn = TrainStep(chunks, layout, chunk_size=cfg.train.loss_chunk_size, seq_length=cfg.data.seq_length,
                        pad_id=cfg.data.pad_id, objective=objective)
    step_fn.router_aux = RouterAuxLoss.for_model(chunks.state_module, model_config, plan.tp)  # None if dense
    optimizer = build_optimizer(chunks.state_module, cfg.optim)
    return StepParts(layout, chunks, step_fn, optimizer, Scheduler(optimizer, cfg))


def run_step(parts: StepParts, batches: Sequence[MicroBatch], step: int, *, clip_grad: float) -> StepResult:
    """One optimizer step over this rank's micro batches, without a host synchronisation: lr -> loss and gradients
    -> clipping -> the update, skipped on the device when the loss or the gradient norm is not finite."""
    lr = parts.scheduler.apply(step)
    step_fn = parts.step_fn
    total_valid = step_fn.count_valid(batches)
    loss = step_fn.forward_backward(batches, total_valid)
    aux = step_fn.router_aux.step_mean(total_valid) if step_fn.router_aux is not None else None
    load = step_fn.router_aux.load_max_over_mean() if step_fn.router_aux is not None else None
    grad_norm = step_fn.clip_grad_norm_(clip_grad if clip_grad > 0 else math.inf)
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    step_if_finite(parts.optimizer, finite)
    parts.optimizer.zero_grad(set_to_none=True)
    metrics = step_fn.objective.step_metrics(step_fn) if step_fn.objective is not None else None
    return StepResult(step, loss, grad_norm, lr, finite, metrics, aux, load)


# ---- the trainer ------------------------------------------------------------------------------------------------
class Trainer:
    """Owns model, optimizer, data and checkpoints of one job; `train()` runs it to the end or to a signal.

    rank / world_size / local_rank come from `train.distributed.init_distributed` (all defaults: one process)."""

    def __init__(self, cfg: JobConfig, *, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 stream: TextIO = sys.stdout) -> None:
        self.rank, self.world_size = rank, world_size
        self.stream = stream
        check_outputs(cfg)  # a file or read-only parent where an output goes fails now, not at the first save
        self.model_config = resolve_model_config(cfg)
        self.cfg = cfg = resolve_pad_id(cfg, self.model_config)
        # The layout is checked against the model before anything is allocated (a bad launch fails in a second).
        self.plan = parallel_plan(cfg, world_size, self.model_config)
        self.distributed = self.plan.world_size > 1
        self.dp_size = self.plan.dp
        self.accum = accumulation_steps(cfg, self.dp_size)
        device = resolve_device(None if cfg.train.device == "auto" else cfg.train.device)
        self.device = distrib.device_for(distrib.DistInfo(rank, world_size, local_rank), device)
        check_fits(cfg, self.model_config, world_size, self.device, stream=stream)  # CUDA/NPU: refuse what cannot fit
        enable_tf32(self.device)
        if cfg.data.seq_length > self.model_config.max_position_embeddings:
            raise QwenlinkError(f"config: data.seq_length ({cfg.data.seq_length}) is above the model's "
                                f"max_position_embeddings ({self.model_config.max_position_embeddings})")
        # Data before the model: a wrong path should fail in a second, not after building a 7B model.
        num_samples = cfg.train.train_iters * cfg.train.global_batch_size
        if self.distributed and self.rank != 0:
            distrib.barrier()  # rank 0 builds (and caches) the sample index first; the others then read the cache
        self.dataset = build_dataset(cfg, cfg.data.path, num_samples)
        self.valid_dataset = (build_dataset(cfg, cfg.data.valid_path, cfg.metrics.eval_iters * cfg.train.micro_batch_size
                                            * self.dp_size) if cfg.data.valid_path else None)
        if self.distributed and self.rank == 0:
            distrib.barrier()
        self.lora = lora_train.lora_of(cfg)
        check_moe_job(self.model_config, self.plan, self.lora.targets() if self.lora else (), cfg.lora.export_adapter)
        self.parts = build_step_parts(cfg, self.model_config, self.plan, self.device, lora=self.lora)
        self.layout, self.chunks, self.step_fn = self.parts.layout, self.parts.chunks, self.parts.step_fn
        self.optimizer, self.scheduler = self.parts.optimizer, self.parts.scheduler
        self.dp_rank = self.layout.dp_rank
        self.model = self.chunks.state_module  # full parameter names: optimizer, checkpoints, export
        self.state = TrainState(global_batch_size=cfg.train.global_batch_size, seq_length=cfg.data.seq_length)
        self.resumed_from: Optional[Path] = None
        latest = ckpt.find_latest(cfg.checkpoint_dir) if cfg.checkpoint.resume else None
        if latest is not None:
            self._resume(latest)  # this run's own progress wins over init_from
        elif cfg.model.init_from and not cfg.train.finetune and self.lora is None and \
                detect_format(cfg.model.init_from) == "qwenlink":
            # Megatron's --load without --finetune: continue that run's optimizer, step and data position.
            self._resume(ckpt.resolve_step_dir(cfg.model.init_from))
        if cfg.job.mode == "dpo" and self.step_fn.objective.kind == "precomputed":
            from qwenlink.train.dpo_reference import precomputed_reference

            self.dataset.attach_reference(precomputed_reference(
                cfg, self.model_config, self.step_fn, self.step_fn.objective, self.dataset, micro_batches=self.accum,
                resumed=self.resumed_from is not None, lora=self.lora, rank=self.rank, log=self.log))
        self.data = MicroBatchStream(self.dataset, cfg, micro_batch_size=cfg.train.micro_batch_size,
                                     dp_rank=self.dp_rank, dp_size=self.dp_size,
                                     consumed_samples=self.state.consumed_samples,
                                     shuffle=cfg.data.shuffle and cfg.job.mode != "pretrain",
                                     prefetch=2 * self.accum, pin_memory=self.device.type in ("cuda", "npu"))
        self.history: list[dict[str, Any]] = []  # every step's record (tests and the quickstart read it)
        self._signal: Optional[int] = None

    # ---- resume -------------------------------------------------------------------------------------------------
    def _resume(self, step_dir: Path) -> None:
        lora_train.check_resume(step_dir, self.cfg, self.lora)
        # seed, data, batch, sequence length and model shape as the checkpoint's run had them (resume_guard.py)
        check_unchanged(step_dir, self.cfg, self.model_config)
        saved = ckpt.load_checkpoint(step_dir, self.model, self.optimizer, rank=self.rank,
                                     trainable_only=self.lora is not None)
        known = {f.name for f in dataclasses.fields(TrainState)}
        # The batch and sequence length now, when checkpoint.allow_config_change let them differ.
        saved.update(global_batch_size=self.state.global_batch_size, seq_length=self.state.seq_length)
        self.state = TrainState(**{k: v for k, v in saved.items() if k in known})
        self.resumed_from = step_dir

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _params_finite(self) -> bool:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        finite = all(bool(torch.isfinite(p).all()) for p in local)
        return not distrib.all_reduce_max(0 if finite else 1, self.device)  # every rank takes the same decision

    def log(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=self.stream, flush=True)

    # ---- steps --------------------------------------------------------------------------------------------------
    def train_step(self, batches: Sequence[MicroBatch], step: int) -> StepResult:
        """One optimizer step over `batches` (this rank's micro batches of the global batch). Nothing is read from
        the device: the result holds device tensors, which `_settle` reads once per log interval."""
        return run_step(self.parts, batches, step, clip_grad=self.cfg.optim.clip_grad)

    def _settle(self, pending: list[tuple[dict[str, Any], StepResult]], metrics: MetricsLogger) -> None:
        """Read the pending steps' loss, gradient norm and finiteness (one host synchronisation), count the skipped
        updates, fill and keep their records, and stop after train.max_nonfinite_steps non-finite steps in a row
        (every rank reads the same values, so all take the same decision)."""
        done = list(pending)
        pending.clear()
        for (record, result), (loss, grad_norm, finite, extra, aux, load) in zip(
                done, read_results([r for _, r in done])):
            record.update(loss=loss, grad_norm=grad_norm)
            if aux is not None:  # a mixture of experts' load-balancing loss (its coefficient not applied)
                record["aux_loss"] = aux
            if load:  # per sparse layer, the busiest expert's tokens over the mean (train/moe.py); the worst layer
                record["moe/load_max_over_mean"] = max(load)
                layers = self.parts.step_fn.router_aux.layers
                record.update({f"moe/load_max_over_mean/layer_{i}": v for i, v in zip(layers, load)})
            if extra:  # dpo: rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy, logps/...
                from qwenlink.train.dpo import METRIC_NAMES

                record.update(zip(METRIC_NAMES, extra))
            if finite:
                self.state.nonfinite_in_row = 0
            else:
                self.state.skipped_nonfinite += 1
                self.state.nonfinite_in_row += 1
            record["skipped_nonfinite"] = self.state.skipped_nonfinite
            self.history.append(record)
            if finite:
                continue
            step = result.step
            metrics.info(f"step {step}: loss {loss} / grad norm {grad_norm} is not finite; step skipped "
                         f"({self.state.nonfinite_in_row} in a row, {self.state.skipped_nonfinite} in total)")
            if self.state.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
                last = ckpt.find_latest(self.cfg.checkpoint_dir)
                raise QwenlinkError(
                    f"loss was not finite for {self.state.nonfinite_in_row} steps in a row (steps "
                    f"{step - self.state.nonfinite_in_row + 1}..{step}, train.max_nonfinite_steps="
                    f"{self.cfg.train.max_nonfinite_steps}); stopped without saving; last good checkpoint: "
                    f"{last if last else 'none'} (try a lower optim.lr or check the data)")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (mean over valid tokens) and perplexity on the first eval_iters micro batches."""
        assert self.valid_dataset is not None
        self.model.eval()
        stream = MicroBatchStream(self.valid_dataset, self.cfg, micro_batch_size=self.cfg.train.micro_batch_size,
                                  dp_rank=self.dp_rank, dp_size=self.dp_size)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        count = torch.zeros((), dtype=torch.float32, device=self.device)
        for _ in range(self.cfg.metrics.eval_iters):
            loss, n = self.step_fn.eval_loss(stream.next())
            total += loss
            count += n
        self.model.train()
        # Every tp rank of a replica adds the same loss and count, so their ratio is the global mean.
        val = float(all_reduce_sum(total) / all_reduce_sum(count).clamp(min=1))
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    def save(self) -> Optional[Path]:
        """Checkpoint the current step, unless the weights are not finite (a NaN checkpoint would poison resumes)."""
        if self.state.nonfinite_in_row:
            self.log(f"warning: step {self.state.step} had a non-finite loss; checkpoint deferred to the next good "
                     f"step")
            return None
        if not self._params_finite():
            self.log(f"warning: weights are not finite at step {self.state.step}; checkpoint NOT written")
            return None
        state = dataclasses.asdict(self.state)
        state["lr"] = self.scheduler.lr_at(max(self.state.step, 1))
        # checkpoint.async: the state is staged to host memory and written while training goes on; COMPLETE,
        # the rename and `latest` follow when the write is done (checkpoint/async_save.py).
        save = self._async_checkpointer().save if self.cfg.checkpoint.async_save else ckpt.save_checkpoint
        path = save(self.cfg.checkpoint_dir, self.state.step, self.model, self.optimizer,
                    train_state=state, job_toml=self.cfg.to_toml(),
                    keep_last=self.cfg.checkpoint.keep_last, rank=self.rank,
                    barrier=distrib.barrier,
                    trainable_only=self.lora is not None,
                    extra_files={lora_train.LORA_FILE: lora_train.reference_json(self.cfg, self.lora)}
                    if self.lora is not None else None)
        return path

    def _async_checkpointer(self):
        from qwenlink.checkpoint.async_save import AsyncCheckpointer

        if getattr(self, "_checkpointer", None) is None:
            self._checkpointer = AsyncCheckpointer()
        return self._checkpointer

    def wait_for_checkpoint(self) -> None:
        """Finish an asynchronous save still being written (its COMPLETE marker, `latest`); no-op otherwise."""
        if getattr(self, "_checkpointer", None) is not None:
            self._checkpointer.wait()

    # ---- loop ---------------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        """First signal: finish the step, save, exit. A second one (an impatient Ctrl-C) stops at once."""
        if self._signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self._signal = signum
        self.log(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
                 f"(send it again to stop without saving)")

    def train(self, *, stop_at: Optional[int] = None) -> int:
        """Run to train_iters (or `stop_at`, saving there); returns the exit code (128 + signal after a signal)."""
        cfg = self.cfg
        total = cfg.train.train_iters
        metrics = MetricsLogger(cfg.job.output_dir, total_steps=total, jsonl=cfg.metrics.jsonl,
                                tensorboard=cfg.metrics.tensorboard, progress=cfg.metrics.progress,
                                enabled=self.rank == 0, resume_step=self.state.step, stream=self.stream,
                                wandb=wandb_log.options_from_config(cfg))
        peak, peak_source = peak_tflops(self.device, cfg.train.dtype, cfg.metrics.peak_tflops)
        n_params = self.model_config.num_params()
        metrics.info(f"model: {n_params / 1e6:.1f}M parameters; device {self.device}; {self.dp_size} data-parallel "
                     f"rank(s) x {self.accum} micro batches of {cfg.train.micro_batch_size} = global batch "
                     f"{cfg.train.global_batch_size}; peak {peak:.3g} TFLOP/s ({peak_source})")
        if self.resumed_from is not None:
            metrics.info(f"resumed from {self.resumed_from} at step {self.state.step}")
        if self.lora is not None:
            from qwenlink.models.lora import count_parameters

            trainable, total_params = count_parameters(self.model)
            metrics.info(f"LoRA r={self.lora.r} alpha={self.lora.alpha:g} on {', '.join(self.lora.targets())}: "
                         f"{trainable / 1e6:.3f}M of {total_params / 1e6:.1f}M parameters trainable "
                         f"({100.0 * trainable / total_params:.2f}%)")
        old_handlers = {}
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        self.model.train()
        code = 0
        try:
            window_tokens, window_time, window_data, window_flops = 0, 0.0, 0.0, 0.0
            pending: list[tuple[dict[str, Any], StepResult]] = []  # steps whose values are still on the device

            def settle() -> float:
                """Read the pending steps (the host waits for the device here); returns the seconds it took."""
                t = time.perf_counter()
                self._settle(pending, metrics)
                return time.perf_counter() - t

            while self.state.step < total:
                step = self.state.step + 1
                t0 = time.perf_counter()
                batches = [self.data.next() for _ in range(self.accum)]
                t_data = time.perf_counter() - t0
                result = self.train_step(batches, step)
                elapsed = time.perf_counter() - t0
                tokens = sum(b.num_tokens for b in batches) * self.dp_size
                self.state.step = step
                self.state.consumed_samples += cfg.train.global_batch_size
                self.state.tokens_seen += tokens
                window_tokens, window_time, window_data = window_tokens + tokens, window_time + elapsed, \
                    window_data + t_data
                window_flops += step_flops(self.model_config, batches, self.dp_size)
                record: dict[str, Any] = {"step": step, "loss": None, "lr": result.lr, "grad_norm": None,
                                          "skipped_nonfinite": None, "tokens_seen": self.state.tokens_seen}
                pending.append((record, result))
                if step % cfg.metrics.log_interval == 0 or step == total:
                    window_time += settle()  # the device's share of the window that the host did not wait for yet
                    rates = throughput(window_tokens, window_time, world_size=self.world_size,
                                       flops_per_token=window_flops / max(window_tokens, 1), peak=peak)
                    record.update(tokens_per_s=rates.tokens_per_s,
                                  tokens_per_s_per_device=rates.tokens_per_s_per_device, tflops=rates.tflops_per_device,
                                  mfu=rates.mfu, peak_memory_gb=peak_memory_gb(self.device),
                                  data_time_share=window_data / max(window_time, 1e-9), step_time=window_time)
                    window_tokens, window_time, window_data, window_flops = 0, 0.0, 0.0, 0.0
                    if cfg.metrics.eval_interval and self.valid_dataset is not None and \
                            step % cfg.metrics.eval_interval == 0:
                        record.update(self.evaluate())
                    line = format_line(record, total)
                    if "rewards/accuracy" in record:  # dpo
                        line += (f" | reward acc {record['rewards/accuracy']:.2f} margin "
                                 f"{record['rewards/margin']:.3g}")
                    if "val_loss" in record:
                        line += f" | val {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})"
                    metrics.log(record, line)
                if self.distributed:  # all ranks must save at the same step: agree on whether a signal arrived
                    agreed = distrib.all_reduce_max(self._signal or 0, self.device)
                    self._signal = agreed or None
                if self._signal is not None:
                    window_time += settle()
                    path = self.save()
                    name = signal.Signals(self._signal).name
                    metrics.info(f"{name} received: saved {path} at step {step}; exiting (resume with the same "
                                 f"command)")
                    return 128 + self._signal
                if stop_at is not None and step >= stop_at:
                    window_time += settle()
                    self.save()
                    return 0
                if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < total:
                    window_time += settle()
                    path = self.save()
                    if path is not None:
                        metrics.info(f"saved {path}")
            settle()
            if self.valid_dataset is not None and cfg.metrics.eval_interval:
                val = self.evaluate()
                metrics.info(f"validation: loss {val['val_loss']:.4f}, perplexity {val['val_ppl']:.2f}")
            if cfg.checkpoint.save_final:
                path = self.save()
                if path is not None:
                    metrics.info(f"saved {path}")
            if cfg.checkpoint.export_hf:
                self.export_hf(cfg.checkpoint.export_hf)
                metrics.info(f"exported HF model to {cfg.checkpoint.export_hf}")
            if self.lora is not None and cfg.lora.export_adapter:
                self.export_adapter(cfg.lora.export_adapter)
                metrics.info(f"exported LoRA adapter (PEFT format) to {cfg.lora.export_adapter}")
        finally:
            self.data.close()  # the reading thread stops; what it read ahead stays for a later train()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            metrics.close()
            self.wait_for_checkpoint()  # every way out, a signal's included, leaves its last save complete
        return code

    def export_hf(self, directory: str) -> Path:
        """The current weights as an HF directory with the job's tokenizer (LoRA adapters merged), streamed from
        every stage and shard without gathering the model (train/export.py). Every rank calls this."""
        from qwenlink.tokenizer import load_tokenizer
        from qwenlink.train.export import export_hf

        if not self._params_finite():
            raise QwenlinkError(f"weights are not finite at step {self.state.step}; HF export refused")
        return export_hf(self.chunks, self.layout, directory,
                         tokenizer=lambda: load_tokenizer(self.cfg.data.tokenizer), chat=self._trained_chat)

    def _trained_chat(self, tokenizer) -> bool:
        """Was this model trained with ChatML (sft on ChatML data, or from a chat model)? Then its exports stop at
        <|im_end|> (checkpoint/chat_export.py)."""
        from qwenlink.checkpoint.chat_export import run_is_chat

        return run_is_chat(self.cfg.job.mode, self.cfg.data.path, self.cfg.model.init_from, tokenizer)

    def export_adapter(self, directory: str) -> Path:
        """The trained adapter (+ modules_to_save) in PEFT format, loadable by peft and `qwenlink ... --lora`."""
        from qwenlink.train.export import export_adapter

        if not self._params_finite():
            raise QwenlinkError(f"weights are not finite at step {self.state.step}; adapter export refused")
        assert self.lora is not None
        return export_adapter(self.chunks, self.layout, directory, self.lora, base_model=self.cfg.model.init_from,
                              generation=self._merged_generation_config)

    def _merged_generation_config(self) -> dict:
        """The generation config of base + this adapter, kept in the adapter's directory for `--merge-lora`."""
        from qwenlink.checkpoint.chat_export import generation_config
        from qwenlink.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        return generation_config(tokenizer, self._trained_chat(tokenizer))

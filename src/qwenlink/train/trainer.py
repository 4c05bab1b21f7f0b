"""The training loop: pretraining and full fine-tuning on one process, structured so a parallel plan can wrap it.

The pieces a parallel trainer reuses or replaces are separate functions:
- `build_training_model`: build on the meta device -> activation checkpointing -> `parallelize(model)` hook ->
  materialise on the device -> initialise -> load initial weights;
- `forward_backward`: gradient accumulation over micro batches with the loss normalised by the number of valid tokens
  in the *global* batch (`token_count_reduce` all-reduces it across data-parallel ranks);
- `MicroBatchStream` (train/data.py) takes the data-parallel rank and size.
Checkpoints hold model, optimizer, step, data position and RNG (checkpoint/dcp.py), so resuming continues bitwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence, TextIO

import torch
from torch import nn

from qwenlink.checkpoint import dcp as ckpt
from qwenlink.device import resolve_device
from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.train import lora as lora_train
from qwenlink.train import distributed as distrib
from qwenlink.train.config import JobConfig, accumulation_steps, parallel_plan
from qwenlink.train.data import MicroBatch, MicroBatchStream, build_dataset
from qwenlink.train.loss import IGNORE_INDEX, model_loss
from qwenlink.train.metrics import MetricsLogger, format_line, peak_memory_gb, peak_tflops, throughput
from qwenlink.train.optim import Scheduler, build_optimizer

Parallelize = Callable[[Qwen2Model, JobConfig], Qwen2Model]


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


def apply_activation_checkpointing(model: Qwen2Model, mode: str, every: int) -> None:
    """Recompute layer activations in backward: every layer ("full") or every `every`-th layer ("every_n")."""
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, name in enumerate(list(model.layers.keys())):
        if mode == "full" or i % every == 0:
            model.layers[name] = checkpoint_wrapper(model.layers[name], preserve_rng_state=False)


def build_training_model(cfg: JobConfig, config: ModelConfig, device: torch.device,
                         parallelize: Optional[Parallelize] = None) -> Qwen2Model:
    """Meta -> (activation checkpointing, parallel plan) -> materialise -> init -> initial weights.

    Parameters stay fp32 (bf16 runs use autocast, which keeps fp32 master weights and optimizer state).
    """
    with torch.device("meta"):
        model = Qwen2Model(config)
    apply_activation_checkpointing(model, cfg.train.activation_checkpoint, cfg.train.activation_checkpoint_every)
    model = lora_train.apply_to_meta_model(model, cfg)  # adapters + frozen base when [lora] is enabled
    if parallelize is not None:
        model = parallelize(model, cfg)
    model.to_empty(device=device)
    model.tie_weights()
    torch.manual_seed(cfg.job.seed)
    model.init_weights(cfg.model.init_std)
    if cfg.model.init_from and cfg.lora.enabled:
        lora_train.load_base_weights(model, cfg.model.init_from, load_initial_weights, cfg)
    elif cfg.model.init_from:
        load_initial_weights(model, cfg.model.init_from)
    return model


def load_initial_weights(model: Qwen2Model, source: str) -> None:
    """Weights from an HF directory, a qwenlink checkpoint or a Megatron checkpoint (any TP/PP/VPP) into the built
    model (sharded or a pipeline stage), names, shapes and dtypes checked tensor by tensor."""
    from qwenlink.checkpoint.loader import load_into

    load_into(model, source)


# ---- one optimizer step -----------------------------------------------------------------------------------------
def count_valid_tokens(batches: Sequence[MicroBatch]) -> int:
    return sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)


def forward_backward(model: nn.Module, batches: Sequence[MicroBatch], *, total_valid: int, chunk_size: int,
                     autocast: Callable[[], ContextManager] = nullcontext) -> torch.Tensor:
    """Accumulate gradients of the global-batch mean token loss over this rank's micro batches.

    Each micro batch contributes sum(CE) / total_valid, so accumulating k micro batches equals one batch k times
    as large, and data-parallel ranks' gradients just need summing. Returns this rank's share of the loss (fp32).
    """
    scale = 1.0 / max(total_valid, 1)
    total = torch.zeros((), dtype=torch.float32)
    for batch in batches:
        with autocast():
            loss, _ = model_loss(model, batch.input_ids, batch.labels, scale=scale, chunk_size=chunk_size,
                                 position_ids=batch.position_ids, attention_mask=batch.attention_mask)
        loss.backward()
        total += loss.detach().float().cpu()
    return total


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


def _all_reduce_sum(value: float) -> float:
    """Sum over all processes when a process group exists (data-parallel token counts and losses)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())
    return value


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
    step: int
    loss: float
    grad_norm: float
    lr: float
    skipped: bool


# ---- the trainer ------------------------------------------------------------------------------------------------
class Trainer:
    """Owns model, optimizer, data and checkpoints of one job; `train()` runs it to the end or to a signal."""

    def __init__(self, cfg: JobConfig, *, parallelize: Optional[Parallelize] = None, rank: int = 0,
                 world_size: int = 1, dp_rank: int = 0, stream: TextIO = sys.stdout) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.stream = stream
        self.model_config = resolve_model_config(cfg)
        # The layout is checked against the model before anything is allocated (a bad launch fails in a second).
        self.plan = parallel_plan(cfg, world_size, self.model_config.num_hidden_layers)
        self.distributed = self.plan.world_size > 1
        if self.distributed:
            self._validate_parallel()
        self.dp_size = self.plan.dp
        self.dp_rank = dp_rank if not self.distributed else (rank // self.plan.tp) % self.plan.dp
        self.accum = accumulation_steps(cfg, self.dp_size)
        device = resolve_device(None if cfg.train.device == "auto" else cfg.train.device)
        self.device = distrib.device_for(distrib.DistInfo(rank, world_size, int(__import__("os").environ.get(
            "LOCAL_RANK", "0"))), device)
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
        self.pm = None  # the ParallelModel when distributed
        if self.distributed:
            self.model = self._build_parallel_model()
        else:
            self.model = build_training_model(cfg, self.model_config, self.device, parallelize)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = Scheduler(self.optimizer, cfg)
        self.state = TrainState(global_batch_size=cfg.train.global_batch_size, seq_length=cfg.data.seq_length)
        self.resumed_from: Optional[Path] = None
        latest = ckpt.find_latest(cfg.checkpoint_dir) if cfg.checkpoint.resume else None
        if latest is not None:
            self._resume(latest)  # this run's own progress wins over init_from
        elif cfg.model.init_from and not cfg.train.finetune and self.lora is None and \
                ckpt.is_qwenlink_checkpoint(cfg.model.init_from):
            # Megatron's --load without --finetune: continue that run's optimizer, step and data position.
            self._resume(ckpt.resolve_step_dir(cfg.model.init_from))
        self.data = MicroBatchStream(self.dataset, cfg, micro_batch_size=cfg.train.micro_batch_size,
                                     dp_rank=self.dp_rank, dp_size=self.dp_size,
                                     consumed_samples=self.state.consumed_samples,
                                     shuffle=cfg.data.shuffle and cfg.job.mode == "sft")
        self.history: list[dict[str, Any]] = []  # every step's record (tests and the quickstart read it)
        self._signal: Optional[int] = None

    # ---- parallel layout ----------------------------------------------------------------------------------------
    def _validate_parallel(self) -> None:
        from qwenlink.parallel.mesh import validate_plan

        cfg, plan = self.cfg, self.plan
        validate_plan(plan, self.model_config, global_batch=cfg.train.global_batch_size,
                      micro_batch=cfg.train.micro_batch_size, seq_length=cfg.data.seq_length)
        if plan.pp > 1 and cfg.job.mode == "sft" and cfg.data.pack:
            raise QwenlinkError("config: data.pack = true (per-sample positions and masks) is not supported with "
                                "pipeline parallelism (parallel.pp > 1); use padding (data.pack = false)")
        if plan.pp > 1 and cfg.data.valid_path and cfg.metrics.eval_interval:
            raise QwenlinkError("config: validation (metrics.eval_interval with data.valid_path) is not supported "
                                "with pipeline parallelism yet; evaluate a saved checkpoint instead")

    def _build_parallel_model(self) -> nn.Module:
        """This rank's chunks under the plan (meta -> hooks -> TP/FSDP -> materialise -> init -> initial weights)."""
        from qwenlink.parallel.parallelize import build_parallel_model

        cfg = self.cfg
        lora_hook = lora_train.before_parallel_hook(cfg)

        def before_parallel(stage: Qwen2Model) -> None:
            apply_activation_checkpointing(stage, cfg.train.activation_checkpoint,
                                           cfg.train.activation_checkpoint_every)
            if lora_hook is not None:
                lora_hook(stage)
            if cfg.parallel.compile:
                for layer in stage.layers.values():
                    layer.compile()

        param_dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else None
        self.pm = build_parallel_model(self.model_config, self.plan, self.device, param_dtype=param_dtype,
                                       before_parallel=before_parallel, seed=cfg.job.seed,
                                       init_std=cfg.model.init_std)
        self.pm.chunk_size = cfg.train.loss_chunk_size
        model = self.pm.state_module
        if cfg.model.init_from:
            source = Path(cfg.model.init_from)
            from qwenlink.checkpoint.hf import is_hf_dir, load_hf_weights

            tied_across_stages = self.model_config.tie_word_embeddings and self.plan.pp > 1
            if ckpt.is_qwenlink_checkpoint(source) and self.lora is None:
                ckpt.load_checkpoint(ckpt.resolve_step_dir(source), model, None)  # DCP reshards on load
            elif is_hf_dir(source) and self.lora is None and not tied_across_stages:
                load_hf_weights(model, source)  # each rank reads only its stages' tensors, sliced to its shards
            else:
                # LoRA bases and heads tied to another stage's embedding: read whole on each rank, then sharded.
                full = build_training_model(dataclasses.replace(cfg, train=dataclasses.replace(
                    cfg.train, activation_checkpoint="none")), self.model_config, torch.device("cpu"))
                self.pm.load_full_state_dict(full.state_dict())
                del full
        return model

    def _full_cpu_model(self) -> Optional[Qwen2Model]:
        """Rank 0: an unsharded CPU copy of the model gathered from every stage and shard (collective)."""
        import torch.distributed as dist

        state = self.pm.full_state_dict()
        parts: list = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(state, parts, dst=0)
        if self.rank != 0:
            return None
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            merged.update(part)
        cfg = dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, init_from=""),
                                  train=dataclasses.replace(self.cfg.train, activation_checkpoint="none"))
        model = build_training_model(cfg, self.model_config, torch.device("cpu"))
        if self.model_config.tie_word_embeddings:
            merged.pop("lm_head.weight", None)
        model.load_state_dict(merged, strict=not self.model_config.tie_word_embeddings)
        model.tie_weights()
        return model

    # ---- resume -------------------------------------------------------------------------------------------------
    def _resume(self, step_dir: Path) -> None:
        lora_train.check_resume(step_dir, self.cfg, self.lora)
        saved = ckpt.load_checkpoint(step_dir, self.model, self.optimizer, rank=self.rank,
                                     trainable_only=self.lora is not None)
        for key in ("global_batch_size", "seq_length"):
            if saved.get(key) not in (None, getattr(self.state, key)):
                raise QwenlinkError(f"{step_dir}: checkpoint was written with {key}={saved[key]} but the config has "
                                    f"{getattr(self.state, key)}; resuming would not continue the same data order "
                                    f"(use model.init_from with train.finetune=true to start a new run from it)")
        known = {f.name for f in dataclasses.fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in saved.items() if k in known})
        self.resumed_from = step_dir

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _autocast(self) -> ContextManager:
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _params_finite(self) -> bool:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        finite = all(bool(torch.isfinite(p).all()) for p in local)
        return not distrib.all_reduce_max(0 if finite else 1)  # every rank takes the same decision

    def log(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=self.stream, flush=True)

    # ---- steps --------------------------------------------------------------------------------------------------
    def train_step(self, batches: Sequence[MicroBatch], step: int) -> StepResult:
        """One optimizer step over `batches` (this rank's micro batches of the global batch)."""
        if self.pm is not None:
            return self._parallel_step(batches, step)
        lr = self.scheduler.apply(step)
        total_valid = int(_all_reduce_sum(count_valid_tokens(batches)))
        loss = forward_backward(self.model, [b.to(self.device) for b in batches], total_valid=total_valid,
                                chunk_size=self.cfg.train.loss_chunk_size, autocast=self._autocast)
        loss_value = _all_reduce_sum(float(loss))
        clip = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True))
        return self._finish_step(step, loss_value, grad_norm, lr)

    def _finish_step(self, step: int, loss_value: float, grad_norm: float, lr: float) -> StepResult:
        """Apply the update, or skip and count it when the loss or the gradient norm is not finite."""
        skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        if skipped:
            self.state.skipped_nonfinite += 1
            self.state.nonfinite_in_row += 1
        else:
            self.optimizer.step()
            self.state.nonfinite_in_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(step, loss_value, grad_norm, lr, skipped)

    def _parallel_step(self, batches: Sequence[MicroBatch], step: int) -> StepResult:
        """The same step under the parallel layout: every tp/pp rank of a data-parallel replica sees the same
        batches, so sums over all ranks are divided by tp x pp to count each replica once."""
        lr = self.scheduler.apply(step)
        replicas = self.plan.tp * self.plan.pp
        total_valid = int(round(_all_reduce_sum(count_valid_tokens(batches)) / replicas))
        if self.plan.pp > 1:
            batches = _pad_to_common_length(batches, self.cfg.data.pad_id)
            tensors = [(b.input_ids, b.labels, None, None) for b in batches]
        else:
            tensors = [(b.input_ids, b.labels, b.position_ids, b.attention_mask) for b in batches]
        with self._autocast():
            loss = self.pm.forward_backward(tensors, scale=self.dp_size / max(total_valid, 1))
        loss_value = _all_reduce_sum(float(loss)) / replicas
        clip = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad > 0 else math.inf
        grad_norm = self.pm.clip_grad_norm_(clip)
        return self._finish_step(step, loss_value, grad_norm, lr)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (mean over valid tokens) and perplexity on the first eval_iters micro batches."""
        assert self.valid_dataset is not None
        self.model.eval()
        stream = MicroBatchStream(self.valid_dataset, self.cfg, micro_batch_size=self.cfg.train.micro_batch_size,
                                  dp_rank=self.dp_rank, dp_size=self.dp_size)
        total, count = 0.0, 0
        for _ in range(self.cfg.metrics.eval_iters):
            b = stream.next().to(self.device)
            if self.pm is not None:
                with self._autocast():
                    loss, n = self.pm.eval_loss(b.input_ids, b.labels, b.position_ids, b.attention_mask)
                total += loss / (self.plan.tp * self.plan.pp)
                count += n / (self.plan.tp * self.plan.pp)
                continue
            with self._autocast():
                loss, n = model_loss(self.model, b.input_ids, b.labels, scale=1.0,
                                     chunk_size=self.cfg.train.loss_chunk_size, position_ids=b.position_ids,
                                     attention_mask=b.attention_mask)
            total += float(loss)
            count += n
        self.model.train()
        total, count = _all_reduce_sum(total), _all_reduce_sum(count)
        val = total / max(count, 1)
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
        path = ckpt.save_checkpoint(self.cfg.checkpoint_dir, self.state.step, self.model, self.optimizer,
                                    train_state=state, job_toml=self.cfg.to_toml(),
                                    keep_last=self.cfg.checkpoint.keep_last, rank=self.rank,
                                    barrier=distrib.barrier,
                                    trainable_only=self.lora is not None,
                                    extra_files={lora_train.LORA_FILE: lora_train.reference_json(self.cfg, self.lora)}
                                    if self.lora is not None else None)
        return path

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
                                enabled=self.rank == 0, resume_step=self.state.step, stream=self.stream)
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
                record: dict[str, Any] = {"step": step, "loss": result.loss, "lr": result.lr,
                                          "grad_norm": result.grad_norm, "skipped_nonfinite": self.state.skipped_nonfinite,
                                          "tokens_seen": self.state.tokens_seen}
                if result.skipped:
                    metrics.info(f"step {step}: loss {result.loss} / grad norm {result.grad_norm} is not finite; "
                                 f"step skipped ({self.state.nonfinite_in_row} in a row, "
                                 f"{self.state.skipped_nonfinite} in total)")
                    if self.state.nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                        last = ckpt.find_latest(cfg.checkpoint_dir)
                        raise QwenlinkError(
                            f"loss was not finite for {self.state.nonfinite_in_row} steps in a row (steps "
                            f"{step - self.state.nonfinite_in_row + 1}..{step}, train.max_nonfinite_steps="
                            f"{cfg.train.max_nonfinite_steps}); stopped without saving; last good checkpoint: "
                            f"{last if last else 'none'} (try a lower optim.lr or check the data)")
                if step % cfg.metrics.log_interval == 0 or step == total:
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
                    if "val_loss" in record:
                        line += f" | val {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})"
                    metrics.log(record, line)
                self.history.append(record)
                if self.distributed:  # all ranks must save at the same step: agree on whether a signal arrived
                    agreed = distrib.all_reduce_max(self._signal or 0)
                    self._signal = agreed or None
                if self._signal is not None:
                    path = self.save()
                    name = signal.Signals(self._signal).name
                    metrics.info(f"{name} received: saved {path} at step {step}; exiting (resume with the same "
                                 f"command)")
                    return 128 + self._signal
                if stop_at is not None and step >= stop_at:
                    self.save()
                    return 0
                if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < total:
                    path = self.save()
                    if path is not None:
                        metrics.info(f"saved {path}")
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
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            metrics.close()
        return code

    def export_hf(self, directory: str) -> Path:
        """The current weights as an HF directory with the job's tokenizer."""
        from qwenlink.checkpoint.hf import save_hf_model
        from qwenlink.tokenizer import load_tokenizer

        if not self._params_finite():
            raise QwenlinkError(f"weights are not finite at step {self.state.step}; HF export refused")
        model = _unwrapped(self.model) if self.pm is None else self._full_cpu_model()
        if model is None:  # not rank 0: its shards were gathered; wait until rank 0 wrote the directory
            distrib.barrier()
            return Path(directory)
        tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        if self.lora is not None:  # the adapters folded into a copy: a plain HF model of the base's shape
            import copy

            from qwenlink.models.lora import merge_lora

            model = merge_lora(copy.deepcopy(model))
        path = save_hf_model(model, directory, tokenizer=tokenizer)
        if self.pm is not None:
            distrib.barrier()
        return path

    def export_adapter(self, directory: str) -> Path:
        """The trained adapter (+ modules_to_save) in PEFT format, loadable by peft and `qwenlink ... --lora`."""
        from qwenlink.checkpoint.peft import save_model_adapter

        if not self._params_finite():
            raise QwenlinkError(f"weights are not finite at step {self.state.step}; adapter export refused")
        assert self.lora is not None
        model = _unwrapped(self.model) if self.pm is None else self._full_cpu_model()
        if model is None:
            distrib.barrier()
            return Path(directory)
        path = save_model_adapter(model, directory, self.lora, base_model=self.cfg.model.init_from)
        if self.pm is not None:
            distrib.barrier()
        return path


def _pad_to_common_length(batches: Sequence[MicroBatch], pad_id: int) -> list[MicroBatch]:
    """Right-pad micro batches to one length (a pipeline schedule splits one tensor into equal micro batches)."""
    width = max(b.input_ids.shape[1] for b in batches)
    out = []
    for b in batches:
        extra = width - b.input_ids.shape[1]
        ids, labels = b.input_ids, b.labels
        if extra:
            ids = torch.nn.functional.pad(ids, (0, extra), value=pad_id)
            labels = torch.nn.functional.pad(labels, (0, extra), value=IGNORE_INDEX)
        out.append(dataclasses.replace(b, input_ids=ids, labels=labels, position_ids=None, attention_mask=None))
    return out


def _unwrapped(model: Qwen2Model) -> Qwen2Model:
    """The model with activation-checkpoint wrappers removed (parameter names as HF expects)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    if not any(isinstance(m, CheckpointWrapper) for m in model.layers.values()):
        return model
    import copy

    plain = copy.copy(model)
    plain._modules = dict(model._modules)
    plain.layers = nn.ModuleDict({k: (m._checkpoint_wrapped_module if isinstance(m, CheckpointWrapper) else m)
                                  for k, m in model.layers.items()})
    return plain

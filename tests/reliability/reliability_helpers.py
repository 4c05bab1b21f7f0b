"""Helpers for the fault-injection tests: a tiny corpus, the tiny job's overrides, and checkpoint/metrics checks."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable

import torch

from common import write_counting_corpus
from qwenlink.checkpoint import dcp as ckpt
from qwenlink.train.config import JobConfig, load_config

TRAIN_ITERS = 6


def write_corpus(root: Path) -> str:
    """Documents counting up modulo 50; returns the dataset prefix."""
    return write_counting_corpus(root, 60)


def job_overrides(prefix: str, out: Path, *extra: str) -> list[str]:
    """The tiny job (test-tiny, 16 tokens, global batch 4) with a checkpoint after every step, logging every step."""
    return ["--model.preset=test-tiny", f"--data.path={prefix}", "--data.seq_length=16",
            "--train.micro_batch_size=2", "--train.global_batch_size=4", f"--train.train_iters={TRAIN_ITERS}",
            "--train.device=cpu", "--optim.lr=5e-3", "--optim.min_lr=5e-4", "--optim.warmup_iters=1",
            f"--job.output_dir={out}", "--metrics.tensorboard=false", "--metrics.progress=lines",
            "--metrics.log_interval=1", "--checkpoint.interval=1", "--checkpoint.keep_last=2", *extra]


def job_config(prefix: str, out: Path, *extra: str) -> JobConfig:
    return load_config(None, job_overrides(prefix, out, *extra))


def run_in_process(cfg: JobConfig):
    from qwenlink.train.trainer import Trainer

    trainer = Trainer(cfg, stream=io.StringIO())
    code = trainer.train()
    return trainer, code


def jsonl_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from RUN_DIR/metrics.jsonl (every line must parse: a resume trims any line cut by a crash)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss"]
    return losses


def check_every_checkpoint_loads(cfg: JobConfig) -> list[int]:
    """Load every complete step directory (model + optimizer + RNG) into a fresh model; returns their steps.

    A directory that claims to be complete but cannot be loaded is the corruption these tests look for."""
    from qwenlink.models.qwen2 import build_model
    from qwenlink.train.optim import build_optimizer
    from qwenlink.train.trainer import resolve_model_config

    rng = torch.get_rng_state()
    steps = []
    try:
        for step_dir in ckpt.complete_steps(cfg.checkpoint_dir):
            model = build_model(resolve_model_config(cfg), device="cpu", dtype=torch.float32, init=False)
            optimizer = build_optimizer(model, cfg.optim)
            state = ckpt.load_checkpoint(step_dir, model, optimizer)
            assert state["step"] == int(step_dir.name.split("_")[1]), step_dir
            assert state["consumed_samples"] == state["step"] * cfg.train.global_batch_size
            assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
            steps.append(state["step"])
    finally:
        torch.set_rng_state(rng)
    return steps


def run_forked(run: Callable[[], None]) -> int:
    """Run `run` in a forked child process; returns its exit code, or -N if signal N ended it (as subprocess does).

    Fork (not a fresh interpreter) keeps each case to a fraction of a second: torch is already imported. The child
    uses one thread and never returns into pytest; an exception in it prints a traceback and exits with 3."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            torch.set_num_threads(1)
            run()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - report through the exit code, never unwind into pytest
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

"""Helpers for the fault-injection tests: a tiny corpus, the tiny job's overrides, and checkpoint/metrics checks."""

from __future__ import annotations

import faulthandler
import io
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


@dataclass(frozen=True)
class ChildResult:
    """How a child ended: its exit code, or -N if signal N ended it (as subprocess reports), and its stderr."""

    code: int
    stderr: str


_FORK_SERVER = multiprocessing.get_context("forkserver")
_FORK_SERVER.set_forkserver_preload(["torch", "qwenlink.train.trainer", "reliability_helpers"])


def run_forked(target: Callable[..., None], *args: Any) -> ChildResult:
    """Run `target(*args)` in a child process forked from a clean server process; returns how it ended.

    Forking the pytest process itself would hand the child whatever a thousand earlier tests left in it (thread
    pools, a library's locks held by threads that do not survive a fork): on the CI machine such children died of
    SIGABRT before reaching their injection point, which no local run reproduced. multiprocessing's fork server is
    a fresh interpreter that imports torch and qwenlink once; each child is a fork of it, so a case still starts
    in a fraction of a second. `target` must be a module-level function (it is pickled by name); the child runs on
    one thread, and its stderr (tracebacks, a fatal signal's Python stack) comes back for the assertion message."""
    with tempfile.NamedTemporaryFile("w+", suffix=".stderr", encoding="utf-8", errors="replace") as log:
        child = _FORK_SERVER.Process(target=_child_main, args=(log.name, target, args))
        child.start()
        child.join()
        log.seek(0)
        return ChildResult(child.exitcode, log.read()[-4000:])


def _child_main(log_path: str, target: Callable[..., None], args: tuple) -> None:
    """The child: stderr (and faulthandler's dump on a fatal signal) into `log_path`, then `target(*args)`; an
    exception prints its traceback and exits with 3, SystemExit keeps its code."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    sys.stderr = open(2, "w", closefd=False)
    faulthandler.enable(sys.stderr)
    code = 3
    try:
        torch.set_num_threads(1)
        target(*args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report through the exit code
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

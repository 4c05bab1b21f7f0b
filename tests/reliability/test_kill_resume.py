"""kill -9 the trainer anywhere, including inside every stage of writing a checkpoint, then resume.

Each case: the tiny job saves after every step (keep_last=2); a child process is SIGKILLed at one point of the
third save (or, with the CLI, at a random moment drawn from a seed). Then:
- every directory that looks complete loads (model, optimizer, RNG): no checkpoint is corrupt;
- the rerun resumes from the last complete checkpoint that `latest` (or, failing it, the newest) names;
- the losses in metrics.jsonl after the resume equal the uninterrupted run's, bitwise;
- nothing is left behind (no temporary or half-deleted step directories).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from qwenlink.checkpoint import dcp as ckpt
from qwenlink.train.trainer import Trainer
from reliability_helpers import (TRAIN_ITERS, check_every_checkpoint_loads, job_config, job_overrides,
                                 jsonl_losses, kill_self, run_forked, run_in_process)

TARGET_SAVE = 3  # kill inside the third save: by then keep_last=2 also prunes


@pytest.fixture(scope="module")
def reference(corpus: str, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run's losses, step -> loss."""
    out = tmp_path_factory.mktemp("reference") / "run"
    trainer, code = run_in_process(job_config(corpus, out))
    assert code == 0
    losses = jsonl_losses(out)
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    assert losses == {r["step"]: r["loss"] for r in trainer.history}
    return losses


# ---- injection points inside a save ----------------------------------------------------------------------------
# Each installs, in the child, patches that SIGKILL the process at one moment of save number TARGET_SAVE, and says
# which step the rerun must resume from.
def _in_target_save(monkeypatch) -> Callable[[], bool]:
    count = {"n": 0, "active": False}
    real = ckpt.save_checkpoint

    def counting(*args, **kwargs):
        count["n"] += 1
        count["active"] = count["n"] == TARGET_SAVE
        try:
            return real(*args, **kwargs)
        finally:
            count["active"] = False

    monkeypatch.setattr(ckpt, "save_checkpoint", counting)
    return lambda: count["active"]


def _kill_when(monkeypatch, owner, name: str, before: Callable[..., None] | None = None, nth: int = 1,
               match: Callable[..., bool] = lambda *a, **k: True) -> None:
    """Replace owner.name so that its nth matching call during the target save runs `before` and then dies."""
    active = _in_target_save(monkeypatch)
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        if active() and match(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == nth:
                if before is not None:
                    before(real, *args, **kwargs)
                kill_self()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def _to_file(suffix: str) -> Callable[..., bool]:
    """Calls whose second argument is a path ending in `suffix` (DCP's own torch.save calls write to streams)."""
    return lambda *args, **kwargs: len(args) > 1 and isinstance(args[1], (str, os.PathLike)) and \
        str(args[1]).endswith(suffix)


def _half_torch_save(real, obj, path, *a, **k) -> None:
    buf = io.BytesIO()
    real(obj, buf)
    Path(path).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _half_text(real, self, text, *a, **k) -> None:
    real(self, text[: len(text) // 2], *a, **k)


def _rmtree_one_file(real, path, *a, **k) -> None:
    """Delete only part of a step directory, as a crash in the middle of rmtree would."""
    for name in (".metadata", "__0_0.distcp"):
        (Path(path) / name).unlink(missing_ok=True)


def _points():
    from torch.distributed.checkpoint import FileSystemWriter

    from qwenlink import fileio

    # name: (owner, attribute, action before the kill, which matching call, calls that match, resume step)
    everything = lambda *a, **k: True  # noqa: E731
    return {
        "dcp-shards-written-no-metadata": (FileSystemWriter, "finish", None, 1, everything, TARGET_SAVE - 1),
        "dcp-done-before-rng": (torch, "save", None, 1, _to_file(".pt"), TARGET_SAVE - 1),
        "rng-file-half-written": (torch, "save", _half_torch_save, 1, _to_file(".pt"), TARGET_SAVE - 1),
        "train-state-half-written": (Path, "write_text", _half_text, 1,
                                     lambda self, *a, **k: self.name == "train_state.json", TARGET_SAVE - 1),
        "complete-marker-written-before-rename": (os, "replace", None, 1, everything, TARGET_SAVE - 1),
        "renamed-before-latest": (ckpt, "atomic_write_text", None, 1, everything, TARGET_SAVE - 1),
        "latest-temp-written-not-renamed": (fileio.os, "replace", None, 2, everything, TARGET_SAVE - 1),
        "mid-prune-of-oldest-step": (shutil, "rmtree", _rmtree_one_file, 1, everything, TARGET_SAVE),
    }


@pytest.mark.parametrize("point", list(_points()))
def test_kill_9_inside_a_save_then_resume(point: str, corpus: str, reference: dict[int, float], tmp_path: Path,
                                          monkeypatch) -> None:
    out = tmp_path / "run"
    cfg = job_config(corpus, out)
    child = run_forked(_train_until_killed_at, point, cfg)
    assert child.code == -signal.SIGKILL, \
        f"{point}: the injection point was never reached (exit {child.code}):\n{child.stderr}"
    _assert_survives(cfg, out, reference, _points()[point][-1])


def _train_until_killed_at(point: str, cfg) -> None:
    """The forked child: the job, with `point`'s patches installed."""
    owner, name, before, nth, match, _ = _points()[point]
    _kill_when(pytest.MonkeyPatch(), owner, name, before=before, nth=nth, match=match)
    Trainer(cfg, stream=io.StringIO()).train()


def _assert_survives(cfg, out: Path, reference: dict[int, float], resume_step: int | None) -> None:
    killed_at = max(jsonl_losses(out))
    survivors = check_every_checkpoint_loads(cfg)  # nothing that looks complete is corrupt
    latest = ckpt.find_latest(cfg.checkpoint_dir)
    if resume_step is not None:
        assert latest is not None and latest.name == ckpt.step_dir_name(resume_step), (survivors, latest)
    trainer = Trainer(cfg, stream=io.StringIO())
    start = trainer.state.step
    assert start == (int(latest.name.split("_")[1]) if latest else 0)
    assert start <= killed_at
    assert trainer.train() == 0
    assert [r["loss"] for r in trainer.history] == [reference[s] for s in range(start + 1, TRAIN_ITERS + 1)]
    assert jsonl_losses(out) == reference  # the whole curve, across the crash, equals the uninterrupted run
    root = cfg.checkpoint_dir
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000005", "step_00000006"]
    assert check_every_checkpoint_loads(cfg) == [5, 6]


# ---- kill -9 of `qwenlink train` at random moments -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_cli_at_a_random_moment_then_resume(seed: int, corpus: str, reference: dict[int, float],
                                                   tmp_path: Path) -> None:
    """The real command, killed a random time (seeded) after its first step; saves take much of each step here,
    so many kills land inside one. Resuming with the same command ends with the reference losses."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qwenlink.cli", "train", *job_overrides(corpus, out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step 1/") or time.time() > deadline:
            break
    time.sleep(random.Random(seed).uniform(0.0, 0.6))
    proc.kill()
    proc.communicate(timeout=60)
    cfg = job_config(corpus, out)
    if proc.returncode == 0:  # the run finished before the kill (a very fast machine): nothing to resume
        assert jsonl_losses(out) == reference
        return
    assert proc.returncode == -signal.SIGKILL
    check_every_checkpoint_loads(cfg)
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert jsonl_losses(out) == reference
    assert sorted(p.name for p in cfg.checkpoint_dir.iterdir()) == ["latest", "step_00000005", "step_00000006"]


# ---- asynchronous checkpoints (checkpoint.async) -------------------------------------------------------------------
def _async_points():
    """name: (FileSystemWriter method to die in during the target save's background write, wait first until the
    training thread has finished the next step)."""
    return {"async-write-in-flight-while-the-next-step-trains": ("write_data", True),
            "async-shards-written-no-metadata": ("finish", False)}


@pytest.mark.parametrize("point", list(_async_points()))
def test_kill_9_during_an_async_save_then_resume(point: str, corpus: str, reference: dict[int, float],
                                                 tmp_path: Path) -> None:
    """checkpoint.async: the target save's shards are written in a background thread while training goes on; a
    kill -9 there (after the next step has trained, or with every shard written but no .metadata yet) leaves no
    COMPLETE marker, and the rerun resumes from the previous complete checkpoint with the reference losses."""
    method, after_next_step = _async_points()[point]
    out = tmp_path / "run"
    cfg = job_config(corpus, out, "--checkpoint.async=true")
    child = run_forked(_train_until_killed_in_background_write, cfg, method, after_next_step)
    assert child.code == -signal.SIGKILL, \
        f"{point}: not killed inside the background write (exit {child.code}):\n{child.stderr}"
    if after_next_step:
        assert max(jsonl_losses(out)) == TARGET_SAVE + 1  # step 4 trained while step 3 was being written
    _assert_survives(cfg, out, reference, TARGET_SAVE - 1)


def _train_until_killed_in_background_write(cfg, method: str, after_next_step: bool) -> None:
    """The forked child: the asynchronous job, killed in FileSystemWriter.`method` of the target save."""
    from torch.distributed.checkpoint import FileSystemWriter

    trainer = Trainer(cfg, stream=io.StringIO())
    real = getattr(FileSystemWriter, method)
    target = f".tmp-{ckpt.step_dir_name(TARGET_SAVE)}"

    def dying(self, *args, **kwargs):
        if Path(self.path).name == target:
            deadline = time.monotonic() + 60
            while after_next_step and trainer.state.step <= TARGET_SAVE:  # the write waits; training does not
                if time.monotonic() > deadline:
                    os._exit(5)  # the step after the save never ran: the save blocked training
                time.sleep(0.01)
            kill_self()
        return real(self, *args, **kwargs)

    pytest.MonkeyPatch().setattr(FileSystemWriter, method, dying)
    trainer.train()


def test_async_checkpoints_resume_like_synchronous_ones(corpus: str, reference: dict[int, float],
                                                        tmp_path: Path) -> None:
    """Without a crash an asynchronous run ends with the same losses and the same complete checkpoints (the
    staged copy, not the parameters the next steps changed, is what was written: resuming step 5 reproduces the
    reference's step 6)."""
    out = tmp_path / "run"
    cfg = job_config(corpus, out, "--checkpoint.async=true")
    trainer, code = run_in_process(cfg)
    assert code == 0 and jsonl_losses(out) == reference
    assert sorted(p.name for p in cfg.checkpoint_dir.iterdir()) == ["latest", "step_00000005", "step_00000006"]
    assert check_every_checkpoint_loads(cfg) == [5, 6]
    shutil.rmtree(cfg.checkpoint_dir / "step_00000006")
    (cfg.checkpoint_dir / "latest").write_text("step_00000005\n")
    resumed, code = run_in_process(cfg)
    assert code == 0 and resumed.history[0]["step"] == 6 and resumed.history[0]["loss"] == reference[6]

"""A full disk while saving, and SIGTERM / a second signal: the previous checkpoint survives, errors are one line."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenlink import cli
from qwenlink.checkpoint import dcp as ckpt
from qwenlink.train.trainer import Trainer
from reliability_helpers import (TRAIN_ITERS, check_every_checkpoint_loads, job_config, job_overrides, jsonl_losses,
                                 run_forked, run_in_process)


@pytest.fixture(scope="module")
def reference(corpus: str, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("reference") / "run"
    _, code = run_in_process(job_config(corpus, out))
    assert code == 0
    return jsonl_losses(out)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _assert_only_previous_checkpoints(ckpt_dir: Path, steps: list[int]) -> None:
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["latest", *(ckpt.step_dir_name(s) for s in steps)], names  # no .tmp-step_N left behind
    assert (ckpt_dir / "latest").read_text().strip() == ckpt.step_dir_name(steps[-1])


def test_failing_writer_keeps_previous_checkpoint_and_reports_one_line(corpus: str, reference, tmp_path: Path,
                                                                        monkeypatch, capsys) -> None:
    """The third save runs out of space after DCP wrote its shards, half-way through the RNG file."""
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and str(f).endswith(".pt"):
            calls["n"] += 1
            if calls["n"] == 3:
                Path(f).write_bytes(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code = cli.main(["train", *job_overrides(corpus, out)])
    err = _one_line(capsys.readouterr().err)
    assert code == 2
    tmp = out / "checkpoints" / ".tmp-step_00000003"
    assert err.startswith(f"qwenlink train: error: {tmp}: saving checkpoint step 3 failed (No space left on device")
    assert f"the previous checkpoint ({out / 'checkpoints' / 'step_00000002'}) is intact" in err
    cfg = job_config(corpus, out)
    _assert_only_previous_checkpoints(cfg.checkpoint_dir, [1, 2])
    assert check_every_checkpoint_loads(cfg) == [1, 2]
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command resumes and finishes
    trainer, code = run_in_process(cfg)
    assert code == 0 and trainer.resumed_from == cfg.checkpoint_dir / "step_00000002"
    assert jsonl_losses(out) == reference


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 3 MiB tmpfs (one 1.8 MB checkpoint fits, a second one does not); skipped where mounting is not allowed."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk_on_a_small_tmpfs(corpus: str, reference, tmp_path: Path, small_tmpfs: Path) -> None:
    """`qwenlink train` with its checkpoints on a 3 MiB filesystem: step 1 fits, step 2 hits ENOSPC mid-write."""
    out = tmp_path / "run"
    ckpt_dir = small_tmpfs / "ckpt"
    cmd = [sys.executable, "-m", "qwenlink.cli", "train", *job_overrides(corpus, out, f"--checkpoint.dir={ckpt_dir}")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = _one_line(proc.stderr)
    # torch's zip writer reports ENOSPC as "unexpected pos"; the free space tells the user why
    assert f"{ckpt_dir / '.tmp-step_00000002'}: saving checkpoint step 2 failed (" in err
    assert " MiB free there: the disk is full)" in err
    assert f"previous checkpoint ({ckpt_dir / 'step_00000001'}) is intact" in err
    _assert_only_previous_checkpoints(ckpt_dir, [1])
    cfg = job_config(corpus, out, f"--checkpoint.dir={ckpt_dir}")
    assert check_every_checkpoint_loads(cfg) == [1]
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
    trainer, code = run_in_process(cfg)
    assert code == 0 and trainer.resumed_from == ckpt_dir / "step_00000001"
    assert jsonl_losses(out) == reference


def _signal_at(step: int, times: int):
    """Patch Trainer.train_step so that step `step` sends SIGTERM to its own process `times` times."""
    real = Trainer.train_step

    def train_step(self, batches, s):
        result = real(self, batches, s)
        if s == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)
        return result

    return train_step


def _train_signalled(cfg, step: int, times: int) -> None:
    """The forked child: the job, sending itself SIGTERM `times` times at step `step`; exits with train()'s code,
    or 130 for the KeyboardInterrupt that the CLI turns into "interrupted"."""
    Trainer.train_step = _signal_at(step, times)
    try:
        raise SystemExit(Trainer(cfg, stream=io.StringIO()).train())
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def test_sigterm_saves_then_resume_equals_uninterrupted(corpus: str, reference, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = job_config(corpus, out, "--checkpoint.interval=0")  # no periodic saves: only the signal's

    child = run_forked(_train_signalled, cfg, 3, 1)
    assert child.code == 128 + signal.SIGTERM, child.stderr
    assert [p.name for p in ckpt.complete_steps(cfg.checkpoint_dir)] == ["step_00000003"]
    trainer, code = run_in_process(cfg)
    assert code == 0 and trainer.resumed_from is not None and trainer.state.step == TRAIN_ITERS
    assert jsonl_losses(out) == reference


def test_second_sigterm_stops_at_once_and_keeps_the_last_checkpoint(corpus: str, tmp_path: Path) -> None:
    """An impatient second signal stops without saving; what was saved before stays complete and loadable."""
    out = tmp_path / "run"
    cfg = job_config(corpus, out)

    child = run_forked(_train_signalled, cfg, 3, 2)
    assert child.code == 130, child.stderr
    assert check_every_checkpoint_loads(cfg) == [1, 2]
    assert not list(cfg.checkpoint_dir.glob(".tmp-*"))

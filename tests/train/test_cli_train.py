"""`qwenlink train` as a user runs it: one-line errors with exit code 2, and SIGTERM saving before exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path



def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`qwenlink ARGS...` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "qwenlink.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _base(prefix: str, out: Path) -> list[str]:
    return ["train", "--model.preset=test-tiny", f"--data.path={prefix}", "--data.seq_length=16",
            "--train.micro_batch_size=2", "--train.global_batch_size=4", "--train.device=cpu",
            f"--job.output_dir={out}", "--metrics.tensorboard=false", "--metrics.progress=lines"]


def test_bad_inputs_exit_2_with_one_line(pretrain_prefix: str, tmp_path: Path) -> None:
    cases = {
        "--optim.lrr=1": "unknown key optim.lrr; did you mean 'optim.lr'?",
        "--train.global_batch_size=5": "train.global_batch_size (5) is not divisible by train.micro_batch_size (2)",
        f"--data.path={tmp_path / 'none'}": "none.idx not found",
    }
    for override, message in cases.items():
        proc = run_cli(*_base(pretrain_prefix, tmp_path / "run"), override)
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in proc.stderr, proc.stderr


def test_sigterm_saves_a_checkpoint_then_resume_finishes(pretrain_prefix: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qwenlink.cli", *_base(pretrain_prefix, out), "--train.train_iters=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 2/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received: saved" in stdout
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert step >= 2
    resumed = run_cli(*_base(pretrain_prefix, out), f"--train.train_iters={step + 1}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints' / latest} at step {step}" in resumed.stdout
    assert f"step {step + 1}/{step + 1}" in resumed.stdout

"""`qwenlink train --nproc 2` (gloo) with one rank killed by SIGKILL: every process ends, with an error that names the
failed rank, within a bounded time (no rank hangs in a collective); every checkpoint that looks complete loads; the
same command resumes and finishes with the uninterrupted run's losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from qwenlink.checkpoint import dcp as ckpt
from reliability_helpers import TRAIN_ITERS, check_every_checkpoint_loads, job_config, job_overrides, jsonl_losses, \
    run_in_process

NO_HANG_S = 60  # generous: every process must be gone this long after the kill


def _extra(init: str) -> list[str]:
    """Shared initial weights (random init differs between layouts; training must not) and foreach AdamW."""
    return [f"--model.init_from={init}", "--optim.implementation=foreach"]


def _cmd(prefix: str, init: str, out: Path) -> list[str]:
    # data parallel over 2 ranks, one micro batch of 2 each: the same global batch of 4 as the single-process job
    return [sys.executable, "-m", "qwenlink.cli", "train", *job_overrides(prefix, out, *_extra(init)), "--nproc=2"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _rank_processes(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The training ranks under `qwenlink train --nproc` -> torchrun, by their RANK environment variable."""
    ranks = {}
    for proc in launcher.children(recursive=True):
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "qwenlink.cli" in " ".join(proc.cmdline()):
            ranks[int(env["RANK"])] = proc
    return ranks


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> str:
    from qwenlink.checkpoint.hf import save_hf_model
    from qwenlink.models.presets import get_preset
    from qwenlink.models.qwen2 import build_model

    path = tmp_path_factory.mktemp("init") / "hf"
    save_hf_model(build_model(get_preset("test-tiny"), seed=7), path)
    return str(path)


@pytest.fixture(scope="module")
def reference(corpus: str, init: str, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("reference") / "run"
    _, code = run_in_process(job_config(corpus, out, *_extra(init)))
    assert code == 0
    return jsonl_losses(out)


def _close(a: dict[int, float], b: dict[int, float]) -> None:
    """Two data-parallel ranks sum gradients in another order than one process: equal to float rounding."""
    assert sorted(a) == sorted(b)
    for step in b:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(b[step]), f"step {step}: {a[step]} vs {b[step]}"


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1])
def test_kill_9_one_rank_ends_all_ranks_then_resume(victim: int, corpus: str, init: str, reference,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "run"
    launcher = subprocess.Popen(_cmd(corpus, init, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env())
    stderr_chunks: list[str] = []
    reader = threading.Thread(target=lambda: stderr_chunks.append(launcher.stderr.read()), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 240
        for line in launcher.stdout:  # rank 0 logs every step
            if line.startswith("step 2/") or time.time() > deadline:
                break
        ranks = _rank_processes(psutil.Process(launcher.pid))
        assert sorted(ranks) == [0, 1], ranks
        everyone = list(ranks.values())
        ranks[victim].send_signal(signal.SIGKILL)
        killed_at = time.time()
        launcher.stdout.read()
        launcher.wait(timeout=NO_HANG_S)
        gone, alive = psutil.wait_procs(everyone, timeout=max(1.0, NO_HANG_S - (time.time() - killed_at)))
        assert not alive, f"ranks still running {NO_HANG_S}s after the kill: {alive}"
    finally:
        if launcher.poll() is None:
            for proc in psutil.Process(launcher.pid).children(recursive=True):
                proc.kill()
            launcher.kill()
    reader.join(timeout=10)
    stderr = "".join(stderr_chunks)
    assert launcher.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"qwenlink train: error: rank {victim} (pid {ranks[victim].pid}) was killed by SIGKILL "
                           f"first; torchrun stopped the other ranks"), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]

    cfg = job_config(corpus, out, *_extra(init))
    survivors = check_every_checkpoint_loads(cfg)  # whatever looks complete loads (a save may have been cut)
    assert survivors, "no checkpoint survived (step 1 was saved before the kill)"
    latest = ckpt.find_latest(cfg.checkpoint_dir)
    resumed = subprocess.run(_cmd(corpus, init, out), capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {latest} at step {int(latest.name.split('_')[1])}" in resumed.stdout
    _close(jsonl_losses(out), reference)  # steps before the kill and after the resume
    assert sorted(p.name for p in cfg.checkpoint_dir.iterdir()) == [
        "latest", ckpt.step_dir_name(TRAIN_ITERS - 1), ckpt.step_dir_name(TRAIN_ITERS)]

"""SIGTERM / SIGHUP during preprocess (1 and 2 workers), generate --output and convert (issue 22, deliverable 5).

Each run is the real `qwenlink` command in its own session, signalled while it works (preprocess: once its temporary
`.bin` has data; generate: once it is decoding). After it ends: exit code 128 + the signal, one line on stderr, no
traceback, no leaked-semaphore warning, nothing left in the output directory (temporaries included), and no process of
its session still alive (the worker pool was terminated and joined). convert is signalled while its atomic
directory write has data (cli.main unwinds every command but train on these signals).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}


def _session_alive(sid: int) -> list[int]:
    """Pids of processes still in session `sid` (read from /proc)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session id
                alive.append(int(entry.name))
    return alive


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    return subprocess.Popen([sys.executable, "-m", "qwenlink.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _wait_until(process: subprocess.Popen, ready, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        assert process.poll() is None, f"ended before the signal: {process.stderr.read()}"
        assert time.monotonic() < deadline, "never got going"
        time.sleep(0.05)


def _check_stopped(process: subprocess.Popen, signum: int, command: str, out: Path) -> None:
    process.send_signal(signum)
    code = process.wait(timeout=60)
    stderr = process.stderr.read()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 128 + signum, stderr
    assert lines == [f"qwenlink {command}: stopped by {signal.Signals(signum).name}; partial outputs were removed"], \
        stderr
    assert "Traceback" not in stderr and "leaked" not in stderr
    assert sorted(p.name for p in out.iterdir()) == []
    deadline = time.monotonic() + 30
    while _session_alive(process.pid):  # workers exit right after the parent's terminate(); no orphan survives
        assert time.monotonic() < deadline, f"processes left: {_session_alive(process.pid)}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "big.jsonl"
    line = json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 40}) + "\n"
    path.write_text(line * 20_000)  # ~35 MB: tokenizing it takes far longer than the test waits
    return path


@pytest.mark.parametrize("workers,name", [(1, "SIGTERM"), (2, "SIGTERM"), (2, "SIGHUP")])
def test_preprocess_stops_cleanly(tmp_path, corpus, workers, name):
    out = tmp_path / "out"
    out.mkdir()
    process = _start(["preprocess", "--input", str(corpus), "--output-prefix", str(out / "data"),
                      "--workers", str(workers), "--batch-size", "200"])
    _wait_until(process, lambda: any(".bin.tmp-" in p.name and p.stat().st_size > 0 for p in out.iterdir()))
    _check_stopped(process, SIGNALS[name], "preprocess", out)


def test_generate_output_stops_cleanly_on_sigterm(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(64)))
    # 64 prompts x 400 tokens take minutes: the signal lands while the model loads or decodes, never after.
    process = _start(["generate", "--model", "qwen-tiny", "--input", str(prompts), "--max-new-tokens", "400",
                      "--max-batch", "2", "--output", str(out / "gen.jsonl")])
    _wait_until(process, lambda: _cpu_seconds(process.pid) > 4)  # past the imports, into decoding
    _check_stopped(process, signal.SIGTERM, "generate", out)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_convert_stops_cleanly_on_sigterm(tmp_path):
    """convert HF -> Megatron tp2 of a 0.4 GB model, signalled once its temporary output directory holds data."""
    from qwenlink.checkpoint.hf import save_hf_model
    from qwenlink.models.presets import get_preset
    from qwenlink.models.qwen2 import build_model

    source = save_hf_model(build_model(get_preset("qwen-bench"), seed=0), tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    process = _start(["convert", "--input", str(source), "--output", str(out / "mg"), "--to", "megatron",
                      "--tp", "2", "--dtype", "fp32"])

    def writing() -> bool:
        return any(p.name.startswith(".mg.tmp-") and any(f.is_file() and f.stat().st_size > 0 for f in p.rglob("*"))
                   for p in out.iterdir())

    _wait_until(process, writing)
    _check_stopped(process, signal.SIGTERM, "convert", out)

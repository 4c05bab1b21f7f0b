"""The quickstart end to end, shortened with --steps (the full run's accuracy is measured in docs/training.md): it
prints six example answers, writes its loss curve as a PNG, and every command it suggests at the end works as a
fresh `make quickstart` install has it (no matplotlib: hidden here by a stand-in package that fails to import).
The DPO demonstration (examples/dpo_demo.py), shortened too, starts from its model."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _inked_pixels(path: Path) -> int:
    """Pixels of qwenlink's own PNGs (8-bit RGB, filter 0) that are neither white nor grey: the drawn series."""
    data = path.read_bytes()
    width, height = _png_size(path)
    pos, idat = 8, b""
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    count = 0
    for y in range(height):
        row = raw[y * (3 * width + 1) + 1:(y + 1) * (3 * width + 1)]
        count += sum(1 for x in range(0, len(row), 3) if len({row[x], row[x + 1], row[x + 2]}) > 1)
    return count


SFT_STEPS = 40  # x 64 samples: past the answer priors, short of solving the tasks (what DPO starts from)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[Path, Path, dict, subprocess.CompletedProcess]:
    """One shortened quickstart run, shared by the tests below: (working dir, its output dir, env, the run)."""
    tmp = tmp_path_factory.mktemp("quickstart")
    out = tmp / "qs"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), "--steps", str(SFT_STEPS),
                           "--threads", "2", "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return tmp, out, env, done


def test_quickstart_shows_answers_writes_its_curve_and_every_suggested_command_works(quickstart):
    tmp_path, out, env, done = quickstart
    assert sum(line.lstrip().startswith(("[ok ]", "[bad]")) for line in done.stdout.splitlines()) == 6
    assert _png_size(out / "loss.png")[0] > 0
    summary = json.loads((out / "summary.json").read_text())
    commands = summary["next_commands"]
    cli = 1 if commands[0][0].endswith("qwenlink") else 3  # .venv/bin/qwenlink, else python -m qwenlink.cli
    assert [c[cli] for c in commands] == ["plot", "generate", "info"]
    assert all(shlex.join(c) in done.stdout for c in commands)  # printed as they are run here
    shim = tmp_path / "no-matplotlib"
    (shim / "matplotlib").mkdir(parents=True)
    (shim / "matplotlib" / "__init__.py").write_text("raise ImportError('not installed on a fresh machine')\n")
    fresh = dict(env, PYTHONPATH=str(shim))
    for argv in commands:
        ran = subprocess.run(argv, capture_output=True, text=True, env=fresh, cwd=tmp_path, timeout=300)
        assert ran.returncode == 0, f"{argv}: {ran.stdout[-1000:]} {ran.stderr[-1000:]}"
    assert _inked_pixels(out / "run" / "metrics.png") > 500  # drawn by qwenlink's own writer: curves, not a blank


def test_dpo_demonstration_raises_exact_match_and_reward_accuracy(quickstart):
    """examples/dpo_demo.py from the shortened quickstart's model, shortened too: pairs whose chosen answer is right
    and whose rejected one is the model's own wrong answer raise held-out exact match and the held-out reward
    accuracy (docs/dpo.md has the full-size run)."""
    tmp_path, out, env, _ = quickstart
    demo = tmp_path / "dpo"
    done = subprocess.run([sys.executable, str(REPO / "examples" / "dpo_demo.py"), "--sft", str(out / "hf"),
                           "--steps", "40", "--pairs", "400", "--threads", "2", "--out", str(demo)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["exact_match_after"] >= summary["exact_match_before"] + 0.05, summary
    assert summary["heldout_reward_accuracy"] >= 0.6, summary

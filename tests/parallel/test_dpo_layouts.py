"""DPO under every parallel dimension at once: `qwenlink train` at pp2 x tp2 x dp2 (8 gloo processes, one launch)
equals one process - losses, rewards and log-probabilities per step - with the frozen reference copy sharded and
pipelined like the policy (its own forward-only schedule). Pairs are the sampler's unit, so both halves of a pair
share a micro batch and a data-parallel rank by construction; a half pair on another rank would change the losses."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from dpo_helpers import dpo_args, write_pairs
from qwenlink.train.dpo import METRIC_NAMES


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[str, str]:
    from qwenlink.checkpoint.hf import save_hf_model
    from qwenlink.models.presets import get_preset
    from qwenlink.models.qwen2 import build_model

    root = tmp_path_factory.mktemp("dpo-layouts")
    save_hf_model(build_model(get_preset("test-tiny"), seed=7), root / "hf")
    return write_pairs(root, pairs=24, seed=3), str(root / "hf")


def _records(path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def _equal_to_one_process(single_args: list[str], layout_args: list[str], tmp_path, nproc: int,
                          replicas: int) -> None:
    from qwenlink.train.config import load_config
    from qwenlink.train.trainer import Trainer

    Trainer(load_config(None, single_args), stream=io.StringIO()).train()
    cmd = [sys.executable, "-m", "qwenlink.cli", "train", *layout_args, f"--nproc={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{replicas} data-parallel rank(s)" in result.stdout
    single, layout = _records(tmp_path / "single" / "metrics.jsonl"), _records(tmp_path / "layout" / "metrics.jsonl")
    assert sorted(layout) == sorted(single) == [1, 2, 3, 4]
    for step in single:
        for key in ("loss", *METRIC_NAMES):
            a, b = layout[step][key], single[step][key]
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (step, key, a, b)
    assert any(r["rewards/margin"] != 0 for r in single.values())


def test_pp2_tp2_dp2_equals_one_process(setup, tmp_path):
    prefix, init = setup
    ftx = "--dpo.ftx=0.5"  # the chosen replies' NLL: a token mean over the global batch, whatever the layout
    _equal_to_one_process([*dpo_args(prefix, tmp_path / "single", init), ftx],
                          [*dpo_args(prefix, tmp_path / "layout", init), ftx, "--parallel.pp=2", "--parallel.tp=2"],
                          tmp_path, nproc=8, replicas=2)


@pytest.mark.parametrize("layout, extra", [
    (["--parallel.cp=2", "--parallel.tp=2"], ["--dpo.precompute_reference=true"]),
    (["--parallel.cp=2", "--parallel.pp=2"], ["--dpo.ftx=0.5"]),
], ids=["cp2-tp2-precomputed-reference", "cp2-pp2-reference-copy"])
def test_context_parallel_equals_one_process(setup, tmp_path, layout, extra):
    """Each cp rank scores its own tokens of every row (a head and a tail chunk); the rows' log-probabilities are
    summed over cp before the pair losses, in the reference pass (computed once up front, or each step through a
    forward-only pipeline schedule) as in the policy's."""
    _, init = setup
    args = []
    for name in ("single", "layout"):  # own data copies: a precomputed reference is stored next to its data
        prefix = write_pairs(tmp_path / f"data-{name}", pairs=24, seed=3)
        args.append([*dpo_args(prefix, tmp_path / name, init), *extra])
    _equal_to_one_process(args[0], [*args[1], *layout], tmp_path, nproc=4, replicas=1)

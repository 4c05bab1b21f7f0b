"""Every parallel layout trains exactly like one process: same per-step losses and final weights (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel_reference import reference_run

WORKER = Path(__file__).resolve().parent / "layout_worker.py"

LAYOUTS = {
    "tp2": dict(tp=2),
    "pp2-1f1b": dict(pp=2, schedule="1f1b"),
    "pp2-vpp2-interleaved": dict(pp=2, vpp=2, schedule="interleaved-1f1b"),
    "dp2-fsdp": dict(dp_shard=2),
    "tp2-dp2": dict(tp=2, dp_shard=2),
    "tp2-pp2": dict(tp=2, pp=2),
    "pp2-dp2": dict(pp=2, dp_shard=2),
    "dp2-replicate": dict(dp_shard=1, dp_replicate=2),
    "pp2-vpp2-zero-bubble": dict(pp=2, vpp=2, schedule="interleaved-zero-bubble"),
}


def run_layout(tmp_path: Path, layout: dict, *, tied: bool = False, timeout: int = 240) -> dict:
    world = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp_shard", 1) * layout.get("dp_replicate", 1)
    spec = {"layout": layout, "seed": 3, "tied": tied, "global_batch": 4, "micro_batch": 1, "seq": 16, "layers": 4}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(WORKER), str(tmp_path), json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    parts = [torch.load(p, weights_only=True) for p in sorted(tmp_path.glob("pp*.pt"))]
    state = {}
    for part in parts:
        state.update(part["state"])
    return {"spec": spec, "losses": parts[0]["losses"], "state": state}


def assert_equivalent(got: dict) -> None:
    ref_losses, ref_state = reference_run(got["spec"])
    for step, (a, b) in enumerate(zip(got["losses"], ref_losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: loss {a} vs single-process {b}"
    missing = set(ref_state) - set(got["state"])
    if got["spec"]["tied"]:
        missing.discard("lm_head.weight")
    assert not missing, f"parameters not produced by any stage: {sorted(missing)}"
    for name, tensor in got["state"].items():
        diff = (tensor - ref_state[name]).abs().max().item()
        assert diff <= 1e-5, f"{name}: max abs diff {diff}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(tmp_path, name):
    assert_equivalent(run_layout(tmp_path, LAYOUTS[name]))


def test_tied_embeddings_across_pipeline_stages(tmp_path):
    got = run_layout(tmp_path, dict(pp=2), tied=True)
    assert torch.equal(got["state"]["lm_head.weight"], got["state"]["embed_tokens.weight"])
    assert_equivalent(got)

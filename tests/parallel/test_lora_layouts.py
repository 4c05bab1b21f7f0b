"""LoRA under tp2, dp2 (FSDP2) and pp2 trains exactly like one process: same losses, adapters, saved modules, and an
untouched base; optimizer state exists only for trainable parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_reference import lora_reference_run, make_lora_initial_state

WORKER = Path(__file__).resolve().parent / "lora_layout_worker.py"
LORA = {"r": 4, "alpha": 8, "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        "modules_to_save": ["output_layer"]}
LAYOUTS = {"tp2": dict(tp=2), "dp2-fsdp": dict(dp_shard=2), "pp2": dict(pp=2, schedule="1f1b")}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lora_layout_matches_single_process(tmp_path, name):
    layout = LAYOUTS[name]
    world = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp_shard", 1)
    spec = {"layout": layout, "seed": 3, "tied": False, "global_batch": 4, "micro_batch": 1, "seq": 16, "layers": 2,
            "lora": LORA}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", str(WORKER),
           str(tmp_path), json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    parts = [torch.load(p, weights_only=True) for p in sorted(tmp_path.glob("pp*.pt"))]
    state = {k: v for part in parts for k, v in part["state"].items()}
    for part in parts:  # AdamW state (step, exp_avg, exp_avg_sq) only for the trainable parameters
        assert part["optimizer_states"] == part["trainable"] and part["n_state"] == 3 * part["trainable"]

    ref_losses, ref_state = lora_reference_run(spec)
    for step, (a, b) in enumerate(zip(parts[0]["losses"], ref_losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: loss {a} vs single-process {b}"
    assert set(state) == set(ref_state)
    initial = make_lora_initial_state(spec)
    for name_, tensor in state.items():
        diff = (tensor - ref_state[name_]).abs().max().item()
        assert diff <= 1e-5, f"{name_}: max abs diff {diff}"
    assert torch.equal(state["layers.1.self_attn.q_proj.weight"], initial["layers.1.self_attn.q_proj.weight"])
    assert not torch.equal(state["lm_head.weight"], initial["lm_head.weight"])  # modules_to_save trained
    assert not torch.equal(state["layers.0.mlp.down_proj.lora_A"], initial["layers.0.mlp.down_proj.lora_A"])

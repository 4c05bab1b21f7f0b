"""The same seed gives bitwise the same initial weights in one process and under every layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from init_worker import initial_state

WORKER = Path(__file__).resolve().parent / "init_worker.py"

CASES = {
    "tp2": dict(layout=dict(tp=2)),
    "pp2-tied": dict(layout=dict(pp=2), tied=True),
    "dp2-fsdp-uneven": dict(layout=dict(dp_shard=2), vocab=321),  # the embedding's rows do not split evenly
    "tp2-pp2-lora": dict(layout=dict(tp=2, pp=2), lora=True),
    "tp2-dp2-fsdp": dict(layout=dict(tp=2, dp_shard=2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_initial_weights_do_not_depend_on_the_layout(tmp_path, name):
    spec = {"seed": 11, "tied": False, "lora": False, **CASES[name]}
    layout = spec["layout"]
    world = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp_shard", 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", str(WORKER),
           str(tmp_path), json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    got: dict[str, torch.Tensor] = {}
    for part in sorted(tmp_path.glob("pp*.pt")):
        got.update(torch.load(part, weights_only=True))
    ref, _ = initial_state({**spec, "layout": {}})  # one process: the trivial plan
    if spec["tied"]:
        assert torch.equal(got.pop("lm_head.weight"), ref["embed_tokens.weight"])  # the last stage's copy
        ref.pop("lm_head.weight", None)
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), f"{key}: differs from one process"
    if spec["lora"]:
        assert any(k.endswith("lora_A") and ref[k].abs().max() > 0 for k in ref)  # adapters drawn, not left zero


def test_initialisation_is_seeded_and_follows_the_rules():
    spec = {"seed": 11, "tied": False, "lora": True, "layout": {}}
    a, _ = initial_state(spec)
    b, _ = initial_state({**spec, "seed": 12})
    assert not torch.equal(a["layers.0.mlp.up_proj.weight"], b["layers.0.mlp.up_proj.weight"])
    assert torch.equal(a["layers.0.input_layernorm.weight"], torch.ones(64))
    assert torch.equal(a["layers.0.self_attn.q_proj.bias"], torch.zeros_like(a["layers.0.self_attn.q_proj.bias"]))
    assert torch.equal(a["layers.0.mlp.up_proj.lora_B"], torch.zeros_like(a["layers.0.mlp.up_proj.lora_B"]))
    std = a["layers.0.mlp.up_proj.weight"].std().item()
    assert 0.015 < std < 0.025  # Normal(0, initializer_range = 0.02)
    bound = 1 / 64 ** 0.5
    lora_a = a["layers.0.mlp.up_proj.lora_A"]
    assert lora_a.abs().max() <= bound and lora_a.abs().max() > 0.8 * bound  # uniform in +-1/sqrt(in_features)

"""Issue #16's accuracy bound: what `qwenlink plan --device cpu` predicts for each rank role is within 15% of what the
same tracker (qwenlink.train.memory.MemoryTracker) measures over a real training step on real CPU tensors, for one
process, LoRA, tp2, pp2 and dp2 (FSDP2). The real run is tests/train/plan_accuracy_worker.py under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenlink.parallel.simulate import SimulationError, stand_in_library
from qwenlink.train.config import load_config
from qwenlink.train.plan import DEVICES, plan_job
from qwenlink.train.trainer import resolve_model_config

WORKER = Path(__file__).resolve().parent / "plan_accuracy_worker.py"

LAYOUTS = {
    "one-process": (1, []),
    "lora": (1, ["lora.enabled=true", "model.init_from=unused"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2-fsdp": (2, []),
}


@pytest.fixture(scope="module")
def fake_cuda() -> None:
    try:
        stand_in_library("cuda")  # the plan simulates CPU jobs on the stand-in accelerator (train/plan.py)
    except SimulationError as exc:
        pytest.skip(str(exc))


def small_job(*overrides: str):
    """Wide enough that per-tensor 512-byte rounding is not what the comparison measures."""
    base = ["--model.preset=test-tiny", "--model.arch.hidden_size=128", "--model.arch.intermediate_size=352",
            "--model.arch.vocab_size=2048", "--model.arch.num_hidden_layers=4", "--data.path=unused",
            "--data.seq_length=64", "--train.micro_batch_size=2", "--train.global_batch_size=8", "--optim.lr=1e-3"]
    return load_config(None, base + [f"--{o}" for o in overrides])


def measure(cfg, world: int, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    job = out / "job.toml"
    job.write_text(cfg.to_toml())
    launch = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc-per-node={world}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([*launch, str(WORKER), str(job), str(out)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planned_peak_is_within_15_percent_of_the_measured_one(fake_cuda, tmp_path: Path, name: str) -> None:
    world, overrides = LAYOUTS[name]
    cfg = small_job(*overrides)
    plan = plan_job(cfg, world, DEVICES["cpu"], resolve_model_config(cfg), device_type="cpu")
    measured = measure(cfg, world, tmp_path)
    assert len(measured) == world
    for role in plan.roles:
        same_role = [m for m in measured if m["pp_rank"] == role.pp_rank]
        actual = max(m["peak_bytes"] for m in same_role)
        assert role.peak_bytes == pytest.approx(actual, rel=0.15), (role.report.by_category, same_role)
        # What the optimizer holds does not depend on kernels: it is predicted exactly.
        for category in ("params", "grads", "optimizer"):
            assert role.report.by_category[category] == same_role[0]["by_category"][category], category

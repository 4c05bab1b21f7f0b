"""A qwenlink (DCP) checkpoint from the internet cannot run code: `.metadata`, pickled values and RNG files.

torch.distributed.checkpoint's own reader unpickles `.metadata` without restriction and its default planner reads
non-tensor values with weights_only=False; qwenlink loads through safe_dcp instead. Each test plants a payload
that would create a marker file, checks the refusal names the file and the global, and that the marker is absent.
A control case shows the same file *does* run its payload under DCP's stock reader (so the test is meaningful).
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenlink.checkpoint import dcp as ckpt
from qwenlink.errors import QwenlinkError
from qwenlink.models.qwen2 import build_model
from qwenlink.train.optim import build_optimizer
from qwenlink.train.trainer import resolve_model_config
from reliability_helpers import job_config, run_in_process, write_corpus


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real two-step run; tests copy its step directory and tamper with the copy."""
    root = tmp_path_factory.mktemp("good")
    cfg = job_config(write_corpus(root), root / "run", "--train.train_iters=2")
    run_in_process(cfg)
    return cfg, cfg.checkpoint_dir / "step_00000002"


def _copy(step_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "downloaded" / step_dir.name
    shutil.copytree(step_dir, dst)
    return dst


def _load(cfg, step_dir: Path) -> None:
    model = build_model(resolve_model_config(cfg), device="cpu", dtype=torch.float32, init=False)
    ckpt.load_checkpoint(step_dir, model, build_optimizer(model, cfg.optim))


def test_malicious_metadata_is_refused_unrun(good, tmp_path: Path) -> None:
    cfg, step = good
    evil = _copy(step, tmp_path)
    marker = tmp_path / "pwned"
    metadata = pickle.loads((step / ".metadata").read_bytes())
    metadata.planner_data = _Payload(os.system, f"touch {marker}")
    (evil / ".metadata").write_bytes(pickle.dumps(metadata))
    for load in (lambda: _load(cfg, evil), lambda: ckpt.load_model_from_checkpoint(evil)):
        with pytest.raises(QwenlinkError) as info:
            load()
        message = str(info.value)
        assert message.startswith(f"{evil / '.metadata'}: refused to load checkpoint metadata: disallowed global")
        assert "system" in message and "nothing from the file was executed" in message
        assert not marker.exists()
    # control: DCP's stock reader runs the payload (in a child process, so nothing leaks into this one)
    code = (f"import torch.distributed.checkpoint as d; d.FileSystemReader({str(evil)!r}).read_metadata()")
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert marker.exists(), "control case: the stock DCP reader should have executed the payload"


def test_malicious_pickled_value_in_shards_is_refused_unrun(good, tmp_path: Path) -> None:
    """Re-save the checkpoint with one optimizer hyper-parameter replaced by a payload (DCP stores it pickled)."""
    cfg, step = good
    import torch.distributed.checkpoint as dcp

    evil = tmp_path / "downloaded" / step.name
    shutil.copytree(step, evil, ignore=shutil.ignore_patterns(".metadata", "*.distcp"))
    model = build_model(resolve_model_config(cfg), device="cpu", dtype=torch.float32, init=False)
    optimizer = build_optimizer(model, cfg.optim)
    ckpt.load_checkpoint(step, model, optimizer)
    state = ckpt._state_dicts(model, optimizer)
    marker = tmp_path / "pwned"
    payload = _Payload(os.system, f"touch {marker}")
    optim = state["optimizer"]
    if isinstance(optim.get("param_groups"), list):  # nested optimizer state
        optim["param_groups"][0]["lr"] = payload
    else:  # flattened per parameter name: "param_groups.<fqn>.lr"
        optim[next(k for k in optim if k.startswith("param_groups.") and k.endswith(".lr"))] = payload
    with ckpt._quiet():
        dcp.save(state, checkpoint_id=str(evil))
    assert not marker.exists()
    with pytest.raises(QwenlinkError) as info:
        _load(cfg, evil)
    message = str(info.value)
    assert message.startswith(f"{evil}: refused to load value 'optimizer.param_groups."), message
    assert ".lr'" in message
    assert "system" in message and "nothing from the file was executed" in message
    assert not marker.exists()


def test_malicious_rng_file_is_refused_unrun(good, tmp_path: Path) -> None:
    cfg, step = good
    evil = _copy(step, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"torch": torch.get_rng_state(), "python": _Payload(os.system, f"touch {marker}")},
               evil / "rng" / "rank_00000.pt")
    with pytest.raises(QwenlinkError, match=r"rank_00000\.pt: refused to load pickle: disallowed global"):
        _load(cfg, evil)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated-shards", "truncated-metadata", "empty-rng"])
def test_damaged_checkpoint_files_are_one_line_errors(good, tmp_path: Path, damage: str) -> None:
    cfg, step = good
    bad = _copy(step, tmp_path)
    target = {"truncated-shards": bad / "__0_0.distcp", "truncated-metadata": bad / ".metadata",
              "empty-rng": bad / "rng" / "rank_00000.pt"}[damage]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3] if damage != "empty-rng" else b"")
    with pytest.raises(QwenlinkError) as info:
        _load(cfg, bad)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message, message

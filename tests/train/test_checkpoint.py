"""DCP checkpoints: layout, `latest`, pruning, model-only loading for convert/generate."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from qwenlink.checkpoint import dcp as ckpt
from qwenlink.errors import QwenlinkError
from qwenlink.train.trainer import Trainer


def test_layout_latest_and_keep_last(make_config) -> None:
    cfg = make_config("train.train_iters=6", "checkpoint.interval=2", "checkpoint.keep_last=2")
    t = Trainer(cfg, stream=io.StringIO())
    t.train()
    root = cfg.checkpoint_dir
    assert [p.name for p in ckpt.complete_steps(root)] == ["step_00000004", "step_00000006"]
    assert (root / "latest").read_text().strip() == "step_00000006"
    step = root / "step_00000006"
    for name in (".metadata", "COMPLETE", "config.json", "job.toml", "train_state.json", "rng/rank_00000.pt"):
        assert (step / name).is_file(), name
    assert json.loads((step / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert json.loads((step / "train_state.json").read_text())["consumed_samples"] == 6 * 4
    assert 'preset = "test-tiny"' in (step / "job.toml").read_text()
    assert not list(root.glob(".tmp-*"))


def test_latest_pointer_to_incomplete_falls_back(make_config) -> None:
    cfg = make_config("train.train_iters=4", "checkpoint.interval=2")
    Trainer(cfg, stream=io.StringIO()).train()
    root = cfg.checkpoint_dir
    (root / "step_00000004" / "COMPLETE").unlink()
    assert ckpt.find_latest(root).name == "step_00000002"
    with pytest.raises(QwenlinkError, match="checkpoint is incomplete"):
        ckpt.resolve_step_dir(root / "step_00000004")


def test_load_model_from_checkpoint_for_inference(make_config) -> None:
    cfg = make_config("train.train_iters=2")
    t = Trainer(cfg, stream=io.StringIO())
    t.train()
    run_dir = Path(cfg.job.output_dir)
    assert ckpt.is_qwenlink_checkpoint(cfg.checkpoint_dir)
    assert ckpt.is_qwenlink_checkpoint(cfg.checkpoint_dir / "step_00000002")
    assert not ckpt.is_qwenlink_checkpoint(run_dir)  # a run dir is accepted by resolve_step_dir, not detected
    for where in (run_dir, cfg.checkpoint_dir, cfg.checkpoint_dir / "step_00000002"):
        model = ckpt.load_model_from_checkpoint(where, "cpu", torch.bfloat16)
        assert model.embed_tokens.weight.dtype == torch.bfloat16
        for p, q in zip(t.model.parameters(), model.parameters()):
            assert torch.equal(p.to(torch.bfloat16), q)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    assert not ckpt.is_qwenlink_checkpoint(tmp_path)
    with pytest.raises(QwenlinkError, match="no complete qwenlink checkpoint found"):
        ckpt.load_model_from_checkpoint(tmp_path)

"""Resume refuses a checkpoint whose run had another seed, data, mixture or model shape (train/resume_guard.py),
naming each change, unless checkpoint.allow_config_change; a checkpoint without job.toml (older runs) resumes."""

from __future__ import annotations

import io

import pytest

from qwenlink.errors import QwenlinkError
from qwenlink.train.trainer import Trainer


def quiet(cfg) -> Trainer:
    return Trainer(cfg, stream=io.StringIO())


@pytest.fixture
def first_run(make_config, pretrain_prefix):
    """Two steps over a two-dataset mixture, checkpointed at the end; returns the overrides that wrote it."""
    base = (f"data.path=[\"{pretrain_prefix}\", \"{pretrain_prefix}\"]", "data.weights=[0.5, 0.5]",
            "train.train_iters=2")
    assert quiet(make_config(*base)).train() == 0
    return base


def test_changed_settings_are_refused_by_name(make_config, pretrain_prefix, first_run) -> None:
    cases = {
        ("job.seed=99",): "job.seed was 1234, now 99",
        ("data.weights=[0.7, 0.3]",): "data.weights was [0.5, 0.5], now [0.7, 0.3]",
        (f"data.path=[\"{pretrain_prefix}\"]", "data.weights=[]"): "data.path was [",
        ("model.arch.intermediate_size=64",): "model intermediate_size was",
        ("data.seq_length=8",): "data.seq_length was 16, now 8",
    }
    for overrides, message in cases.items():
        with pytest.raises(QwenlinkError, match="the config changed since this checkpoint") as err:
            quiet(make_config(*first_run, *overrides, "train.train_iters=3"))
        assert message in str(err.value) and "checkpoint.allow_config_change = true" in str(err.value)
    # two changes at once are both named
    with pytest.raises(QwenlinkError, match="job.seed was 1234, now 99; data.weights was"):
        quiet(make_config(*first_run, "job.seed=99", "data.weights=[0.7, 0.3]"))


def test_allow_config_change_and_older_checkpoints_resume(make_config, first_run) -> None:
    allowed = quiet(make_config(*first_run, "job.seed=99", "checkpoint.allow_config_change=true",
                                "train.train_iters=3"))
    assert allowed.resumed_from is not None and allowed.state.step == 2
    unchanged = quiet(make_config(*first_run, "train.train_iters=3"))
    assert unchanged.resumed_from is not None
    (unchanged.resumed_from / "job.toml").unlink()  # written before the guard existed: nothing to compare with
    older = quiet(make_config(*first_run, "job.seed=99", "train.train_iters=3"))
    assert older.resumed_from is not None and older.state.step == 2

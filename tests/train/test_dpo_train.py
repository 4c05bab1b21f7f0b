"""`job.mode = "dpo"` through the one Trainer: the three reference sources agree, resume is exact, metrics are logged
and plotted, bad settings are refused in one line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from dpo_helpers import dpo_args, write_pairs
from qwenlink.errors import QwenlinkError
from qwenlink.train.config import load_config
from qwenlink.train.dpo import METRIC_NAMES
from qwenlink.train.trainer import Trainer

LORA = ["--lora.enabled=true", "--lora.r=4", "--lora.alpha=8", "--lora.target_modules=[\"all-linear\"]",
        "--optim.lr=5e-2"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> str:
    from qwenlink.checkpoint.hf import save_hf_model
    from qwenlink.models.presets import get_preset
    from qwenlink.models.qwen2 import build_model

    path = tmp_path_factory.mktemp("init") / "hf"
    save_hf_model(build_model(get_preset("test-tiny"), seed=7), path)
    return str(path)


def _train(args: list[str], *, stop_at: int | None = None) -> tuple[list[dict], str]:
    stream = io.StringIO()
    trainer = Trainer(load_config(None, args), stream=stream)
    assert trainer.train(stop_at=stop_at) == 0
    return trainer.history, stream.getvalue()


def _same(a: list[dict], b: list[dict], keys=("loss", *METRIC_NAMES), tol: float = 1e-6) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            assert abs(ra[key] - rb[key]) <= tol * max(1.0, abs(rb[key])), (ra["step"], key, ra[key], rb[key])


@pytest.fixture(scope="module")
def copy_run(pairs, init_dir, tmp_path_factory) -> list[dict]:
    history, _ = _train(dpo_args(pairs, tmp_path_factory.mktemp("copy") / "run", init_dir))
    return history


def test_precomputed_reference_equals_the_frozen_copy(pairs, init_dir, copy_run, tmp_path):
    """The reference computed once before training (stored next to the data, read back by a second run) gives the
    same losses and metrics as the frozen copy computing it every step; every metric is logged every step."""
    assert [r["step"] for r in copy_run] == [1, 2, 3, 4]
    assert copy_run[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference before the first update
    assert len({round(r["loss"], 6) for r in copy_run}) > 1 and any(r["rewards/margin"] != 0 for r in copy_run)
    args = dpo_args(pairs, tmp_path / "pre", init_dir, "--dpo.precompute_reference=true")
    history, log = _train(args)
    _same(history, copy_run)
    files = list(Path(pairs).parent.glob("pairs_dpo_reference_*.npy"))
    assert len(files) == 1 and f"wrote {files[0]}" in log
    assert np.load(files[0]).shape == (24, 2)
    again, log = _train(dpo_args(pairs, tmp_path / "again", init_dir, "--dpo.precompute_reference=true"))
    assert f"reference log-probabilities from {files[0]}" in log
    _same(again, copy_run)
    rows = [json.loads(line) for line in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(METRIC_NAMES) <= row.keys() for row in rows if "loss" in row)


def test_lora_reference_is_the_base_with_adapters_off(pairs, init_dir, tmp_path):
    """LoRA's reference is the base, computed by the policy with its adapters switched off (no second copy): equal
    to the reference precomputed before the first update, so the adapters' own changes never leak into it."""
    live, _ = _train(dpo_args(pairs, tmp_path / "live", init_dir, *LORA))
    pre, _ = _train(dpo_args(pairs, tmp_path / "pre", init_dir, *LORA, "--dpo.precompute_reference=true"))
    _same(live, pre)
    assert abs(live[-1]["loss"] - np.log(2)) > 1e-4  # the adapters trained; the reference did not follow them


def test_resume_is_exact(pairs, init_dir, copy_run, tmp_path):
    """Stopped (and checkpointed) at step 2, resumed: steps 3 and 4 equal the uninterrupted run."""
    args = dpo_args(pairs, tmp_path / "run", init_dir)
    first, _ = _train(args, stop_at=2)
    _same(first, copy_run[:2])
    rest, log = _train(args)
    assert "resumed from" in log
    _same(rest, copy_run[2:], tol=0.0)


def test_plot_draws_the_preference_metrics(pairs, init_dir, tmp_path):
    from qwenlink.commands.plot import panels_for, plot_run, read_metrics

    out = tmp_path / "simpo"
    history, _ = _train(dpo_args(pairs, out, init_dir, "--dpo.loss_type=simpo", "--dpo.beta=2.0"))
    assert all(np.isfinite(r["loss"]) for r in history)
    titles = [title for title, _ in panels_for(read_metrics(out))]
    assert {"rewards", "reward accuracy", "log-probabilities"} <= set(titles)
    png = plot_run(out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("override, message", [
    ("--dpo.beta=0", "dpo.beta must be positive"),
    ("--dpo.loss_type=sigmod", "did you mean 'sigmoid'"),
    ("--dpo.label_smoothing=0.1 --dpo.loss_type=hinge", "label_smoothing applies to loss_type sigmoid or simpo"),
    ("--dpo.precompute_reference=true --dpo.loss_type=simpo", "simpo uses no reference model"),
])
def test_bad_settings_are_refused(pairs, tmp_path, override, message):
    with pytest.raises(QwenlinkError, match=message):
        load_config(None, dpo_args(pairs, tmp_path / "run") + override.split())


def test_sft_data_is_refused_with_the_expected_names(tmp_path):
    with pytest.raises(QwenlinkError, match=r"_packed_chosen_input_ids_document.bin / .idx not found.*--handler "
                                            r"pairwise"):
        Trainer(load_config(None, dpo_args(str(tmp_path / "missing"), tmp_path / "run")), stream=io.StringIO())


@pytest.mark.parametrize("name, layout, kind", [("qwen1.5-7b-dpo", (8, 1), "copy"),
                                                ("qwen1.5-72b-lora-dpo", (8, 2), "adapters-off")])
def test_shipped_dpo_configs(name, layout, kind):
    """The 7B (full) and 72B (LoRA) DPO configs load, keep ModelLink's layouts, and pick their reference source."""
    from qwenlink.train import lora as lora_train
    from qwenlink.train.dpo import reference_kind
    from qwenlink.train.trainer import resolve_model_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.toml")
    assert cfg.job.mode == "dpo" and (cfg.parallel.tp, cfg.parallel.pp) == layout
    assert resolve_model_config(cfg).num_params() > 7e9
    assert reference_kind(cfg, lora_train.lora_of(cfg)) == kind


def test_both_halves_of_a_pair_share_a_micro_batch_and_rank(pairs):
    """Under dp2 each rank's micro batches hold whole pairs (row i chosen, row B + i its rejected twin, the same
    prompt) and the two ranks' pairs never overlap."""
    from qwenlink.data.preference import PreferenceDataset
    from qwenlink.train.data import MicroBatchStream

    cfg = load_config(None, dpo_args(pairs, Path("unused"), "", "--train.micro_batch_size=3"))
    data = PreferenceDataset(pairs)
    prompts = {tuple(data[i]["chosen_input_ids"][:2]): i for i in range(len(data))}
    seen: list[set] = []
    for rank in (0, 1):
        stream = MicroBatchStream(data, cfg, micro_batch_size=3, dp_rank=rank, dp_size=2, shuffle=True)
        mine = set()
        for _ in range(4):
            batch = stream.next()
            b = batch.pairs
            assert batch.input_ids.shape[0] == 2 * b == 6
            for i in range(b):
                chosen, rejected = batch.input_ids[i].tolist(), batch.input_ids[b + i].tolist()
                pair = prompts[tuple(chosen[:2])]
                assert chosen[:2] == rejected[:2]
                assert rejected[:len(data[pair]["rejected_input_ids"])] == data[pair]["rejected_input_ids"].tolist()
                mine.add(pair)
        seen.append(mine)
    assert not seen[0] & seen[1]

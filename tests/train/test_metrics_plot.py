"""Throughput / MFU arithmetic, the peak table, JSONL on resume, the optional TensorBoard, `qwenlink plot`."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from qwenlink.train import metrics
from qwenlink.train.metrics import MetricsLogger, throughput


def test_throughput_and_mfu() -> None:
    r = throughput(8000, 2.0, world_size=4, flops_per_token=1e9, peak=2.0)
    assert r.tokens_per_s == 4000 and r.tokens_per_s_per_device == 1000
    assert r.tflops_per_device == pytest.approx(1.0) and r.mfu == pytest.approx(0.5)
    assert math.isnan(throughput(1, 1.0, world_size=1, flops_per_token=1, peak=0.0).mfu)


def test_peak_table_and_override(monkeypatch) -> None:
    monkeypatch.setattr(metrics, "device_name", lambda d: "NVIDIA H200")
    assert metrics.peak_tflops(torch.device("cuda"), "bf16") == (989.0, "table (H200)")
    monkeypatch.setattr(metrics, "device_name", lambda d: "Ascend910B3")
    assert metrics.peak_tflops(torch.device("cuda"), "bf16")[0] == 376.0
    assert metrics.peak_tflops(torch.device("cpu"), "fp32", override=3.0) == (3.0, "config")
    monkeypatch.setattr(metrics, "_measured_cpu_tflops", 0.05)
    assert metrics.peak_tflops(torch.device("cpu"), "fp32") == (0.05, "measured fp32 matmul")


def test_jsonl_drops_records_after_the_resumed_step(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path, total_steps=10, tensorboard=False, stream=io.StringIO())
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step}, "line")
    log.close()
    again = MetricsLogger(tmp_path, total_steps=10, tensorboard=False, resume_step=3, stream=io.StringIO())
    again.log({"step": 4, "loss": 0.5}, "line")
    again.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_missing_tensorboard_is_reported_once(tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tb(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    out = io.StringIO()
    log = MetricsLogger(tmp_path, total_steps=2, tensorboard=True, stream=out)
    log.log({"step": 1, "loss": 1.0}, "step 1")
    log.log({"step": 2, "loss": 0.5}, "step 2")
    log.close()
    assert out.getvalue().count("tensorboard is not installed") == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_plot_writes_png(make_config) -> None:
    pytest.importorskip("matplotlib")
    from qwenlink.commands.plot import plot_run
    from qwenlink.train.trainer import Trainer

    cfg = make_config("train.train_iters=3", "checkpoint.save_final=false")
    Trainer(cfg, stream=io.StringIO()).train()
    png = plot_run(cfg.job.output_dir)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_flops_counts_the_head_only_where_labels_are() -> None:
    from qwenlink.models.presets import get_preset
    from qwenlink.train.data import MicroBatch
    from qwenlink.train.trainer import step_flops

    config = get_preset("test-tiny")
    ids = torch.zeros(2, 8, dtype=torch.long)
    full = MicroBatch(ids, torch.ones(2, 8, dtype=torch.long))
    assert step_flops(config, [full], dp_size=3) == 3 * 16 * config.flops_per_token(8)
    sparse = MicroBatch(ids, torch.full((2, 8), -100).index_fill_(1, torch.tensor([7]), 1))
    head = 6.0 * config.vocab_size * config.hidden_size
    assert step_flops(config, [sparse]) == 16 * (config.flops_per_token(8) - head) + 2 * head

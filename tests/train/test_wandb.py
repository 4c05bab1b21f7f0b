"""`metrics.wandb = true`: a real training run logs to a real W&B run in offline mode, and the run's own file holds the
same scalars at the same steps as TensorBoard gets; a resumed job continues the same run; a missing package is one
line before any work.

The offline run is read back from its `.wandb` file: wandb (0.18+) no longer ships a Python reader, so
`read_wandb_records` follows the file's documented framing (a 7-byte `:W&B` header, then LevelDB log blocks of
32 KiB whose records carry CRC-32, length and type) and parses each record with wandb's own protobuf classes.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Iterator

import pytest

from qwenlink.errors import QwenlinkError
from qwenlink.train.metrics import scalars

wandb = pytest.importorskip("wandb")

_BLOCK, _HEADER = 32 * 1024, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> Iterator[object]:
    """Every record of an offline run's `run-ID.wandb` file as `wandb_internal_pb2.Record`, checksums verified."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    offset, pending = _HEADER, b""
    while offset + _HEADER <= len(data):
        left = _BLOCK - offset % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            offset += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[offset:offset + _HEADER])
        if kind == 0 and length == 0:  # zero padding up to the next block
            offset += left
            continue
        payload = data[offset + _HEADER:offset + _HEADER + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {offset} of {path}"
        offset += _HEADER + length
        pending += payload
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """{step: {key: value}} of the history rows, without wandb's own `_step`, `_runtime`, `_timestamp`."""
    rows: dict[int, dict[str, float]] = {}
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        rows[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return rows


def offline_runs(wandb_dir: Path, run_id: str) -> list[Path]:
    return sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def tensorboard_scalars(log_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {tag: value}} from TensorBoard's event files (needs the tensorboard package)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    rows: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            rows.setdefault(event.step, {})[tag] = event.value
    return rows


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


@pytest.fixture
def offline(tmp_path: Path, monkeypatch) -> Path:
    """W&B in offline mode writing under tmp_path (never the user's settings or the network)."""
    wandb_dir = tmp_path / "wandb-home"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(wandb_dir / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(wandb_dir / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return wandb_dir


def test_wandb_mirrors_the_tensorboard_scalars_and_resumes_the_same_run(make_config, offline: Path) -> None:
    from qwenlink.train.trainer import Trainer

    tensorboard = _has_tensorboard()  # not a test dependency; compared too where it is installed
    overrides = ["train.train_iters=4", "checkpoint.interval=2", "metrics.wandb=true",
                 "metrics.wandb_project=qwenlink-test", f"metrics.tensorboard={str(tensorboard).lower()}"]
    cfg = make_config(*overrides)
    out = io.StringIO()
    assert Trainer(cfg, stream=out).train(stop_at=2) == 0
    run_dir = Path(cfg.job.output_dir)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert "W&B: offline run" in out.getvalue()

    resumed = io.StringIO()
    assert Trainer(make_config(*overrides), stream=resumed).train() == 0
    assert "resumed from" in resumed.getvalue() and run_id in resumed.getvalue()  # the same W&B run
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id

    files = offline_runs(offline, run_id)
    assert len(files) == 2, files  # one offline directory per start, both of run `run_id` (`wandb sync` joins them)
    history: dict[int, dict[str, float]] = {}
    for file in files:
        history.update(wandb_history(file))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = {r["step"]: scalars(r) for r in records}
    assert sorted(history) == [1, 2, 3, 4] == sorted(expected)
    for step, row in expected.items():
        assert history[step] == row, step
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"} <= set(history[4])
    if tensorboard:  # the TensorBoard files hold the same tags and (float32) values at the same steps
        tb = tensorboard_scalars(run_dir / "tensorboard")
        assert sorted(tb) == sorted(history)
        for step, row in tb.items():
            assert set(row) == set(history[step])
            for key, value in row.items():
                assert value == pytest.approx(history[step][key], rel=1e-6), (step, key)


def test_fresh_start_begins_a_new_run(make_config, offline: Path) -> None:
    from qwenlink.train.trainer import Trainer

    cfg = make_config("train.train_iters=1", "checkpoint.save_final=false", "metrics.wandb=true")
    Trainer(cfg, stream=io.StringIO()).train()
    first = (Path(cfg.job.output_dir) / "wandb_run_id").read_text().strip()
    Trainer(cfg, stream=io.StringIO()).train()  # nothing saved: step 0 again, metrics.jsonl starts over, and W&B too
    assert (Path(cfg.job.output_dir) / "wandb_run_id").read_text().strip() != first


def test_offline_without_an_api_key_or_network(monkeypatch, tmp_path: Path) -> None:
    from qwenlink.train import wandb_log

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    mode, why = wandb_log.choose_mode()
    assert mode == "offline" and "API key" in why
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.invalid")  # a name that never resolves
    mode, why = wandb_log.choose_mode()
    assert mode == "offline" and "wandb.invalid is unreachable" in why
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_log.choose_mode() == (None, "WANDB_MODE=disabled")  # the user's choice is left to wandb


def test_missing_wandb_is_one_line_before_any_work(make_config, monkeypatch) -> None:
    import importlib.util

    from qwenlink.train.output_paths import check_outputs

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "wandb" else real_find_spec(name, *a, **k))
    with pytest.raises(QwenlinkError, match=r"metrics\.wandb = true needs the wandb package.*pip install wandb"):
        check_outputs(make_config("metrics.wandb=true"))
    check_outputs(make_config())  # off by default: no check

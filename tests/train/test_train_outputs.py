"""`train` checks its outputs before any work (train/output_paths.py): a file where output_dir / checkpoint.dir goes,
a read-only parent, an export inside init_from or onto the data, or over someone's files is one line, exit 2, before
the model is built (no "internal error", nothing written); the same checks guard `--nproc` before torchrun starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenlink.errors import QwenlinkError
from qwenlink.train.output_paths import check_outputs


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenlink.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _train(prefix: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--model.preset=test-tiny", f"--data.path={prefix}", "--data.seq_length=16",
            "--train.micro_batch_size=2", "--train.global_batch_size=4", "--train.train_iters=1", "--train.device=cpu",
            f"--job.output_dir={out}", "--metrics.tensorboard=false", "--metrics.progress=lines", *extra]


def _one_line_exit_2(proc: subprocess.CompletedProcess, message: str) -> None:
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and message in err[0] and "internal error" not in err[0], proc.stderr[-2000:]
    assert "step 1/" not in proc.stdout and "model:" not in proc.stdout  # refused before the model was built


def test_wrong_outputs_are_one_line_before_the_model(pretrain_prefix: str, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    init = tmp_path / "init"
    init.mkdir()
    (init / "config.json").write_text("{}")
    cases = {
        # output_dir is a file: used to be "internal error: FileExistsError"
        (f"--job.output_dir={tmp_path / 'a_file'}",): "a_file: job.output_dir exists and is not a directory",
        (f"--checkpoint.dir={tmp_path / 'a_file' / 'ckpt'}",):
            "checkpoint.dir cannot be created: " + str(tmp_path / "a_file") + " is a file",
        (f"--model.init_from={init}", "--model.preset=test-tiny", f"--checkpoint.export_hf={init / 'hf'}"):
            "checkpoint.export_hf lies inside the model.init_from",
    }
    for extra, message in cases.items():
        _one_line_exit_2(run_cli(*_train(pretrain_prefix, tmp_path / "run", *extra)), message)
    assert (tmp_path / "a_file").read_text() == "not a directory" and sorted(os.listdir(init)) == ["config.json"]
    assert not (tmp_path / "run").exists()


def test_nproc_checks_outputs_before_starting_ranks(pretrain_prefix: str, tmp_path: Path) -> None:
    data_dir = str(Path(pretrain_prefix).parent)
    proc = run_cli(*_train(pretrain_prefix, tmp_path / "run", f"--checkpoint.export_hf={data_dir}", "--nproc=2"))
    _one_line_exit_2(proc, f"{data_dir}: checkpoint.export_hf contains the data.path file")
    assert "torchrun" not in proc.stderr


def test_a_read_only_parent_is_one_line(pretrain_prefix: str, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root writes through any directory's permissions, but not into /proc/sys
        locked = Path("/proc/sys")
        assert not os.access(locked, os.W_OK), "no read-only directory to test with"
    try:
        _one_line_exit_2(run_cli(*_train(pretrain_prefix, locked / "run")),
                         "job.output_dir cannot be created: " + str(locked) + " is not writable")
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_outputs_in_process(make_config, pretrain_prefix: str, tmp_path: Path) -> None:
    """The rules one by one (fast: no subprocess); what is allowed must stay allowed."""
    prefix = Path(pretrain_prefix)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"cat")
    refused = {
        f"checkpoint.export_hf={prefix}.bin": "checkpoint.export_hf is the data.path file",
        f"checkpoint.export_hf={photos}": "checkpoint.export_hf holds other files",
        f"checkpoint.export_hf={photos / 'cat.jpg'}": "checkpoint.export_hf exists and is not a directory",
        f"job.output_dir={prefix}.idx": "job.output_dir exists and is not a directory",
    }
    for override, message in refused.items():
        with pytest.raises(QwenlinkError, match=message):
            check_outputs(make_config(override))
    # written into, never replaced: an output_dir holding the data (e.g. `.` next to data/) is fine
    check_outputs(make_config(f"job.output_dir={prefix.parent.parent}"))
    # a LoRA adapter export is checked only when LoRA is on
    check_outputs(make_config(f"lora.export_adapter={photos}"))
    with pytest.raises(QwenlinkError, match="lora.export_adapter holds other files"):
        check_outputs(make_config("lora.enabled=true", f"model.init_from={tmp_path / 'base'}",
                                  f"lora.export_adapter={photos}"))

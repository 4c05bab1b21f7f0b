"""examples/reproduce_mmlu.sh: the scripted path to Qwen's published 5-shot MMLU row, run as a user runs it (from
another directory, on an HF directory that qwenlink's own writer saved, with the fixture MMLU CSVs as the local data
folder and `--limit` passed through after `--`); bad arguments are one line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from common import REPO

SCRIPT = REPO / "examples" / "reproduce_mmlu.sh"


def run_script(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "THREADS": "1", **env})


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory, fixture_tokenizer_dir: Path) -> Path:
    """A small random Qwen2 model saved by `save_hf_model`, with the fixture's byte-level tokenizer."""
    from qwenlink.checkpoint.hf import save_hf_model
    from qwenlink.models.config import ModelConfig
    from qwenlink.models.qwen2 import build_model

    config = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_theta=10000.0)
    path = tmp_path_factory.mktemp("reproduce") / "tiny-qwen"
    return save_hf_model(build_model(config, seed=0), path, tokenizer_dir=fixture_tokenizer_dir)


def test_script_prints_the_row_and_writes_the_json(tmp_path: Path, tiny_hf_model: Path, mmlu_data: Path) -> None:
    output = tmp_path / "out" / "results.json"
    output.parent.mkdir()
    proc = run_script(str(tiny_hf_model), str(mmlu_data.parent), "--", "--subjects", "anatomy,virology",
                      "--limit", "2", cwd=tmp_path, OUTPUT=str(output))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(output.read_text(encoding="utf-8"))
    assert report["config"]["shots"] == 5 and report["config"]["subjects"] == ["anatomy", "virology"]
    assert report["config"]["limit"] == 2 and report["config"]["threads"] == 1
    overall = report["results"]["overall"]
    assert overall["n"] == 4 and overall["subjects"] == 2
    assert report["comparison"] is None  # a tiny model has no Qwen1.5 size to compare with
    row = f"| MMLU | 2 | 4 | - (not a Qwen1.5 size) | {overall['acc']:.3f} |"
    assert row in proc.stdout.splitlines(), proc.stdout
    assert "| dataset | subjects | questions | reference accuracy | this run |" in proc.stdout
    assert "4 of MMLU's 14042 questions (2 of 57 subjects): a subset" in proc.stdout
    assert f"results: {output}" in proc.stdout
    assert "--task mmlu" in proc.stderr and "--shots 5 --compare" in proc.stderr  # the command it ran


@pytest.mark.parametrize("args, message", [
    ((), "MODEL_DIR is missing"),
    (("{missing}",), "MODEL_DIR is not a directory"),
    (("{empty}",), "not an HF model directory (no config.json)"),
    (("{model}", "{missing}"), "MMLU_DATA_DIR is not a directory"),
    (("{model}", "{empty}"), "no dev/ and test/ folders"),
    (("{model}", "{partial}"), "expected 57 dev/*_dev.csv and 57 test/*_test.csv files"),
    (("{model}", "{empty}", "extra"), "too many arguments: extra"),
])
def test_bad_arguments_are_one_line(tmp_path: Path, tiny_hf_model: Path, mmlu_data: Path, args, message) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    partial = tmp_path / "partial"  # the archive's layout with one subject only
    for split in ("dev", "test"):
        (partial / split).mkdir(parents=True)
        name = f"anatomy_{split}.csv"
        (partial / split / name).write_bytes((mmlu_data / split / name).read_bytes())
    paths = {"missing": tmp_path / "missing", "empty": empty, "partial": partial, "model": tiny_hf_model}
    proc = run_script(*(a.format(**paths) for a in args), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reproduce_mmlu.sh: ") and message in lines[0], proc.stderr
    assert proc.stdout == "" and not list(tmp_path.glob("*.json"))


def test_without_a_data_dir_the_archive_is_fetched_once_into_the_cache(tmp_path: Path, tiny_hf_model: Path,
                                                                       mmlu_data: Path) -> None:
    """The download path, offline: MMLU_URL names a local copy of the archive (file://, the same data/ layout)."""
    import tarfile

    archive = tmp_path / "data.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(mmlu_data, arcname="data")
    cache = tmp_path / "cache"
    env = {"MMLU_URL": archive.as_uri(), "MMLU_CACHE": str(cache), "OUTPUT": str(tmp_path / "r.json")}
    proc = run_script(str(tiny_hf_model), "--", "--subjects", "anatomy", "--limit", "1", cwd=tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert "downloading" in proc.stderr and "| MMLU | 1 | 1 |" in proc.stdout
    assert len(list((cache / "data" / "test").glob("*_test.csv"))) == 57
    assert sorted(p.name for p in cache.iterdir()) == ["data"]  # no partial download or unpack folder left
    json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))

    not_tar = tmp_path / "error.html"
    not_tar.write_text("<html>proxy error</html>")
    bad = run_script(str(tiny_hf_model), cwd=tmp_path, MMLU_URL=not_tar.as_uri(), MMLU_CACHE=str(tmp_path / "c2"))
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].endswith("not a tar archive (a proxy's error page?); check the address "
                                                         "and retry")
    assert not list((tmp_path / "c2").iterdir())

"""Outputs never clobber inputs (issue 22, deliverable 4).

Every command refuses an output path that is, contains or lies inside one of its inputs, with one line and exit 2,
before any work, and leaves the inputs byte-for-byte as they were; `--overwrite` replaces only a directory holding an
output qwenlink recognises. Each case runs the real CLI in-process (the refusals come before any model is loaded).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from qwenlink import cli
from qwenlink.errors import QwenlinkError
from qwenlink.checkpoint.replaceable import check_replaceable_dir
from qwenlink.outputs import refuse_clobbering


def _digest(root: Path) -> dict[str, str]:
    """Every file under root (or root itself) -> its sha256: what must not change."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _refused(capsys, argv: list[str], needle: str) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"qwenlink {argv[0]}: error: ") and needle in err[0], err[0]
    return err[0]


@pytest.fixture()
def model_in_parent(tmp_path: Path, tiny_fixture_hf: Path) -> Path:
    parent = tmp_path / "parent"
    shutil.copytree(tiny_fixture_hf, parent / "model")
    (parent / "notes.txt").write_text("unrelated work\n")
    return parent


def test_convert_into_the_inputs_parent_is_refused_even_with_overwrite(capsys, model_in_parent):
    before = _digest(model_in_parent)
    _refused(capsys, ["convert", "--input", str(model_in_parent / "model"), "--output", str(model_in_parent),
                      "--to", "hf", "--overwrite"], "contains the input")
    _refused(capsys, ["convert", "--input", str(model_in_parent / "model"), "--output",
                      str(model_in_parent / "model" / "hf"), "--to", "hf"], "lies inside the input")
    _refused(capsys, ["convert", "--input", str(model_in_parent / "model"), "--output",
                      str(model_in_parent / "model"), "--to", "hf", "--overwrite"], "is the input")
    assert _digest(model_in_parent) == before


def test_overwrite_replaces_only_a_recognised_output(capsys, model_in_parent, tmp_path):
    model = str(model_in_parent / "model")
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "holiday.jpg").write_bytes(b"\xff\xd8 not a model")
    before = _digest(stranger)
    _refused(capsys, ["convert", "--input", model, "--output", str(stranger), "--to", "hf", "--overwrite"],
             "holds other files, so it is left alone")
    assert _digest(stranger) == before
    _refused(capsys, ["convert", "--input", model, "--output", str(stranger), "--to", "hf"], "--overwrite")
    # A previous HF output is recognised and replaced.
    out = tmp_path / "hf"
    assert cli.main(["convert", "--input", model, "--output", str(out), "--to", "hf"]) == 0
    (out / "stale.txt").write_text("from the previous conversion\n")
    assert cli.main(["convert", "--input", model, "--output", str(out), "--to", "hf", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    capsys.readouterr()


def test_generate_output_cannot_be_its_prompt_file(capsys, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(prompts)
    before = _digest(prompts)
    for output in (prompts, link):
        _refused(capsys, ["generate", "--model", "test-tiny", "--input", str(prompts), "--output", str(output)],
                 "is the --input prompt file")
    assert _digest(prompts) == before


def test_eval_output_cannot_be_its_task_or_data_file(capsys, tmp_path):
    data = tmp_path / "questions.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}) + "\n")
    task = tmp_path / "task.toml"
    task.write_text('data = "questions.jsonl"\n')
    before = {**_digest(data), **_digest(task)}
    base = ["eval", "--model", "test-tiny", "--task", str(task), "--shots", "0", "--output"]
    _refused(capsys, base + [str(task)], "is the --task file")
    _refused(capsys, base + [str(data)], "is the task's data file 1")
    assert {**_digest(data), **_digest(task)} == before


def test_preprocess_output_cannot_lie_inside_its_input_directory(capsys, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"text": "some words here"}) + "\n")
    before = _digest(corpus)
    _refused(capsys, ["preprocess", "--input", str(corpus), "--output-prefix", str(corpus / "data")],
             "lies inside the --input")
    assert _digest(corpus) == before


def test_refuse_clobbering_compares_files_by_identity_and_skips_non_paths(tmp_path):
    original = tmp_path / "a.jsonl"
    original.write_text("x\n")
    hard = tmp_path / "b.jsonl"
    hard.hardlink_to(original)
    with pytest.raises(QwenlinkError, match="is the input"):
        refuse_clobbering(hard, {"input": original})
    refuse_clobbering(tmp_path / "out.jsonl", {"input": original, "--model": "test-tiny", "--lora": None})
    with pytest.raises(QwenlinkError, match="exists and is not a directory"):
        check_replaceable_dir(original, overwrite=True)
    check_replaceable_dir(tmp_path / "absent", overwrite=False)

"""Small hardening items of issue 22 (deliverable 9, and the file modes of 6): a UTF-8 byte order mark is dropped by
every text reader, a safetensors index cannot point outside its model directory, and safetensors files follow the
umask like every other output."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from qwenlink.data.readers import BOM, iter_batches
from qwenlink.errors import QwenlinkError

ROWS = [{"text": "first document", "id": "1"}, {"text": "second", "id": "2"}]


@pytest.mark.parametrize("suffix,body", [
    (".jsonl", "\n".join(json.dumps(r) for r in ROWS) + "\n"),
    (".json", json.dumps(ROWS)),
    (".csv", "text,id\nfirst document,1\nsecond,2\n"),
    (".txt", "first document\nsecond\n"),
])
def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, suffix, body):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(BOM + body.encode())
    (batch,) = list(iter_batches(path, ["text"]))
    assert batch.columns["text"] == ["first document", "second"]  # not "\ufefffirst document", not a renamed column


def test_generate_reads_a_prompt_file_with_a_byte_order_mark(tmp_path):
    from qwenlink.commands.generate import _read_jsonl_prompts
    from qwenlink.tokenizer import Tokenizer

    path = tmp_path / "p.jsonl"
    path.write_bytes(BOM + b'{"prompt": "hello"}\n')
    assert _read_jsonl_prompts(str(path), Tokenizer.default()) == ["hello"]


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", 5])
def test_a_safetensors_index_is_confined_to_its_directory(tmp_path, tiny_fixture_hf, name):
    from qwenlink.checkpoint.hf import load_hf_model

    model = tmp_path / "model"
    shutil.copytree(tiny_fixture_hf, model)
    (tmp_path / "outside.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": name}}))
    with pytest.raises(QwenlinkError, match="outside the model directory|is not a file name") as info:
        load_hf_model(model)
    assert "model.safetensors.index.json" in str(info.value)


def test_a_symlinked_shard_leading_out_is_refused(tmp_path, tiny_fixture_hf):
    from qwenlink.checkpoint.hf import load_hf_model

    model = tmp_path / "model"
    shutil.copytree(tiny_fixture_hf, model)
    (model / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (model / "shard.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shard.safetensors"}}))
    with pytest.raises(QwenlinkError, match="outside the model directory"):
        load_hf_model(model)


def test_hf_output_files_follow_the_umask(tmp_path, tiny_fixture_hf):
    from qwenlink.checkpoint.convert import ConvertOptions, convert

    old = os.umask(0o027)
    try:
        out = convert(tiny_fixture_hf, tmp_path / "hf", ConvertOptions(to="hf"))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path(out).iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o640  # safetensors alone used to write 0600
    assert set(modes.values()) == {0o640}, modes

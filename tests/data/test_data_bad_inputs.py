"""Bad input: one line on stderr naming the file (and row), exit != 0, no traceback, no partial outputs."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwenlink.data.indexed import write_documents

from data_helpers import write_jsonl


def _check_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("qwenlink preprocess: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def _outputs(d):
    return sorted(p.name for p in d.iterdir())


def _good_then_bad(n_good: int, bad_line: bytes) -> bytes:
    good = b"".join(json.dumps({"text": f"document {i}"}).encode() + b"\n" for i in range(n_good))
    return good + bad_line + b"\n"


def _preprocess(cli, tmp_path, src, *extra):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    rc, _, err = cli("preprocess", "--input", src, "--output-prefix", out / "x", "--batch-size", 2, *extra)
    return rc, err, out


def test_missing_json_key_in_jsonl(tmp_path, cli):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}, {"content": "c"}])
    rc, err, out = _preprocess(cli, tmp_path, src)
    _check_error(rc, err, "in.jsonl", "row 3", "missing key 'text'", "--json-keys")
    assert _outputs(out) == []


def test_missing_column_in_parquet(tmp_path, cli):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "in.parquet")
    rc, err, out = _preprocess(cli, tmp_path, tmp_path / "in.parquet", "--json-keys", "text")
    _check_error(rc, err, "in.parquet", "missing column 'text'", "columns: content")
    assert _outputs(out) == []


def test_non_utf8_text(tmp_path, cli):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_good_then_bad(5, b'{"text": "caf\xe9"}'))  # latin-1 byte in line 6, after 3 full batches
    rc, err, out = _preprocess(cli, tmp_path, src)
    _check_error(rc, err, "in.jsonl", "row 6", "not valid UTF-8")
    assert _outputs(out) == []


def test_non_utf8_csv(tmp_path, cli):
    src = tmp_path / "in.csv"
    src.write_bytes(b"text\nhello\nworld\nna\xefve\n")
    rc, err, out = _preprocess(cli, tmp_path, src)
    _check_error(rc, err, "in.csv", "line 4", "not valid UTF-8")
    assert _outputs(out) == []


def test_non_utf8_in_parquet_binary_column(tmp_path, cli):
    pq.write_table(pa.table({"text": pa.array([b"fine", b"bad \xff"], type=pa.binary())}), tmp_path / "in.parquet")
    rc, err, out = _preprocess(cli, tmp_path, tmp_path / "in.parquet")
    _check_error(rc, err, "in.parquet", "row 2", "not valid UTF-8")
    assert _outputs(out) == []


@pytest.mark.parametrize("kind", ["empty file", "empty directory", "only empty documents"])
def test_empty_input(tmp_path, cli, kind):
    if kind == "empty file":
        src = tmp_path / "in.jsonl"
        src.write_text("")
    elif kind == "empty directory":
        src = tmp_path / "indir"
        src.mkdir()
    else:
        src = write_jsonl(tmp_path / "in.jsonl", [{"text": ""}, {"text": ""}])
    rc, err, out = _preprocess(cli, tmp_path, src)
    _check_error(rc, err, src.name, "empty input")
    if kind == "only empty documents":
        assert "2 empty" in err
    assert _outputs(out) == []


def test_corrupt_parquet(tmp_path, cli):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["a"] * 100}), good)
    bad = tmp_path / "in.parquet"
    bad.write_bytes(good.read_bytes()[:-40] + b"\x00" * 40)  # damaged footer
    rc, err, out = _preprocess(cli, tmp_path, bad)
    _check_error(rc, err, "in.parquet", "not a readable parquet file")
    assert _outputs(out) == []


def test_chat_record_with_unknown_role(tmp_path, cli):
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    records.append({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]})
    src = write_jsonl(tmp_path / "in.jsonl", records)
    rc, err, out = _preprocess(cli, tmp_path, src, "--handler", "chat")
    _check_error(rc, err, "in.jsonl", "row 4", "message 2", "unknown role 'bot'")
    assert _outputs(out) == []


def test_error_in_a_worker_process_is_reported_the_same(tmp_path, cli):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_good_then_bad(9, b'{"text": 5}'))
    rc, err, out = _preprocess(cli, tmp_path, src, "--workers", "2")
    _check_error(rc, err, "in.jsonl", "row 10", "must be a string")
    assert _outputs(out) == []


def _idx(tmp_path):
    write_documents(tmp_path / "d", [[1, 2, 3], [4, 5]])
    return tmp_path / "d", bytearray((tmp_path / "d.idx").read_bytes())


@pytest.mark.parametrize("damage,needle", [
    ("magic", "not a Megatron indexed dataset index"),
    ("version", "index version 7, expected 1"),
    ("bin size", "sequence lengths add up to 20 bytes but"),
])
def test_damaged_indexed_dataset(tmp_path, cli, damage, needle):
    prefix, raw = _idx(tmp_path)
    if damage == "magic":
        raw[:9] = b"GARBAGE!!"
    elif damage == "version":
        raw[9:17] = struct.pack("<Q", 7)
    else:
        (tmp_path / "d.bin").write_bytes(b"\x00" * 12)
    (tmp_path / "d.idx").write_bytes(bytes(raw))
    rc, _, err = cli("preprocess", "--inspect", prefix)
    _check_error(rc, err, "d.idx", needle)


def test_real_command_line_exit_code_and_stderr(tmp_path):
    """The installed entry point, in a fresh interpreter: exit status 2 and a single line, no traceback."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"body": "x"}])
    proc = subprocess.run([sys.executable, "-m", "qwenlink.cli", "preprocess", "--input", str(src),
                           "--output-prefix", str(tmp_path / "o" / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    _check_error(proc.returncode, proc.stderr, "in.jsonl", "row 1", "missing key 'text'")
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_txt_input_cannot_feed_several_json_keys(tmp_path, cli):
    src = tmp_path / "in.txt"
    src.write_text("one line\n")
    rc, err, out = _preprocess(cli, tmp_path, src, "--json-keys", "text", "title")
    _check_error(rc, err, "in.txt", "one text column")
    assert _outputs(out) == []

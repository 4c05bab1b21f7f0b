"""`qwenlink preprocess` for pretraining data: input formats, Megatron byte identity, workers, length limits."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qwenlink.data.indexed import IndexedDataset

from data_helpers import TEXTS, write_jsonl


def _read_docs(prefix) -> list[list[int]]:
    return [d.tolist() for d in IndexedDataset(prefix)]


def test_pretrain_byte_identical_to_megatron_builder(tmp_path, cli, tok, megatron):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS])
    rc, out, err = cli("preprocess", "--input", src, "--output-prefix", tmp_path / "q", "--append-eod")
    assert rc == 0, err
    # What Megatron's tools/preprocess_data.py writes: encode, append EOD, skip empty documents, int32 for Qwen.
    b = megatron.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=megatron.DType.optimal_dtype(tok.vocab_size))
    for t in TEXTS:
        ids = tok.encode(t)
        if ids:
            b.add_item(torch.tensor(ids + [tok.eos_id]))
            b.end_document()
    b.finalize(str(tmp_path / "m.idx"))
    assert (tmp_path / "q_text_document.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()
    assert (tmp_path / "q_text_document.idx").read_bytes() == (tmp_path / "m.idx").read_bytes()
    assert "skipped 1 empty documents" in out
    assert f"wrote {len(TEXTS) - 1} documents" in out


def test_workers_do_not_change_output(tmp_path, cli):
    rows = [{"text": f"{TEXTS[i % len(TEXTS)]} #{i}"} for i in range(400)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet", row_group_size=64)
    outs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        rc, _, err = cli("preprocess", "--input", tmp_path / "c.parquet", "--output-prefix", prefix, "--append-eod",
                         "--workers", workers, "--batch-size", 37)
        assert rc == 0, err
        outs.append(((tmp_path / f"w{workers}_text_document.bin").read_bytes(),
                     (tmp_path / f"w{workers}_text_document.idx").read_bytes()))
    assert outs[0] == outs[1]
    assert len(IndexedDataset(tmp_path / "w2_text_document")) == 400


def test_all_input_formats_give_the_same_documents(tmp_path, cli, tok):
    texts = [t for t in TEXTS if t and "\n" not in t]  # one line each, so txt can hold them too
    d = tmp_path / "in"
    d.mkdir()
    records = [{"text": t, "other": i} for i, t in enumerate(texts)]
    pq.write_table(pa.Table.from_pylist(records), d / "a.parquet")
    with pa.OSFile(str(d / "b.arrow"), "wb") as sink:  # stream format, as HF datasets writes .arrow
        table = pa.Table.from_pylist(records)
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    with open(d / "c.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["other", "text"])
        w.writeheader()
        w.writerows(records)
    (d / "d.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    write_jsonl(d / "e.jsonl", records)
    (d / "f.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    rc, out, err = cli("preprocess", "--input", d, "--output-prefix", tmp_path / "all")
    assert rc == 0, err
    docs = _read_docs(tmp_path / "all_text_document")
    want = [tok.encode(t) for t in texts]
    assert docs == want * 6  # six files, read in sorted name order
    assert "from 6 file(s)" in out


def test_several_json_keys_make_one_output_each(tmp_path, cli, tok):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "alpha beta", "title": "Title one"},
                                            {"text": "gamma", "title": "Title two"}])
    rc, _, err = cli("preprocess", "--input", src, "--output-prefix", tmp_path / "k", "--json-keys", "text", "title")
    assert rc == 0, err
    assert _read_docs(tmp_path / "k_text_document") == [tok.encode("alpha beta"), tok.encode("gamma")]
    assert _read_docs(tmp_path / "k_title_document") == [tok.encode("Title one"), tok.encode("Title two")]


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_seq_length_drops_or_truncates_and_says_so(tmp_path, cli, tok, policy):
    long_text = "word " * 100
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "short one"}, {"text": long_text}, {"text": "short two"}])
    rc, out, err = cli("preprocess", "--input", src, "--output-prefix", tmp_path / "s", "--append-eod",
                       "--seq-length", 16, "--overlong", policy)
    assert rc == 0, err
    docs = _read_docs(tmp_path / "s_text_document")
    eod = tok.eos_id
    if policy == "drop":
        assert docs == [tok.encode("short one") + [eod], tok.encode("short two") + [eod]]
        assert "dropped 1 samples longer than --seq-length 16" in out
    else:
        assert docs[1] == (tok.encode(long_text) + [eod])[:16]
        assert len(docs) == 3 and "truncated 1 samples to --seq-length 16" in out


def test_progress_lines_when_not_a_terminal(tmp_path, cli):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(50)])
    rc, _, err = cli("preprocess", "--input", src, "--output-prefix", tmp_path / "p", "--log-interval", 10,
                     "--batch-size", 10)
    assert rc == 0
    lines = [l for l in err.splitlines() if l.startswith("processed")]
    assert len(lines) == 5 and "tokens/s" in lines[-1] and "docs/s" in lines[-1]
    assert "\r" not in err


def test_modellink_option_names_are_accepted(tmp_path, cli, tok):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    rc, _, err = cli("preprocess", "--input", src, "--output-prefix", tmp_path / "m", "--tokenizer-name-or-path",
                     "default", "--handler-name", "GeneralPretrainHandler", "--append-eod")
    assert rc == 0, err
    assert _read_docs(tmp_path / "m_text_document") == [tok.encode("hello") + [tok.eos_id]]
    assert np.dtype(IndexedDataset(tmp_path / "m_text_document").dtype) == np.int32  # Qwen vocab > 65500

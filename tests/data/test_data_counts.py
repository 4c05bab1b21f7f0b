"""Preprocessing's one counter type: a batch's counts and the run's summary are the same fields, and the summary is
exactly the sum of its batches'."""

from __future__ import annotations

from dataclasses import fields

from qwenlink.data.counts import DocumentCounts
from qwenlink.data.handlers import BatchResult, HandlerOptions, make_handler
from qwenlink.data.preprocess import PreprocessConfig, PreprocessSummary, preprocess
from qwenlink.data.readers import iter_batches

from data_helpers import TEXTS, write_jsonl

COUNTERS = [f.name for f in fields(DocumentCounts)]


def test_add_sums_every_counter_and_nothing_else():
    summary = PreprocessSummary(files=3, seconds=1.5, outputs=["p"], **{n: i for i, n in enumerate(COUNTERS)})
    batch = BatchResult(outputs={"x": None}, **{n: 10 * (i + 1) for i, n in enumerate(COUNTERS)})
    summary.add(batch)
    summary.add(batch)
    assert [getattr(summary, n) for n in COUNTERS] == [i + 20 * (i + 1) for i in range(len(COUNTERS))]
    assert (summary.files, summary.seconds, summary.outputs) == (3, 1.5, ["p"])
    assert isinstance(batch, DocumentCounts) and isinstance(summary, DocumentCounts)


def test_summary_is_the_sum_of_its_batches(tmp_path, tok):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS * 3])
    options = HandlerOptions(seq_length=12, overlong="drop", append_eod=True)
    summary = preprocess(PreprocessConfig(str(src), str(tmp_path / "out"), options=options, batch_size=5),
                         tokenizer=tok)
    handler = make_handler(options, tok)
    expected = DocumentCounts()
    for batch in iter_batches(src, handler.required_columns, 5, handler.optional_columns):
        expected.add(handler.process(batch))
    assert [getattr(summary, n) for n in COUNTERS] == [getattr(expected, n) for n in COUNTERS]
    # The corpus has each kind of count, so a counter the summary forgot would show.
    assert expected.records == 24 and expected.empty == 3 and expected.dropped_overlong > 0 and expected.tokens > 0
    assert summary.files == 1 and summary.outputs == [str(tmp_path / "out_text_document")]

"""Preprocessing: raw files -> Megatron indexed datasets, in one process or across worker processes.

Why this shape: reading and writing are sequential and cheap; tokenization is the expensive part and is independent
per batch. The main process reads batches in file order, hands them to workers, and writes results back strictly in
submission order, so the output bytes never depend on `workers`. At most `2 x workers` batches are in flight, so
memory stays bounded however large the corpus is. All outputs are written under temporary names and renamed only
after the whole input succeeded.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np

from qwenlink.data.counts import DocumentCounts
from qwenlink.data.handlers import HANDLERS, Handler, HandlerOptions, make_handler
from qwenlink.data.indexed import IndexedDatasetWriter, optimal_dtype
from qwenlink.data.pairwise import PairwiseHandler
from qwenlink.data.progress import Progress
from qwenlink.data.readers import RecordBatch, iter_batches, list_input_files
from qwenlink.errors import QwenlinkError
from qwenlink.outputs import refuse_clobbering
from qwenlink.signals import quiet_worker_signals
from qwenlink.tokenizer import Tokenizer, load_tokenizer


# Every --handler: the text and instruction ones, and preference pairs for DPO.
ALL_HANDLERS = {**HANDLERS, "pairwise": PairwiseHandler}


@dataclass
class PreprocessConfig:
    input: str
    output_prefix: str
    tokenizer: str = "default"
    options: HandlerOptions = field(default_factory=HandlerOptions)
    workers: int = 1
    batch_size: int = 1000
    log_interval: int = 10000


@dataclass
class PreprocessSummary(DocumentCounts):
    """The whole run's counts (its batches' added up), plus what only the run knows."""

    files: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "FILE: row N: why" per skipped record (pairwise)

    def lines(self, options: HandlerOptions) -> list[str]:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        out = [f"read {self.records:,} records from {self.files} file(s); wrote {self.documents:,} documents, "
               f"{self.tokens:,} tokens in {self.seconds:.1f}s ({rate:,.0f} tokens/s)"]
        if self.empty:
            out.append(f"skipped {self.empty:,} empty documents (no tokens, or no trainable tokens)")
        if self.dropped_overlong:
            out.append(f"dropped {self.dropped_overlong:,} samples longer than --seq-length {options.seq_length}")
        if self.truncated:
            out.append(f"truncated {self.truncated:,} samples to --seq-length {options.seq_length}")
        out += [f"skipped {line}" for line in self.skipped[:20]]
        if len(self.skipped) > 20:
            out.append(f"... and {len(self.skipped) - 20:,} more skipped records")
        out += [f"wrote {p}.bin / .idx" for p in self.outputs]
        return out


# ---- worker side ----------------------------------------------------------------------------------------------------
_WORKER_HANDLER: Handler | None = None


def _init_worker(tokenizer_spec: str, options: HandlerOptions) -> None:
    global _WORKER_HANDLER
    quiet_worker_signals()  # the parent decides when to stop and terminates the pool
    _WORKER_HANDLER = make_handler(options, load_tokenizer(tokenizer_spec), ALL_HANDLERS)


def _work(batch: RecordBatch):
    assert _WORKER_HANDLER is not None
    return _WORKER_HANDLER.process(batch)


# ---- main side ------------------------------------------------------------------------------------------------------
def _batches(files: list[Path], handler: Handler, batch_size: int) -> Iterator[RecordBatch]:
    for f in files:
        yield from iter_batches(f, handler.required_columns, batch_size, handler.optional_columns)


def _ordered_parallel(batches: Iterator[RecordBatch], cfg: PreprocessConfig, options: HandlerOptions):
    """Yield worker results in submission order with at most 2 x workers batches in flight."""
    ctx = mp.get_context("spawn")  # no fork: safe with threads already running (torch, tokenizers' thread pool)
    pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg.tokenizer, options))
    try:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_work, (batch,)))
            if len(pending) >= 2 * cfg.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _count_rows(files: list[Path]) -> int | None:
    """Total rows when every file records it in its metadata (parquet), for a progress bar; else None."""
    total = 0
    for f in files:
        if f.suffix.lower() != ".parquet":
            return None
        try:
            import pyarrow.parquet as pq
            total += pq.ParquetFile(f).metadata.num_rows
        except Exception:  # the reader reports a corrupt file with a proper message later
            return None
    return total


def preprocess(cfg: PreprocessConfig, tokenizer: Tokenizer | None = None,
               log_stream: TextIO | None = None) -> PreprocessSummary:
    """Run the whole preprocessing job; raises `QwenlinkError` (one line, file and row) on bad input."""
    if cfg.workers < 1:
        raise QwenlinkError(f"--workers must be >= 1, got {cfg.workers}")
    opts = cfg.options
    if opts.seq_length is not None and opts.seq_length < 1:
        raise QwenlinkError(f"--seq-length must be >= 1, got {opts.seq_length}")
    if opts.overlong not in ("drop", "truncate"):
        raise QwenlinkError(f"--overlong must be drop or truncate, got {opts.overlong!r}")
    files = list_input_files(cfg.input)
    tok = tokenizer or load_tokenizer(cfg.tokenizer)
    handler = make_handler(opts, tok, ALL_HANDLERS)
    dtype = np.dtype(optimal_dtype(tok.vocab_size))
    summary = PreprocessSummary(files=len(files))
    prefixes = {name: f"{cfg.output_prefix}_{name}" for name in handler.output_names}
    inputs = {"--input": cfg.input, "--tokenizer": cfg.tokenizer}
    inputs.update({f"input file {i}": f for i, f in enumerate(files, start=1)})
    for prefix in prefixes.values():
        for suffix in (".bin", ".idx"):
            refuse_clobbering(prefix + suffix, inputs, option="--output-prefix")
    progress = Progress(_count_rows(files), cfg.log_interval, log_stream)

    with contextlib.ExitStack() as stack:
        writers = {}
        for name, prefix in prefixes.items():
            # Labels hold -100, which an unsigned token dtype cannot: they stay int32 then.
            wdtype = np.dtype(np.int32) if name.endswith("labels_document") and dtype.kind == "u" else dtype
            writers[name] = stack.enter_context(IndexedDatasetWriter(prefix, wdtype))
        batches = _batches(files, handler, cfg.batch_size)
        results = map(handler.process, batches) if cfg.workers == 1 else _ordered_parallel(batches, cfg, opts)
        for res in results:
            for name, (tokens, lengths) in res.outputs.items():
                writers[name].add_documents(tokens, lengths)
            summary.add(res)
            summary.skipped += getattr(res, "skipped", [])  # pairwise: each skipped pair's file, row and reason
            progress.update(res.records, res.documents, res.tokens)
        progress.close()
        if summary.documents == 0:
            why = f"{summary.records} records" + (f", {summary.empty} empty" if summary.empty else "") + \
                  (f", {summary.dropped_overlong} longer than --seq-length" if summary.dropped_overlong else "")
            raise QwenlinkError(f"{cfg.input}: empty input, no documents to write ({why})")
    summary.seconds = progress.elapsed
    summary.outputs = list(prefixes.values())
    return summary


def single_threaded_tokenizers() -> None:
    """Make each process tokenize on one thread, so `--workers N` means N cores (and results stay comparable)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

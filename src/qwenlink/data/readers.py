"""Read raw records from parquet, arrow, csv, json, jsonl or txt files in fixed-size batches.

Why batches of columns: tokenizers are fastest on a list of texts, and a batch is the unit handed to a worker process.
Each batch remembers its file and first row so any problem found later can be reported as "file: row N: ...".
Rows are numbered from 1 (the first data row; for jsonl/txt that is the line number of non-skipped lines).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from qwenlink.errors import QwenlinkError

SUPPORTED_SUFFIXES = (".parquet", ".arrow", ".csv", ".json", ".jsonl", ".txt")


@dataclass
class RecordBatch:
    """`rows` consecutive records of `path`, starting at 1-based row `first_row`, as column name -> list of values."""

    path: str
    first_row: int
    columns: dict[str, list[Any]]

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


def list_input_files(input_path: str | os.PathLike) -> list[Path]:
    """The file itself, or every supported file in a directory (recursively, sorted so output order is stable)."""
    path = Path(input_path)
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise QwenlinkError(f"{path}: unsupported input type {path.suffix!r} (expected one of "
                                f"{', '.join(SUPPORTED_SUFFIXES)})")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise QwenlinkError(f"{path}: empty input, no {', '.join(SUPPORTED_SUFFIXES)} files in this directory")
        return files
    raise QwenlinkError(f"{path}: input not found")


def iter_batches(path: Path, required: Sequence[str], batch_size: int = 1000,
                 optional: Sequence[str] = ()) -> Iterator[RecordBatch]:
    """Yield `RecordBatch`es of the `required` (+ present `optional`) columns of one file.

    A missing required column is an error naming the file (and the row for schemaless jsonl/json).
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_batches(path, required, optional, batch_size)
    elif suffix == ".arrow":
        yield from _arrow_batches(path, required, optional, batch_size)
    elif suffix == ".csv":
        yield from _csv_batches(path, required, optional, batch_size)
    elif suffix in (".json", ".jsonl"):
        yield from _json_batches(path, required, optional, batch_size)
    elif suffix == ".txt":
        yield from _txt_batches(path, required, batch_size)
    else:  # pragma: no cover - list_input_files filters suffixes
        raise QwenlinkError(f"{path}: unsupported input type {suffix!r}")


def _check_schema(path: Path, names: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise QwenlinkError(f"{path}: missing column {missing[0]!r} (columns: {', '.join(names) or 'none'}); "
                            f"choose the text column with --json-keys")


def _table_batches(path: Path, batches: Iterator[Any], names: Sequence[str], required: Sequence[str],
                   optional: Sequence[str]) -> Iterator[RecordBatch]:
    """Arrow record batches -> RecordBatch, decoding binary columns as UTF-8 with a row-precise error."""
    _check_schema(path, names, required)
    wanted = list(required) + [c for c in optional if c in names and c not in required]
    row = 1
    for batch in batches:
        cols: dict[str, list[Any]] = {}
        for name in wanted:
            values = batch.column(batch.schema.get_field_index(name)).to_pylist()
            if values and any(isinstance(v, bytes) for v in values):
                values = [_decode(path, row + i, name, v) for i, v in enumerate(values)]
            cols[name] = values
        if batch.num_rows:
            yield RecordBatch(str(path), row, cols)
        row += batch.num_rows


def _decode(path: Path, row: int, name: str, value: Any) -> Any:
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QwenlinkError(f"{path}: row {row}: column {name!r} is not valid UTF-8 (byte {exc.start})") from None


def _parquet_batches(path: Path, required, optional, batch_size) -> Iterator[RecordBatch]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        _check_schema(path, names, required)
        yield from _table_batches(path, pf.iter_batches(batch_size=batch_size), names, required, optional)
    except (pa.ArrowException, OSError) as exc:
        raise QwenlinkError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None


def _arrow_batches(path: Path, required, optional, batch_size) -> Iterator[RecordBatch]:
    """Arrow IPC: the file format, or the stream format HF `datasets` writes as `.arrow`."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path), "r")
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            schema = reader.schema
        except pa.ArrowInvalid:
            source = pa.memory_map(str(path), "r")
            stream = pa.ipc.open_stream(source)
            batches, schema = iter(stream), stream.schema
        yield from _table_batches(path, _rechunk(batches, batch_size), schema.names, required, optional)
    except (pa.ArrowException, OSError) as exc:
        raise QwenlinkError(f"{path}: not a readable arrow file ({_first_line(exc)})") from None


def _rechunk(batches: Iterator[Any], batch_size: int) -> Iterator[Any]:
    for big in batches:
        for start in range(0, big.num_rows, batch_size):
            yield big.slice(start, batch_size)


# A UTF-8 byte order mark (Windows editors write one) is not text: left in, it breaks the first JSON line, renames the
# first CSV column and is tokenized into the first document. Every reader drops it from the start of a file.
BOM = b"\xef\xbb\xbf"


def _strip_bom(line_no: int, raw: bytes) -> bytes:
    return raw[len(BOM):] if line_no == 1 and raw.startswith(BOM) else raw


def _read_utf8(path: Path) -> str:
    data = _strip_bom(1, path.read_bytes())
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise QwenlinkError(f"{path}: line {line}: not valid UTF-8 (byte {exc.start})") from None


def _csv_batches(path: Path, required, optional, batch_size) -> Iterator[RecordBatch]:
    text = _read_utf8(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    names = reader.fieldnames or []
    _check_schema(path, names, required)
    wanted = list(required) + [c for c in optional if c in names and c not in required]
    yield from _rows_to_batches(path, ((i, r) for i, r in enumerate(reader, start=1)), wanted, batch_size)


def _rows_to_batches(path: Path, rows: Iterator[tuple[int, dict]], wanted: Sequence[str],
                     batch_size: int) -> Iterator[RecordBatch]:
    cols: dict[str, list[Any]] = {c: [] for c in wanted}
    first = None
    for row, record in rows:
        if first is None:
            first = row
        for c in wanted:
            cols[c].append(record.get(c))
        if len(cols[wanted[0]]) >= batch_size:
            yield RecordBatch(str(path), first, cols)
            cols, first = {c: [] for c in wanted}, None
    if first is not None:
        yield RecordBatch(str(path), first, cols)


def _json_records(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """JSON lines (one object per line, blank lines skipped) or a single JSON array of objects."""
    with open(path, "rb") as f:
        head = _strip_bom(1, f.read(4096)).lstrip()
    if head.startswith(b"["):
        try:
            records = json.loads(_read_utf8(path))
        except ValueError as exc:
            raise QwenlinkError(f"{path}: not valid JSON ({_first_line(exc)})") from None
        numbered = enumerate(records, start=1)
    else:
        numbered = _jsonl_lines(path)
    for row, rec in numbered:
        if not isinstance(rec, dict):
            raise QwenlinkError(f"{path}: row {row}: expected a JSON object, got {type(rec).__name__}")
        for c in required:
            if c not in rec:
                raise QwenlinkError(f"{path}: row {row}: missing key {c!r} (keys: {', '.join(rec) or 'none'}); "
                                    f"choose the text key with --json-keys")
        yield row, rec


def _jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = _strip_bom(line_no, raw).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise QwenlinkError(f"{path}: row {line_no}: not valid UTF-8 (byte {exc.start} of the line)") from None
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except ValueError as exc:
                raise QwenlinkError(f"{path}: row {line_no}: not valid JSON ({_first_line(exc)})") from None


def _json_batches(path: Path, required, optional, batch_size) -> Iterator[RecordBatch]:
    wanted = list(required) + [c for c in optional if c not in required]
    yield from _rows_to_batches(path, _json_records(path, required), wanted, batch_size)


def _txt_batches(path: Path, required, batch_size) -> Iterator[RecordBatch]:
    """Plain text: every line is one record whose only column is the first --json-keys name (default `text`)."""
    if len(required) > 1:
        raise QwenlinkError(f"{path}: a .txt file has one text column per line, but {len(required)} columns are "
                            f"needed ({', '.join(required)})")
    key = required[0] if required else "text"
    with open(path, "rb") as f:
        def rows() -> Iterator[tuple[int, dict]]:
            for line_no, raw in enumerate(f, start=1):
                try:
                    yield line_no, {key: _strip_bom(line_no, raw).decode("utf-8").rstrip("\r\n")}
                except UnicodeDecodeError as exc:
                    raise QwenlinkError(f"{path}: row {line_no}: not valid UTF-8 (byte {exc.start} of the line)") \
                        from None
        yield from _rows_to_batches(path, rows(), [key], batch_size)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

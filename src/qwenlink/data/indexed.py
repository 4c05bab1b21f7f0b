"""Megatron's memory-mapped indexed dataset (`PREFIX.bin` + `PREFIX.idx`, "MMIDIDX" version 1).

Why this format: ModelLink / Megatron users already have corpora in it, and a memory map lets a 100 GB corpus open
instantly and be shared by every data-loader worker through the page cache.

Layout of `.idx` (little-endian, no padding):
    magic b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 N sequences | u64 D = documents + 1
    | int32[N] sequence lengths | int64[N] byte offsets into .bin | int64[D] document index (0 ... N)
`.bin` holds the token ids of all sequences back to back in the dtype. Files written here are byte-identical to
megatron-core's `IndexedDatasetBuilder` for the same documents (tested against it).
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from qwenlink.errors import QwenlinkError
from qwenlink.fileio import atomic_path

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, N, D

# Megatron's dtype codes (megatron.core.datasets.indexed_dataset.DType).
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE: dict[np.dtype, int] = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """uint16 when every id fits with Megatron's margin (vocab < 65500), else int32 - Megatron's own rule."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


class IndexedDatasetWriter:
    """Stream documents into `PREFIX.bin` and write `PREFIX.idx` at the end, both under temporary names.

    Use as a context manager: on a clean exit both files are renamed into place; on an exception both temporary files
    are removed, so a failed run never leaves a partial `.bin/.idx` pair behind.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number] | np.dtype = np.int32) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise QwenlinkError(f"{self.prefix}: dtype {self.dtype} has no Megatron dtype code")
        self._stack = contextlib.ExitStack()
        self._lengths: list[np.ndarray] = []   # chunks of int32 sequence lengths
        self._doc_ends: list[np.ndarray] = []  # chunks of int64 "sequences so far" after each document
        self._num_sequences = 0
        self._bin = None
        self._tmp_idx: Path | None = None

    def __enter__(self) -> "IndexedDatasetWriter":
        self._tmp_bin = tmp_bin = self._stack.enter_context(atomic_path(bin_path(self.prefix)))
        self._tmp_idx = self._stack.enter_context(atomic_path(idx_path(self.prefix)))
        self._bin = open(tmp_bin, "wb")
        self._stack.callback(self._bin.close)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if exc_type is None:
            try:
                self._bin.flush()
                self._write_index(self._tmp_idx)
                # Temporary files are created 0600; give the outputs the usual permissions (0666 minus umask).
                mode = 0o666 & ~_current_umask()
                os.chmod(self._tmp_bin, mode)
                os.chmod(self._tmp_idx, mode)
            except BaseException as err:  # the index failed: remove both temporary files, then re-raise
                self._stack.__exit__(type(err), err, err.__traceback__)
                raise
        # Closing the stack renames (success) or deletes (failure) both temporary files.
        return self._stack.__exit__(exc_type, exc, tb)

    def add_document(self, tokens: np.ndarray | Sequence[int], lengths: Sequence[int] | None = None) -> None:
        """Append one document; `lengths` splits it into sequences (default: one sequence, as without sentence split)."""
        arr = np.asarray(tokens, dtype=self.dtype)
        lens = np.asarray([arr.size] if lengths is None else lengths, dtype=np.int32)
        self._append(arr, lens, np.asarray([lens.size], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many one-sequence documents at once: `tokens` [sum(lengths)] back to back, `lengths` [n_docs].

        The batched path the preprocessor uses; equivalent to `add_document` per document.
        """
        lens = np.asarray(lengths, dtype=np.int32)
        self._append(np.asarray(tokens, dtype=self.dtype), lens, np.ones(lens.size, dtype=np.int64))

    def _append(self, arr: np.ndarray, lens: np.ndarray, seqs_per_doc: np.ndarray) -> None:
        if int(lens.sum(dtype=np.int64)) != arr.size:
            raise ValueError(f"lengths sum to {int(lens.sum())} but {arr.size} tokens were given")
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.append(lens)
        self._doc_ends.append(self._num_sequences + np.cumsum(seqs_per_doc))
        self._num_sequences += int(lens.size)

    def _write_index(self, path: Path) -> None:
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)       # [N]
        doc_index = np.concatenate([np.zeros(1, np.int64)] + self._doc_ends)                      # [D]
        pointers = np.zeros(lengths.size, dtype=np.int64)                                          # [N]
        if lengths.size > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(path, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", lengths.size))
            f.write(struct.pack("<Q", doc_index.size))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_index.astype("<i8").tobytes())


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class IndexedDataset:
    """Read-only, memory-mapped view of `PREFIX.bin/.idx`; `ds[i]` is sequence i as a numpy array (no copy).

    The header and the three index arrays are validated on open (magic, version, dtype code, array sizes against the
    `.idx` size, pointers and lengths against the `.bin` size) so a damaged or mismatched pair fails with one line
    naming the file instead of returning garbage tokens later.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = Path(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not p.is_file():
                raise QwenlinkError(f"{p}: not found (expected an indexed dataset PREFIX.bin + PREFIX.idx)")
        idx_size = ipath.stat().st_size
        with open(ipath, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[:9] != MAGIC:
            raise QwenlinkError(f"{ipath}: not a Megatron indexed dataset index (magic {header[:9]!r}, expected {MAGIC!r})")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise QwenlinkError(f"{ipath}: index version {version}, expected {VERSION}")
        code = header[17]
        if code not in DTYPE_CODES:
            raise QwenlinkError(f"{ipath}: unknown dtype code {code} (expected one of {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n, d = struct.unpack("<QQ", header[18:34])
        expected = HEADER_SIZE + 12 * n + 8 * d
        if idx_size != expected:
            raise QwenlinkError(f"{ipath}: {idx_size} bytes, but its header ({n} sequences, {d} document entries) "
                                f"needs {expected}")
        self._idx_map = np.memmap(ipath, dtype=np.uint8, mode="r")
        buf = self._idx_map
        self.sequence_lengths = np.frombuffer(buf, dtype="<i4", count=n, offset=HEADER_SIZE)            # [N]
        self.sequence_pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=HEADER_SIZE + 4 * n)   # [N]
        self.document_indices = np.frombuffer(buf, dtype="<i8", count=d, offset=HEADER_SIZE + 12 * n)  # [D]

        bin_size = bpath.stat().st_size
        total = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if total != bin_size:
            raise QwenlinkError(f"{ipath}: sequence lengths add up to {total} bytes but {bpath} has {bin_size}")
        if n and (self.sequence_pointers[0] != 0 or self.sequence_pointers[-1] + self.sequence_lengths[-1]
                  * self.dtype.itemsize != bin_size):
            raise QwenlinkError(f"{ipath}: sequence byte offsets disagree with the sizes of {bpath}")
        if d and (self.document_indices[0] != 0 or self.document_indices[-1] != n):
            raise QwenlinkError(f"{ipath}: document index must run from 0 to {n} sequences")
        # np.memmap of an empty file is an error, so an empty dataset keeps an empty in-memory array.
        self._bin = np.memmap(bpath, dtype=self.dtype, mode="r") if bin_size else np.zeros(0, self.dtype)

    def __getstate__(self) -> dict:
        """Pickle the prefix only: a DataLoader worker reopens the memory maps instead of copying the corpus."""
        return {"prefix": str(self.prefix)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        """Number of sequences (= documents when preprocessing did not split sentences)."""
        return int(self.sequence_lengths.size)

    @property
    def num_documents(self) -> int:
        return max(int(self.document_indices.size) - 1, 0)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [length] of sequence i starting at token `offset` (a view into the memory map)."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        size = int(self.sequence_lengths[i]) - offset if length is None else length
        return self._bin[start:start + size]

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences in {self.prefix}")
        return self.get(i % len(self)) if i < 0 else self.get(i)

    def __iter__(self) -> Iterable[np.ndarray]:
        for i in range(len(self)):
            yield self.get(i)


def write_documents(prefix: str | os.PathLike, documents: Iterable[Sequence[int]],
                    dtype: type[np.number] | np.dtype = np.int32) -> None:
    """Convenience: write an indexed dataset with one sequence per document."""
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in documents:
            w.add_document(doc)

"""Indexed dataset reader/writer: round trips, byte identity with megatron-core, and damaged-file errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from qwenlink.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype, write_documents
from qwenlink.errors import QwenlinkError


def _docs(seed: int = 0, n: int = 30, high: int = 151646) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(1, 50))) for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_round_trip(tmp_path, dtype):
    high = min(np.iinfo(dtype).max, 151646)
    docs = _docs(high=high)
    write_documents(tmp_path / "d", docs, dtype)
    ds = IndexedDataset(tmp_path / "d")
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(docs) == ds.num_documents
    assert ds.num_tokens == sum(map(len, docs))
    for got, want in zip(ds, docs):
        np.testing.assert_array_equal(got, want)
    k = next(i for i, d in enumerate(docs) if len(d) >= 3)
    np.testing.assert_array_equal(ds.get(k, offset=1, length=2), docs[k][1:3])


def test_multi_sequence_documents_round_trip(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.int32) as w:
        w.add_document([1, 2, 3, 4, 5], lengths=[2, 3])
        w.add_document([6], lengths=[1])
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == 3 and ds.num_documents == 2
    assert ds.document_indices.tolist() == [0, 2, 3]
    assert [s.tolist() for s in ds] == [[1, 2], [3, 4, 5], [6]]


def test_optimal_dtype_follows_megatron(megatron):
    for vocab in (100, 65499, 65500, 151646):
        assert optimal_dtype(vocab) == megatron.DType.optimal_dtype(vocab)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_byte_identical_to_megatron_builder(tmp_path, megatron, dtype):
    docs = _docs(1, high=60000)
    # megatron-core, the way tools/preprocess_data.py drives it: add_item per sequence, end_document per document.
    b = megatron.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=dtype)
    for d in docs:
        b.add_item(torch.tensor(d))
        b.end_document()
    b.finalize(str(tmp_path / "m.idx"))
    # qwenlink, batched path used by the preprocessor.
    with IndexedDatasetWriter(tmp_path / "q", dtype) as w:
        w.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    assert (tmp_path / "q.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()
    assert (tmp_path / "q.idx").read_bytes() == (tmp_path / "m.idx").read_bytes()


def test_multi_sequence_byte_identical_to_megatron_add_document(tmp_path, megatron):
    b = megatron.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    b.add_document(torch.tensor([1, 2, 3, 4, 5]), [2, 3])
    b.add_document(torch.tensor([9, 8]), [2])
    b.finalize(str(tmp_path / "m.idx"))
    with IndexedDatasetWriter(tmp_path / "q", np.int32) as w:
        w.add_document([1, 2, 3, 4, 5], lengths=[2, 3])
        w.add_document([9, 8])
    assert (tmp_path / "q.idx").read_bytes() == (tmp_path / "m.idx").read_bytes()
    assert (tmp_path / "q.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()


def test_each_reads_the_others_files(tmp_path, megatron):
    docs = _docs(2)
    write_documents(tmp_path / "q", docs, np.int32)
    theirs = megatron.IndexedDataset(str(tmp_path / "q"))
    assert len(theirs) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], d)
    np.testing.assert_array_equal(theirs.document_indices, np.arange(len(docs) + 1))
    del theirs

    b = megatron.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    for d in _docs(3, high=60000):
        b.add_item(torch.tensor(d))
        b.end_document()
    b.finalize(str(tmp_path / "m.idx"))
    ours = IndexedDataset(tmp_path / "m")
    for got, want in zip(ours, _docs(3, high=60000)):
        np.testing.assert_array_equal(got, want)


def test_empty_dataset_round_trip(tmp_path):
    write_documents(tmp_path / "e", [], np.int32)
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x", np.int32) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _good(tmp_path):
    write_documents(tmp_path / "g", [[1, 2, 3], [4, 5]], np.int32)
    return tmp_path / "g"


def test_wrong_magic(tmp_path):
    p = _good(tmp_path)
    raw = bytearray((tmp_path / "g.idx").read_bytes())
    raw[:9] = b"NOTMMIDX\x00"
    (tmp_path / "g.idx").write_bytes(bytes(raw))
    with pytest.raises(QwenlinkError, match=r"g\.idx: not a Megatron indexed dataset"):
        IndexedDataset(p)


def test_wrong_version(tmp_path):
    p = _good(tmp_path)
    raw = bytearray((tmp_path / "g.idx").read_bytes())
    raw[9:17] = struct.pack("<Q", 2)
    (tmp_path / "g.idx").write_bytes(bytes(raw))
    with pytest.raises(QwenlinkError, match=r"g\.idx: index version 2, expected 1"):
        IndexedDataset(p)


def test_sizes_disagree_with_bin(tmp_path):
    p = _good(tmp_path)
    (tmp_path / "g.bin").write_bytes((tmp_path / "g.bin").read_bytes()[:-4])  # one token short
    with pytest.raises(QwenlinkError, match=r"g\.idx: sequence lengths add up to 20 bytes but .*g\.bin has 16"):
        IndexedDataset(p)


def test_truncated_idx(tmp_path):
    p = _good(tmp_path)
    (tmp_path / "g.idx").write_bytes((tmp_path / "g.idx").read_bytes()[:-8])
    with pytest.raises(QwenlinkError, match=r"g\.idx: .* bytes, but its header"):
        IndexedDataset(p)


def test_pickles_as_a_reference_not_a_copy(tmp_path):
    import pickle

    docs = _docs(4, n=200)
    write_documents(tmp_path / "d", docs, np.int32)
    ds = IndexedDataset(tmp_path / "d")
    blob = pickle.dumps(ds)
    assert len(blob) < 1000 < (tmp_path / "d.bin").stat().st_size  # the prefix, not the tokens
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again[7], docs[7])

"""GPT sample index and blending: same samples in the same order as megatron-core's GPTDataset / BlendedDataset."""

from __future__ import annotations

import os
import time
import types
import warnings
from unittest import mock

import numpy as np
import pytest

from qwenlink.data.blend import blending_indices, build_pretrain_dataset, parse_data_path
from qwenlink.data.gpt_dataset import GPTDataset
from qwenlink.data.indexed import IndexedDataset, write_documents
from qwenlink.errors import QwenlinkError

EOD = 151643


def _corpus(path, seed: int, n_docs: int) -> str:
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, 151000, size=int(rng.integers(1, 40))), EOD) for _ in range(n_docs)]
    write_documents(path, docs, np.int32)
    return str(path)


def _megatron_blend(prefixes, weights, seq_length, num_samples, seed, cache):
    """Build with megatron-core's own builder, as Megatron-LM / ModelLink training does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset as MGPTDataset, GPTDatasetConfig
        tokenizer = types.SimpleNamespace(vocab_size=151646, eod=EOD, pad=-1,
                                          unique_identifiers={"class": "QwenTokenizer"})
        config = GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights),
                                  split="1,0,0", tokenizer=tokenizer, reset_position_ids=False,
                                  reset_attention_mask=False, eod_mask_loss=False, path_to_cache=str(cache))
        # Its BlendedDataset asks torch.distributed for the rank before caching; a single process is rank 0.
        with mock.patch("torch.distributed.get_rank", return_value=0):
            train, _, _ = BlendedMegatronDatasetBuilder(MGPTDataset, [num_samples, 0, 0], lambda: True,
                                                        config).build()
    return train


@pytest.mark.parametrize("n_docs,seq_length,epochs", [
    (60, 16, None),   # one epoch, as many samples as it holds
    (60, 16, 0.5),    # fewer samples than an epoch
    (25, 32, 2.3),    # several epochs; the last one supplies < 80% and is shuffled separately
    (25, 8, 2.9),     # several epochs; the last one supplies >= 80%: shuffled with the others
])
def test_gpt_dataset_matches_megatron_core(tmp_path, n_docs, seq_length, epochs):
    prefix = _corpus(tmp_path / "a", 0, n_docs)
    tokens = int(IndexedDataset(prefix).num_tokens)
    num_samples = None if epochs is None else int(epochs * ((tokens - 1) // seq_length))
    ours = GPTDataset(prefix, seq_length, num_samples, seed=1234, cache_dir=tmp_path / "qcache")
    theirs = _megatron_blend([prefix], None, seq_length, num_samples, 1234, tmp_path / "mcache")
    np.testing.assert_array_equal(ours.document_index, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    assert ours.sample_index.dtype == theirs.sample_index.dtype
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
    assert len(ours) == len(theirs)
    if epochs is not None and epochs > 1:  # the case is the one its comment names
        before_final = (2 * tokens - 1) // seq_length  # samples of the first two epochs
        tail = np.sort(np.asarray(ours.shuffle_index[before_final:]))
        separate = np.array_equal(tail, np.arange(before_final, len(ours)))
        assert len(ours.document_index) == 3 * n_docs and separate == (epochs % 1 < 0.8)
    for i in range(len(ours)):
        want = theirs._query_document_sample_shuffle_indices(i)[0]
        np.testing.assert_array_equal(ours.sample(i), want)
    item = ours[0]
    assert item["input_ids"].shape == item["labels"].shape == (seq_length,)
    assert item["labels"][:-1].tolist() == item["input_ids"][1:].tolist()  # shifted by one, not twice


def test_blend_matches_megatron_core(tmp_path):
    a, b, c = (_corpus(tmp_path / n, s, 30) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    weights = [0.5, 0.3, 0.2]
    data_path = ["0.5", a, "0.3", b, "0.2", c]
    ours = build_pretrain_dataset(data_path, seq_length=16, num_samples=120, seed=7, cache_dir=tmp_path / "qc")
    theirs = _megatron_blend([a, b, c], weights, 16, 120, 7, tmp_path / "mc")
    np.testing.assert_array_equal(ours.dataset_index, theirs.dataset_index)
    np.testing.assert_array_equal(ours.dataset_sample_index, theirs.dataset_sample_index)
    assert len(ours) == len(theirs)
    for k in range(3):  # the underlying datasets were built with the same (surplus) sample counts
        np.testing.assert_array_equal(ours.datasets[k].shuffle_index, theirs.datasets[k].shuffle_index)
    for i in range(len(ours)):
        got = ours[i]
        want = theirs[i]
        assert int(got["dataset_id"]) == int(want["dataset_id"])
        np.testing.assert_array_equal(got["input_ids"].numpy(), want["tokens"].numpy())


def test_blend_proportions_follow_weights():
    dataset_index, sample_index = blending_indices([0.7, 0.2, 0.1], 10000)
    counts = np.bincount(dataset_index, minlength=3)
    assert counts.tolist() == [7000, 2000, 1000]
    for n in (10, 100, 1000):  # every prefix is within one sample of the ideal share
        prefix = np.bincount(dataset_index[:n], minlength=3)
        assert np.all(np.abs(prefix - np.array([0.7, 0.2, 0.1]) * n) <= 1.0)
    for k in range(3):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert sample_index[dataset_index == k].tolist() == list(range(counts[k]))


def test_parse_data_path():
    assert parse_data_path(["A"]) == (["A"], None)
    assert parse_data_path(["0.7 A 0.3 B"]) == (["A", "B"], [0.7, 0.3])
    with pytest.raises(QwenlinkError, match="not a weight"):
        parse_data_path(["A", "0.3", "B", "x"])


def test_index_cache_is_reused_and_rebuilt_when_stale(tmp_path):
    prefix = _corpus(tmp_path / "a", 0, 40)
    cache = tmp_path / "cache"
    first = GPTDataset(prefix, 16, 30, seed=1, cache_dir=cache)
    files = sorted(os.listdir(cache))
    assert len([f for f in files if f.endswith(".npy")]) == 3 and any(f.endswith("description.json") for f in files)
    again = GPTDataset(prefix, 16, 30, seed=1, cache_dir=cache)
    assert isinstance(again.sample_index, np.memmap)  # loaded from the cache, not rebuilt
    np.testing.assert_array_equal(again.shuffle_index, first.shuffle_index)
    GPTDataset(prefix, 16, 30, seed=2, cache_dir=cache)  # another seed: another key
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 6
    time.sleep(0.01)
    _corpus(tmp_path / "a", 5, 40)  # the data changed under the same name
    fresh = GPTDataset(prefix, 16, 30, seed=1, cache_dir=cache)
    assert not isinstance(fresh.sample_index, np.memmap)
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 9


def test_default_cache_lives_next_to_the_data(tmp_path):
    prefix = _corpus(tmp_path / "a", 0, 20)
    GPTDataset(prefix, 8, 10)
    assert any(p.suffix == ".npy" for p in (tmp_path / "index-cache").iterdir())

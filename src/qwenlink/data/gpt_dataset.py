"""GPT-style pretraining samples over an indexed dataset, in exactly megatron-core's `GPTDataset` order.

Why the exact order: ModelLink users moving to qwenlink should see the same samples at the same steps, so loss curves
can be compared step for step. The facts reproduced (verified against megatron-core in tests/data):
- epochs are added until epochs x tokens_per_epoch >= num_samples x seq_length + 1;
- document_index = sequence ids tiled per epoch (int32) and shuffled with numpy RandomState(seed); with more than one
  epoch, if the last epoch supplies < 80% of an epoch's samples it is shuffled separately (so early epochs stay
  uniform);
- samples are seq_length + 1 consecutive tokens of the concatenated documents, each starting on the previous sample's
  last token; S = (epochs x tokens_per_epoch - 1) // seq_length;
- shuffle_index = a permutation of the samples drawn from the same RandomState afterwards (the separated final epoch
  is permuted on its own).
The index arrays are cached as .npy files keyed by a hash of everything that determines them, and rebuilt when the
data file changes. Built with numpy (no compiled helper needed).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from qwenlink.data.indexed import IndexedDataset, idx_path
from qwenlink.errors import QwenlinkError
from qwenlink.fileio import atomic_path

INDEX_FORMAT_VERSION = 1
FINAL_EPOCH_THRESHOLD = 0.80  # megatron-core's threshold for shuffling the last, partial epoch separately


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int | None) -> int:
    """Smallest number of epochs whose tokens cover num_samples x seq_length + 1 (1 when num_samples is None)."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """Document ids tiled `num_epochs` times and shuffled: [num_epochs x len(documents)] int32."""
    if separate_final_epoch and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, rng, False)
        last = build_document_index(documents, 1, rng, False)
        return np.concatenate([first, last])
    index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(index)
    return index


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_epochs: int,
                       tokens_per_epoch: int) -> np.ndarray:
    """Start of every sample as (position in document_index, token offset): [S + 1, 2].

    Sample i covers global token positions [i x seq_length, (i + 1) x seq_length] (inclusive, seq_length + 1 tokens)
    of the documents concatenated in document_index order; row i + 1 is where sample i ends and sample i + 1 starts.
    Row 0 is (0, 0) by definition. dtype int32 unless the largest entry needs int64 (as megatron-core).
    """
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    doc_lengths = np.asarray(sizes, dtype=np.int64)[document_index]              # [E x n]
    starts = np.zeros(doc_lengths.size + 1, dtype=np.int64)                         # [E x n + 1]
    np.cumsum(doc_lengths, out=starts[1:])
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length         # [S]
    # The last document whose start is <= the position holds it (skips empty documents like the C++ loop does).
    doc = np.searchsorted(starts, positions, side="right") - 1                      # [S]
    offset = positions - starts[doc]                                                # [S]
    big = max(document_index.shape[0], int(np.max(sizes)) if len(sizes) else 0) > np.iinfo(np.int32).max
    out = np.zeros((num_samples + 1, 2), dtype=np.int64 if big else np.int32)
    out[1:, 0] = doc
    out[1:, 1] = offset
    return out


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """Permutation of [0, num_samples) followed by a separate permutation of [num_samples, total_size)."""
    dtype = np.int64 if total_size >= np.iinfo(np.uint32).max - 1 else np.uint32
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_gpt_indices(sizes: np.ndarray, seq_length: int, num_samples: int | None,
                      seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document_index [E x n], sample_index [S + 1, 2], shuffle_index [S]) for all sequences of a dataset."""
    if seq_length < 2:
        raise QwenlinkError(f"seq_length must be >= 2, got {seq_length}")
    documents = np.arange(len(sizes), dtype=np.int32)
    tokens_per_epoch = int(np.sum(sizes, dtype=np.int64))
    if tokens_per_epoch < 2:
        raise QwenlinkError(f"dataset has {tokens_per_epoch} tokens; a sample needs at least 2")
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    separate = False
    if epochs > 1:
        samples_before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = (num_samples - samples_before_final) < int(FINAL_EPOCH_THRESHOLD * samples_per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, epochs, rng, separate)
    sample_index = build_sample_index(sizes, document_index, seq_length, epochs, tokens_per_epoch)
    total = sample_index.shape[0] - 1
    shuffle_index = build_shuffle_index(samples_before_final if separate else total, total, rng)
    return document_index, sample_index, shuffle_index


def cached_arrays(description: dict, cache_dir: Path, stem: str, names: tuple[str, ...], build) -> tuple:
    """Load `names` arrays from `cache_dir` if cached under the hash of `description`, else build and save them.

    The files are `{stem}-{hash}-{name}.npy` plus `{stem}-{hash}-description.json`; each is written atomically, so
    concurrent ranks building the same cache never read a half-written file. An unwritable directory only costs
    rebuilding next time.
    """
    text = json.dumps(description, sort_keys=True, indent=1)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    paths = [cache_dir / f"{stem}-{digest}-{n}.npy" for n in names]
    if all(p.is_file() for p in paths):
        try:
            return tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
        except (ValueError, OSError):
            pass  # damaged cache: rebuild below
    arrays = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for p, a in zip(paths, arrays):
            with atomic_path(p) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, a, allow_pickle=False)
        with atomic_path(cache_dir / f"{stem}-{digest}-description.json") as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
    except OSError:
        pass
    return arrays


def default_cache_dir(prefix: str | os.PathLike) -> Path:
    """Index caches live next to the data, in `<data dir>/index-cache/`."""
    return Path(prefix).parent / "index-cache"


class GPTDataset(torch.utils.data.Dataset):
    """Pretraining samples: `ds[i]` = {"input_ids": [seq_length], "labels": [seq_length]} (int64 tensors).

    labels are already shifted (labels[t] is the target for input_ids[t]: the loss must not shift again).
    """

    def __init__(self, prefix: str | os.PathLike | IndexedDataset, seq_length: int, num_samples: int | None = None,
                 seed: int = 1234, cache_dir: str | os.PathLike | None = None) -> None:
        self.indexed = prefix if isinstance(prefix, IndexedDataset) else IndexedDataset(prefix)
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.seed = seed
        ipath = idx_path(self.indexed.prefix)
        st = ipath.stat()
        description = {
            "class": "GPTDataset", "format": INDEX_FORMAT_VERSION, "idx": str(ipath.resolve()),
            "idx_bytes": st.st_size, "idx_mtime_ns": st.st_mtime_ns, "tokens": self.indexed.num_tokens,
            "sequences": len(self.indexed), "seq_length": seq_length, "num_samples": num_samples, "seed": seed,
        }
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.indexed.prefix)
        self.document_index, self.sample_index, self.shuffle_index = cached_arrays(
            description, cache, Path(self.indexed.prefix).name, ("document_index", "sample_index", "shuffle_index"),
            lambda: build_gpt_indices(self.indexed.sequence_lengths, seq_length, num_samples, seed))

    def __len__(self) -> int:
        return int(self.sample_index.shape[0] - 1)

    def sample(self, i: int) -> np.ndarray:
        """The raw seq_length + 1 tokens of sample i (int64)."""
        j = int(self.shuffle_index[i])
        d0, o0 = (int(x) for x in self.sample_index[j])
        d1, o1 = (int(x) for x in self.sample_index[j + 1])
        get, docs = self.indexed.get, self.document_index
        if d0 == d1:
            parts = [get(int(docs[d0]), o0, o1 - o0 + 1)]
        else:
            parts = [get(int(docs[d0]), o0)] + [get(int(docs[d])) for d in range(d0 + 1, d1)] + \
                    [get(int(docs[d1]), 0, o1 + 1)]
        return np.concatenate(parts).astype(np.int64)  # [seq_length + 1]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(self.sample(i))
        return {"input_ids": tokens[:-1], "labels": tokens[1:]}  # [seq_length] each

"""Blend several pretraining datasets with weights, in megatron-core's `BlendedDataset` order.

`--data-path 0.7 A 0.3 B` (Megatron's syntax): weights are normalised; dataset k is built with
ceil(ceil(N x w_k) x (1 + surplus)) samples (surplus 0.005, megatron-core's `mid_level_dataset_surplus`, so every
dataset has enough), the blend has sum_k ceil(N x w_k) samples, and step i takes the next sample of the dataset with
the largest w_k x max(i, 1) - taken_k (first one on ties). Same inputs -> same samples as megatron-core.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from qwenlink.data.gpt_dataset import GPTDataset, cached_arrays, default_cache_dir
from qwenlink.errors import QwenlinkError

MID_LEVEL_SURPLUS = 0.005


def parse_data_path(items: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """`["A"]` -> ([A], None); `["0.7", "A", "0.3", "B"]` -> ([A, B], [0.7, 0.3])."""
    items = [s for item in items for s in str(item).split()]
    if len(items) == 1:
        return items, None
    if len(items) % 2:
        raise QwenlinkError(f"--data-path {' '.join(items)}: expected one prefix, or weight/prefix pairs")
    weights, prefixes = [], []
    for w, p in zip(items[::2], items[1::2]):
        try:
            weights.append(float(w))
        except ValueError:
            raise QwenlinkError(f"--data-path: {w!r} is not a weight (syntax: 0.7 PREFIX_A 0.3 PREFIX_B)") from None
        if weights[-1] <= 0:
            raise QwenlinkError(f"--data-path: weight {w} of {p} must be positive")
        prefixes.append(p)
    return prefixes, weights


def normalize(weights: Sequence[float]) -> list[float]:
    w = np.asarray(weights, dtype=np.float64)
    return (w / w.sum()).tolist()


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index [size] int16, dataset_sample_index [size] int64) by the greedy smallest-error rule."""
    w = [float(x) for x in weights]
    taken = [0] * len(w)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    ks = range(len(w))
    for i in range(size):
        step = float(max(i, 1))
        best = max(ks, key=lambda k: (w[k] * step - taken[k], -k))  # ties -> lowest k
        dataset_index[i] = best
        sample_index[i] = taken[best]
        taken[best] += 1
    return dataset_index, sample_index


class BlendedDataset(torch.utils.data.Dataset):
    """`ds[i]` = the `dataset_sample_index[i]`-th sample of dataset `dataset_index[i]` (+ its "dataset_id")."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float], size: int,
                 cache_dir: str | os.PathLike | None = None, description: dict | None = None) -> None:
        self.datasets = list(datasets)
        self.weights = normalize(weights)
        self.size = size
        build = lambda: blending_indices(self.weights, size)  # noqa: E731
        if cache_dir is not None and description is not None:
            desc = {"class": "BlendedDataset", "weights": self.weights, "size": size, **description}
            self.dataset_index, self.dataset_sample_index = cached_arrays(
                desc, Path(cache_dir), "blend", ("dataset_index", "dataset_sample_index"), build)
        else:
            self.dataset_index, self.dataset_sample_index = build()
        counts = np.bincount(np.asarray(self.dataset_index, dtype=np.int64), minlength=len(self.datasets))
        for k, (n, ds) in enumerate(zip(counts, self.datasets)):
            if n > len(ds):
                raise QwenlinkError(f"blend takes {n} samples from dataset {k} which has only {len(ds)}")

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k = int(self.dataset_index[i])
        item = dict(self.datasets[k][int(self.dataset_sample_index[i])])
        item["dataset_id"] = torch.tensor(k)
        return item


def build_pretrain_dataset(data_path: Sequence[str], seq_length: int, num_samples: int, seed: int = 1234,
                           cache_dir: str | os.PathLike | None = None,
                           surplus: float = MID_LEVEL_SURPLUS) -> torch.utils.data.Dataset:
    """One GPTDataset, or a BlendedDataset over several, from Megatron's `--data-path` syntax."""
    prefixes, weights = parse_data_path(data_path)
    if weights is None:
        return GPTDataset(prefixes[0], seq_length, num_samples, seed, cache_dir)
    weights = normalize(weights)
    targets = [int(math.ceil(num_samples * w)) for w in weights]
    built = [int(math.ceil(t * (1 + surplus))) for t in targets]
    datasets = [GPTDataset(p, seq_length, n, seed, cache_dir) for p, n in zip(prefixes, built)]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(prefixes[0])
    description = {"datasets": [str(Path(p).resolve()) for p in prefixes], "built": built, "seed": seed,
                   "seq_length": seq_length,
                   "sequences": [len(d.indexed) for d in datasets], "tokens": [d.indexed.num_tokens for d in datasets]}
    return BlendedDataset(datasets, weights, sum(targets), cache, description)

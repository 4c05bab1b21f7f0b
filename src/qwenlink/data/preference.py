"""Preference pairs for training: the four files of `preprocess --handler pairwise` (data/pairwise.py) as one dataset.

`ds[i]` is pair i: its chosen and rejected ids [L] and shifted labels [L] (labels[t] = the stored label of t + 1, the
last -100, as data/instruction.py explains), and, once `attach_reference` gave them, the reference model's summed
log-probabilities of the two replies (`reference`: [2] fp32, chosen then rejected). A pair is indivisible here: the
sampler hands out pair indices, so both halves land in the same micro batch on the same data-parallel rank.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from qwenlink.data.indexed import IndexedDataset
from qwenlink.data.instruction import shift_labels
from qwenlink.data.pairwise import PAIR_KEYS, SIDES
from qwenlink.errors import QwenlinkError


def preference_prefix(path: str | os.PathLike) -> str:
    """Accept the preprocess prefix or the full name of any of its four datasets."""
    path = str(path)
    for key in PAIR_KEYS:
        suffix = f"_packed_{key}_document"
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


class PreferenceDataset(torch.utils.data.Dataset):
    """The pairs of one pairwise dataset prefix, in stored order."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = str(prefix)
        self.parts: dict[str, IndexedDataset] = {}
        for key in PAIR_KEYS:
            name = f"{prefix}_packed_{key}_document"
            if not os.path.isfile(f"{name}.idx") or not os.path.isfile(f"{name}.bin"):
                raise QwenlinkError(f"data.path: {name}.bin / .idx not found; for job.mode = \"dpo\" give the "
                                    f"--output-prefix of `qwenlink preprocess --handler pairwise`")
            self.parts[key] = IndexedDataset(name)
        for side in SIDES:
            ids, labels = self.parts[f"{side}_input_ids"], self.parts[f"{side}_labels"]
            if not np.array_equal(ids.sequence_lengths, labels.sequence_lengths):
                raise QwenlinkError(f"{labels.prefix}.idx: sample lengths differ from {ids.prefix}.idx (files from "
                                    f"different runs?)")
        if len(self.parts["chosen_input_ids"]) != len(self.parts["rejected_input_ids"]):
            raise QwenlinkError(f"{prefix}: {len(self.parts['chosen_input_ids'])} chosen but "
                                f"{len(self.parts['rejected_input_ids'])} rejected samples (files from different "
                                f"runs?)")
        self.reference: Optional[np.ndarray] = None  # [N, 2] fp32 once attached

    def __len__(self) -> int:
        return len(self.parts["chosen_input_ids"])

    def attach_reference(self, values: np.ndarray) -> None:
        """The reference log-probabilities of every pair, [N, 2] (chosen, rejected)."""
        if values.shape != (len(self), 2):
            raise QwenlinkError(f"{self.prefix}: reference log-probabilities have shape {values.shape}, expected "
                                f"({len(self)}, 2)")
        self.reference = values.astype(np.float32)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for side in SIDES:
            out[f"{side}_input_ids"] = self.parts[f"{side}_input_ids"][i].astype(np.int64)
            out[f"{side}_labels"] = shift_labels(self.parts[f"{side}_labels"][i].astype(np.int64))
        if self.reference is not None:
            out["reference"] = self.reference[i]
        return out

"""Instruction (SFT) datasets over the `PREFIX_packed_{input_ids,attention_mask,labels}_document` triplet.

Two ways to batch:
- padding: `pad_collate` pads to the longest sample of the batch, rounded up to a multiple of 8 (tensor-core friendly);
- packing: `PackedInstructionDataset` fills fixed-length sequences with whole samples; position_ids restart at 0 for
  every sample and `segment_ids` tell attention not to cross samples (`packed_attention_mask`, or cu_seqlens for
  varlen kernels).

Label convention (the one ModelLink got wrong): stored labels are aligned with input_ids (label[t] = id[t] or -100).
Everything returned here is already shifted: labels[t] is the target for the logits at position t, i.e. the stored
label of t + 1, and the last position of every sample is -100, so no sample is trained to predict the next sample's
first token. The loss must not shift again.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from qwenlink.data.handlers import IGNORE_INDEX
from qwenlink.data.indexed import IndexedDataset
from qwenlink.errors import QwenlinkError


def shift_labels(labels: np.ndarray) -> np.ndarray:
    """Aligned labels [L] -> next-token targets [L]: out[t] = labels[t + 1], out[L - 1] = -100."""
    out = np.full(labels.shape, IGNORE_INDEX, dtype=np.int64)
    out[:-1] = labels[1:]
    return out


class InstructionDataset(torch.utils.data.Dataset):
    """`ds[i]` = {"input_ids": int64 [L_i], "labels": int64 [L_i] (shifted)} for sample i, in stored order."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = str(prefix)
        self.input_ids = IndexedDataset(f"{prefix}_packed_input_ids_document")
        self.labels = IndexedDataset(f"{prefix}_packed_labels_document")
        if not np.array_equal(self.input_ids.sequence_lengths, self.labels.sequence_lengths):
            raise QwenlinkError(f"{prefix}_packed_labels_document.idx: sample lengths differ from "
                                f"{prefix}_packed_input_ids_document.idx (files from different runs?)")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return self.input_ids.sequence_lengths

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [L], aligned labels [L]) as stored."""
        return self.input_ids[i].astype(np.int64), self.labels[i].astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        ids, labels = self.raw(i)
        return {"input_ids": ids, "labels": shift_labels(labels)}


def pad_collate(samples: Sequence[dict[str, np.ndarray]], pad_id: int, multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Pad a batch to the longest sample rounded up to `multiple_of`: every output is [B, L]."""
    longest = max(len(s["input_ids"]) for s in samples)
    length = -(-longest // multiple_of) * multiple_of
    b = len(samples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    position_ids = torch.zeros((b, length), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[row, :n] = torch.as_tensor(s["input_ids"])
        labels[row, :n] = torch.as_tensor(s["labels"])
        attention_mask[row, :n] = 1
        position_ids[row, :n] = torch.arange(n)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}


def pack_bins(lengths: np.ndarray, seq_length: int) -> list[list[int]]:
    """Group consecutive samples into bins of at most seq_length tokens, in order (deterministic, no reordering).

    A sample longer than seq_length gets a bin of its own and is truncated when read.
    """
    bins: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(int(x) for x in lengths):
        if current and used + n > seq_length:
            bins.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        bins.append(current)
    return bins


class PackedInstructionDataset(torch.utils.data.Dataset):
    """Several whole samples per sequence of exactly seq_length tokens.

    `ds[i]` = {"input_ids", "labels", "position_ids", "segment_ids"} int64 [seq_length] and "cu_seqlens" int32
    [samples + 2] (cumulative sample boundaries, the padding tail counted as one more segment so they sum to
    seq_length). segment_ids are 1, 2, ... per sample and 0 on padding; padding has label -100.
    """

    def __init__(self, prefix: str | os.PathLike | InstructionDataset, seq_length: int, pad_id: int) -> None:
        self.data = prefix if isinstance(prefix, InstructionDataset) else InstructionDataset(prefix)
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.bins = pack_bins(self.data.lengths, seq_length)
        self.num_truncated = int((np.asarray(self.data.lengths) > seq_length).sum())

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        L = self.seq_length
        input_ids = np.full(L, self.pad_id, dtype=np.int64)
        labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros(L, dtype=np.int64)
        segment_ids = np.zeros(L, dtype=np.int64)
        bounds = [0]
        pos = 0
        for seg, k in enumerate(self.bins[i], start=1):
            ids, raw_labels = self.data.raw(k)
            ids, raw_labels = ids[:L], raw_labels[:L]
            n = len(ids)
            input_ids[pos:pos + n] = ids
            labels[pos:pos + n] = shift_labels(raw_labels)  # shifted within the sample only
            position_ids[pos:pos + n] = np.arange(n)
            segment_ids[pos:pos + n] = seg
            pos += n
            bounds.append(pos)
        if pos < L:
            bounds.append(L)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(position_ids), "segment_ids": torch.from_numpy(segment_ids),
                "cu_seqlens": torch.tensor(bounds, dtype=torch.int32)}


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [B, L] -> boolean mask [B, 1, L, L]: True where query t may attend key s.

    Causal (s <= t), within the same sample, never to or from padding (segment 0); padding rows attend to
    themselves only so softmax stays finite.
    """
    L = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]                       # [B, L, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()   # [L, L]
    real = (segment_ids != 0)[:, :, None] & (segment_ids != 0)[:, None, :]         # [B, L, L]
    eye = torch.eye(L, dtype=torch.bool, device=segment_ids.device)
    return ((same & causal & real) | eye)[:, None]                                  # [B, 1, L, L]

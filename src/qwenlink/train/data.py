"""From the job config to micro batches: the datasets of qwenlink.data, a resumable sampler, and a collate step.

The data position is one integer (samples consumed by all data-parallel ranks together), so resuming needs only the
step number; `dp_rank` / `dp_size` are parameters so the parallel trainer can hand each rank its slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from qwenlink.data.indexed import bin_path, idx_path
from qwenlink.errors import QwenlinkError
from qwenlink.train.config import JobConfig

SFT_SUFFIX = "_packed_input_ids_document"


@dataclass
class MicroBatch:
    """One micro batch: input_ids/labels [B, T] (labels already shifted), optional positions and mask."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None  # 2-D padding [B, T] or 4-D boolean [B, 1, T, T]

    def to(self, device: torch.device) -> "MicroBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(self.input_ids), move(self.labels), move(self.position_ids),
                          move(self.attention_mask))

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def _check_prefix(prefix: str, what: str) -> None:
    """Name the missing file of a `.bin/.idx` pair (and the usual mistakes) before the datasets open it."""
    for p in (idx_path(prefix), bin_path(prefix)):
        if not p.is_file():
            hint = ""
            if p.with_suffix("").suffix in (".bin", ".idx") or str(prefix).endswith((".bin", ".idx")):
                hint = " (give the prefix without .bin/.idx)"
            elif what == "sft":
                hint = " (for sft give the --output-prefix used by `qwenlink preprocess --handler alpaca|chat`)"
            raise QwenlinkError(f"data.path: {p} not found; expected an indexed dataset {prefix}.bin + "
                                f"{prefix}.idx{hint}")


def sft_prefix(path: str) -> str:
    """Accept both the preprocess prefix and the full name of its input_ids dataset."""
    path = str(path)
    for suffix in (SFT_SUFFIX, "_packed_labels_document", "_packed_attention_mask_document"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def build_dataset(cfg: JobConfig, paths: list, num_samples: int) -> torch.utils.data.Dataset:
    """The training (or validation) dataset of the job's mode."""
    if not paths:
        raise QwenlinkError("data.path is empty: give at least one indexed dataset prefix")
    if cfg.job.mode == "pretrain":
        from qwenlink.data.blend import build_pretrain_dataset

        for p in paths:
            _check_prefix(str(p), "pretrain")
        items: list[str] = [str(paths[0])]
        if len(paths) > 1 or cfg.data.weights:
            weights = cfg.data.weights or [1.0] * len(paths)
            items = [str(x) for pair in zip(weights, paths) for x in pair]
        return build_pretrain_dataset(items, cfg.data.seq_length, num_samples, seed=cfg.job.seed)
    from qwenlink.data.instruction import InstructionDataset, PackedInstructionDataset

    if len(paths) > 1:
        raise QwenlinkError(f"data.path: sft takes one instruction dataset prefix, got {len(paths)}")
    prefix = sft_prefix(paths[0])
    for key in ("input_ids", "labels"):
        _check_prefix(f"{prefix}_packed_{key}_document", "sft")
    data = InstructionDataset(prefix)
    if cfg.data.pack:
        return PackedInstructionDataset(data, cfg.data.seq_length, pad_id=cfg.data.pad_id)
    return data


def collate(samples: list[dict], cfg: JobConfig) -> MicroBatch:
    """Stack fixed-length samples (pretrain, packed sft) or pad variable-length ones (sft) into a MicroBatch."""
    if cfg.job.mode == "sft" and not cfg.data.pack:
        from qwenlink.data.instruction import pad_collate

        trimmed = [{k: v[: cfg.data.seq_length] for k, v in s.items()} for s in samples]
        b = pad_collate(trimmed, cfg.data.pad_id, cfg.data.pad_to_multiple_of)
        return MicroBatch(b["input_ids"], b["labels"], b["position_ids"], b["attention_mask"])
    input_ids = torch.stack([torch.as_tensor(s["input_ids"]) for s in samples]).long()  # [B, T]
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()        # [B, T]
    if "segment_ids" in samples[0]:
        from qwenlink.data.instruction import packed_attention_mask

        segments = torch.stack([s["segment_ids"] for s in samples])                      # [B, T]
        positions = torch.stack([s["position_ids"] for s in samples])                    # [B, T]
        return MicroBatch(input_ids, labels, positions, packed_attention_mask(segments))  # mask [B, 1, T, T]
    return MicroBatch(input_ids, labels)


class MicroBatchStream:
    """Endless micro batches for one data-parallel rank, starting after `consumed_samples`."""

    def __init__(self, dataset: torch.utils.data.Dataset, cfg: JobConfig, *, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0, shuffle: bool = False) -> None:
        from qwenlink.data.sampler import ResumableBatchSampler

        self.dataset, self.cfg = dataset, cfg
        self.sampler = ResumableBatchSampler(len(dataset), micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                             consumed_samples=consumed_samples, shuffle=shuffle,
                                             seed=cfg.job.seed, num_epochs=None)
        self._iter: Iterator[list[int]] = iter(self.sampler)

    def next(self) -> MicroBatch:
        indices = next(self._iter)
        return collate([self.dataset[i] for i in indices], self.cfg)

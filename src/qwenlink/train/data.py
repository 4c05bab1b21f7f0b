"""From the job config to micro batches: the datasets of qwenlink.data, a resumable sampler, and a collate step.

The data position is one integer (samples consumed by all data-parallel ranks together), so resuming needs only the
step number; `dp_rank` / `dp_size` are parameters so the parallel trainer can hand each rank its slice.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from qwenlink.data.indexed import bin_path, idx_path
from qwenlink.errors import QwenlinkError
from qwenlink.models.documents import DocumentMask
from qwenlink.train.config import JobConfig

SFT_SUFFIX = "_packed_input_ids_document"


@dataclass
class MicroBatch:
    """One micro batch: input_ids/labels [B, T] (labels already shifted), optional positions and mask.

    Several documents in a row (packed SFT, pretraining with data.reset_attention_mask) travel as a `DocumentMask`
    (per-row document ids and boundaries, O(T)), never as a [B, 1, T, T] tensor."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor | DocumentMask] = None  # 2-D padding [B, T] or documents
    # [B, T] 1 = a real token, 0 = padding, on the host (right-padded SFT rows, which need no attention mask): what
    # a mixture of experts' load-balancing loss counts (train/moe.py). None: every token is real.
    token_mask: Optional[torch.Tensor] = None

    def pinned(self) -> "MicroBatch":
        """The same batch in page-locked host memory (copies to an accelerator can then overlap compute)."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return dataclasses.replace(self, input_ids=pin(self.input_ids), labels=pin(self.labels),
                                   position_ids=pin(self.position_ids), attention_mask=pin(self.attention_mask))

    def to(self, device: torch.device) -> "MicroBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return dataclasses.replace(self, input_ids=move(self.input_ids), labels=move(self.labels),
                                   position_ids=move(self.position_ids), attention_mask=move(self.attention_mask))

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class PairMicroBatch(MicroBatch):
    """B pairs as one [2B, T] batch (chosen rows first); `reference` [2B] fp32: the reference log-probabilities of
    the rows when they are known (precomputed, or computed at the start of the step)."""

    reference: Optional[torch.Tensor] = None

    def pinned(self) -> "PairMicroBatch":
        out = super().pinned()
        return dataclasses.replace(out, reference=None if self.reference is None else self.reference.pin_memory())

    def to(self, device: torch.device) -> "PairMicroBatch":
        out = super().to(device)
        ref = None if self.reference is None else self.reference.to(device, non_blocking=True)
        return dataclasses.replace(out, reference=ref)

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def collate_pairs(samples: Sequence[dict], cfg) -> PairMicroBatch:
    """B pair samples (data/preference.py) -> one right-padded [2B, L] batch, chosen rows then rejected rows (a
    pair never straddles micro batches or data-parallel ranks: the sampler hands out pairs)."""
    from qwenlink.data.instruction import pad_collate

    n = cfg.data.seq_length
    rows = [{"input_ids": s[f"{side}_input_ids"][:n], "labels": s[f"{side}_labels"][:n]}
            for side in ("chosen", "rejected") for s in samples]
    b = pad_collate(rows, cfg.data.pad_id, cfg.data.pad_to_multiple_of)
    reference = None
    if "reference" in samples[0]:  # [B, 2] (chosen, rejected) -> [2B] in row order
        reference = torch.as_tensor([s["reference"][0] for s in samples] + [s["reference"][1] for s in samples],
                                    dtype=torch.float32)
    return PairMicroBatch(b["input_ids"], b["labels"], reference=reference)


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
    if cfg.job.mode == "dpo":
        from qwenlink.data.preference import PreferenceDataset, preference_prefix

        if len(paths) > 1:
            raise QwenlinkError(f"data.path: dpo takes one pairwise dataset prefix, got {len(paths)}")
        return PreferenceDataset(preference_prefix(paths[0]))
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
    if cfg.job.mode == "dpo":  # B pairs -> [2B, L], chosen rows first (train/dpo.py)
        return collate_pairs(samples, cfg)
    if cfg.job.mode == "sft" and not cfg.data.pack:
        from qwenlink.data.instruction import pad_collate

        trimmed = [{k: v[: cfg.data.seq_length] for k, v in s.items()} for s in samples]
        b = pad_collate(trimmed, cfg.data.pad_id, cfg.data.pad_to_multiple_of)
        # Right padding needs neither the padding mask nor positions: under causal attention a real token never sees
        # the pads after it, and its position is its index. Plain causal attention (is_causal, no [B, 1, T, T]
        # mask) keeps flash / memory-efficient kernels; the pads' own outputs carry no label.
        return MicroBatch(b["input_ids"], b["labels"], token_mask=b["attention_mask"])
    input_ids = torch.stack([torch.as_tensor(s["input_ids"]) for s in samples]).long()  # [B, T]
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()        # [B, T]
    if "segment_ids" in samples[0]:
        segments = torch.stack([s["segment_ids"] for s in samples])                      # [B, T]
        positions = torch.stack([s["position_ids"] for s in samples])                    # [B, T]
        return MicroBatch(input_ids, labels, positions, DocumentMask.from_segment_ids(segments))
    if cfg.data.reset_attention_mask or cfg.data.reset_position_ids:
        # Pretraining samples span several documents, each ended by an EOD token (Megatron's --reset-attention-mask
        # / --reset-position-ids): attention and / or positions restart after each EOD.
        docs = DocumentMask.from_eod(input_ids, eod_id(cfg))
        return MicroBatch(input_ids, labels, docs.positions() if cfg.data.reset_position_ids else None,
                          docs if cfg.data.reset_attention_mask else None)
    return MicroBatch(input_ids, labels)


def eod_id(cfg: JobConfig) -> int:
    """The end-of-document token that data.reset_attention_mask / reset_position_ids split at: data.eod_id, or
    (-1) the tokenizer's eos token (<|endoftext|>, 151643 for Qwen, what `preprocess --append-eod` appends)."""
    return cfg.data.eod_id if cfg.data.eod_id >= 0 else _tokenizer_eos(cfg.data.tokenizer)


@functools.lru_cache(maxsize=8)
def _tokenizer_eos(tokenizer: str) -> int:
    from qwenlink.tokenizer import load_tokenizer

    found = load_tokenizer(tokenizer).eos_id
    if found is None:
        raise QwenlinkError(f"config: data.reset_attention_mask / reset_position_ids need an end-of-document token, "
                            f"and the tokenizer {tokenizer!r} has no eos token; set data.eod_id")
    return found


class MicroBatchStream:
    """Endless micro batches for one data-parallel rank, starting after `consumed_samples`.

    With `prefetch` > 0 a background thread reads and collates up to that many micro batches ahead (in page-locked
    memory with `pin_memory`, so the step's non_blocking copies to an accelerator really overlap), while the device
    computes the current step. The order is the sampler's either way; `close()` stops the thread and keeps what it
    had made, so a stream that trains again later continues at the same micro batch. An error while reading is
    raised by the `next()` that would have returned that batch.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, cfg: JobConfig, *, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0, shuffle: bool = False,
                 prefetch: int = 0, pin_memory: bool = False) -> None:
        from qwenlink.data.sampler import ResumableBatchSampler

        self.dataset, self.cfg = dataset, cfg
        self.sampler = ResumableBatchSampler(len(dataset), micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                             consumed_samples=consumed_samples, shuffle=shuffle,
                                             seed=cfg.job.seed, num_epochs=None)
        self._iter: Iterator[list[int]] = iter(self.sampler)
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self._ready: collections.deque = collections.deque()  # made ahead (or an error), handed out first, in order
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def _make(self) -> MicroBatch:
        indices = next(self._iter)
        batch = collate([self.dataset[i] for i in indices], self.cfg)
        return batch.pinned() if self.pin_memory else batch

    def next(self) -> MicroBatch:
        if not self._ready and self.prefetch > 0:
            if self._thread is None:
                self._start()
            self._ready.append(self._queue.get())
        item = self._ready.popleft() if self._ready else self._make()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop), daemon=True,
                                        name="qwenlink-data")
        self._thread.start()

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item: Any = self._make()
            except BaseException as exc:  # handed to the consumer, raised in the training thread
                item = exc
            while True:
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    if stop.is_set():
                        self._leftover = item  # made but not queued: close() keeps it, after the queued ones
                        return
            if isinstance(item, BaseException):
                return

    def close(self) -> None:
        """Stop the reading thread; the micro batches it made stay first in line for the next `next()`."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        while True:
            try:
                self._ready.append(self._queue.get_nowait())
            except queue.Empty:
                break
        leftover = self.__dict__.pop("_leftover", None)
        if leftover is not None:
            self._ready.append(leftover)
        self._thread = self._queue = None

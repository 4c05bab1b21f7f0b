"""Document-aware causal attention without an L x L mask (packed SFT samples, EOD-separated pretraining documents).

A row of a micro batch may hold several documents back to back; each token attends only to earlier tokens of its own
document. A dense boolean mask [B, 1, T, T] says that with O(T^2) memory per row (64 MiB at T = 8192, and SDPA turns
it into a float mask four times that size at every layer), and it rules out the flash kernels' causal fast path.
`DocumentMask` carries the documents instead, O(T) per row:

- `doc_ids` [B, T] int32: the document index of every token (FlexAttention's mask reads it on the device);
- `bounds`: per row the cumulative document lengths (0, n1, n1 + n2, ..., T) as host integers, so slicing by them
  never waits for the device.

Two exact kernels, picked by `attention_backend(device)`:

- "segments" (CPU, and any device without FlexAttention): every document through
  `F.scaled_dot_product_attention(..., is_causal=True)` on its own slice. The kernels are blocked (CPU's flash kernel,
  CUDA's flash / memory-efficient ones), so memory is linear in T; the cost is one kernel call per document.
- "flex" (CUDA): one compiled FlexAttention call per layer with a block mask built once per micro batch from
  `doc_ids` (blocks that cross documents are skipped, not computed). PyTorch 2.13's FlexAttention has no CPU
  backward, so CPU training always takes the segments path. The flex path's mask is tested on CPU (forward, eager);
  its compiled CUDA kernel has not been run on a GPU in this project's tests (docs/training.md says so).

Why not the model's `attention_mask` tensor: the mask object also travels through `MicroBatch.to` / `pinned`
(it has `to` and `pin_memory`), activation checkpointing and tensor / sequence parallelism unchanged: attention sees
the whole sequence after sequence parallelism's all-gather, and the documents are those of the whole sequence.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class DocumentMask:
    """Where documents start and end in each row of a [B, T] batch (see the module docstring)."""

    def __init__(self, doc_ids: Tensor, bounds: Sequence[Sequence[int]]) -> None:
        self.doc_ids = doc_ids  # [B, T] int32, 0, 0, 1, 1, 1, 2, ... per row
        self.bounds = tuple(tuple(int(x) for x in row) for row in bounds)  # per row (0, ..., T)
        self._block_masks: dict[str, object] = {}  # FlexAttention block mask per device, built on first use

    # ---- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_starts(cls, starts: Tensor) -> "DocumentMask":
        """starts [B, T] bool (host): True where a document begins (position 0 always begins one)."""
        starts = starts.clone()
        starts[:, 0] = True
        doc_ids = starts.to(torch.int32).cumsum(1, dtype=torch.int32) - 1  # [B, T]
        seqlen = starts.shape[1]
        bounds = [row.nonzero().flatten().tolist() + [seqlen] for row in starts]
        return cls(doc_ids, bounds)

    @classmethod
    def from_segment_ids(cls, segment_ids: Tensor) -> "DocumentMask":
        """segment_ids [B, T] (host): a new document wherever the id changes (packed SFT: 1, 1, 2, 2, 2, 0, 0 where
        the padding tail, 0, becomes a document of its own: no real token ever sees it, it carries no label)."""
        starts = torch.zeros(segment_ids.shape, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        return cls.from_starts(starts)

    @classmethod
    def from_eod(cls, input_ids: Tensor, eod_id: int) -> "DocumentMask":
        """input_ids [B, T] (host): a new document after every `eod_id` token (the EOD belongs to the document it
        ends), as Megatron's --reset-attention-mask."""
        starts = torch.zeros(input_ids.shape, dtype=torch.bool)
        starts[:, 1:] = input_ids[:, :-1] == eod_id
        return cls.from_starts(starts)

    # ---- what the model and the loader need -----------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.doc_ids.shape

    def positions(self) -> Tensor:
        """Positions restarting at 0 in every document: [B, T] int64 (Megatron's --reset-position-ids)."""
        seqlen = self.doc_ids.shape[1]
        index = torch.arange(seqlen, device=self.doc_ids.device).expand_as(self.doc_ids)  # [B, T]
        starts = torch.zeros_like(self.doc_ids, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = self.doc_ids[:, 1:] != self.doc_ids[:, :-1]
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values  # [B, T] start of own document
        return index - first

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "DocumentMask":
        return DocumentMask(self.doc_ids.to(device, non_blocking=non_blocking), self.bounds)

    def pin_memory(self) -> "DocumentMask":
        return DocumentMask(self.doc_ids.pin_memory(), self.bounds)

    def to_dense(self) -> Tensor:
        """The equivalent boolean mask [B, 1, T, T] (True = may attend): the O(T^2) reference, for tests."""
        seqlen = self.doc_ids.shape[1]
        same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]  # [B, T, T]
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=self.doc_ids.device).tril()
        return (same & causal)[:, None]

    def block_mask(self, device: torch.device):
        """FlexAttention's block mask for these documents on `device`, made once and shared by every layer (and the
        recomputation under activation checkpointing)."""
        key = str(device)
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.doc_ids.to(device, non_blocking=True)  # [B, T]

            def same_document_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return (doc[b, q_idx] == doc[b, kv_idx]) & (kv_idx <= q_idx)

            bsz, seqlen = doc.shape
            self._block_masks[key] = create_block_mask(same_document_causal, bsz, None, seqlen, seqlen,
                                                       device=device)
        return self._block_masks[key]

    def __repr__(self) -> str:
        return f"DocumentMask(shape={tuple(self.doc_ids.shape)}, documents={[len(b) - 1 for b in self.bounds]})"


# ---- the kernels ----------------------------------------------------------------------------------------------------
def segment_attention(q: Tensor, k: Tensor, v: Tensor, docs: DocumentMask) -> Tensor:
    """Each document's causal attention on its own slice. q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D].

    The slices come from `split` (one backward node each, whose gradient is a single cat) rather than indexing per
    document, which would allocate a full-size zero gradient for every document in backward. They stay 4-D: SDPA
    sends 3-D inputs to its math kernel, which materialises every [n, n] score matrix."""
    gqa = q.shape[1] != k.shape[1]
    rows = []
    for b, (qb, kb, vb) in enumerate(zip(q.split(1), k.split(1), v.split(1))):  # [1, H, T, D] each
        bounds = docs.bounds[b]
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        parts = [F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa)  # [1, Hq, n, D]
                 for qd, kd, vd in zip(qb.split(lengths, 2), kb.split(lengths, 2), vb.split(lengths, 2))]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))  # [1, Hq, T, D]
    return rows[0] if len(rows) == 1 else torch.cat(rows)  # [B, Hq, T, D]


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable:
    """FlexAttention compiled once per process: its eager form materialises the whole score matrix."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(q: Tensor, k: Tensor, v: Tensor, docs: DocumentMask, *, compiled: bool = True) -> Tensor:
    """FlexAttention over the documents' block mask. q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D].
    `compiled=False` runs the eager reference (O(T^2) memory; what the CPU test of the mask uses)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, block_mask=docs.block_mask(q.device), enable_gqa=q.shape[1] != k.shape[1])


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def attention_backend(device: torch.device) -> str:
    """"flex" on CUDA (when this torch has FlexAttention), else "segments". FlexAttention on CPU computes forward
    only (no backward in torch 2.13), and CPU training is what qwenlink runs there, so CPU always takes segments."""
    if device.type == "cuda" and flex_available():
        return "flex"
    return "segments"


@torch.compiler.disable
def document_attention(q: Tensor, k: Tensor, v: Tensor, docs: DocumentMask,
                       backend: Optional[str] = None) -> Tensor:
    """Causal attention within documents. q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D].

    Kept out of `torch.compile`d decoder blocks (a graph break here): the segment loop's slice sizes change with every
    batch and would recompile the block each time; the flex path compiles its own kernel."""
    backend = backend or attention_backend(q.device)
    if backend == "flex":
        return flex_document_attention(q, k, v, docs)
    return segment_attention(q, k, v, docs)

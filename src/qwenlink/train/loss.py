"""Memory-efficient language-model loss: the output projection and cross entropy computed together, in chunks.

Why: with Qwen's 151936-token vocabulary the fp32 logits of one 4 x 512 micro batch are 1.2 GB, and a plain
`F.cross_entropy(model(x))` keeps them, their softmax and their gradient alive at once. Here the head's matmul,
log-sum-exp and gradient are computed `chunk_size` tokens at a time inside one autograd function; only the gradients
w.r.t. the hidden states [N, H] and the head weight [V, H] are kept for backward. Positions whose label is -100 are
dropped before the head is applied, so prompt tokens in SFT cost nothing in the head.

No host synchronisation when the labels are on the host (the loader's CPU tensor, as the trainer passes them): the
valid positions are found there and gathered on the device with `index_select`, so every shape is known to the host
and nothing waits for the device (boolean indexing of device tensors would: its output size depends on the data).

The loss is a *sum* over valid tokens multiplied by `scale`; the trainer passes 1 / (valid tokens in the whole global
batch), which makes gradient accumulation exactly equivalent to one large batch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
Tensor = torch.Tensor


def accumulate_head_grads(grad: Tensor, h: Tensor, weight: Tensor, grad_hidden: Optional[Tensor],
                          grad_weight: Optional[Tensor], start: int) -> None:
    """One chunk's gradient w.r.t. its logits (`grad` [C, V], in the hidden dtype) into the hidden rows it came from
    (`grad_hidden[start:start + C]`, [C, H]) and into the fp32 head gradient (`grad_weight` [V, H]).

    The head gradient is a bf16 GEMM (fp32 accumulation inside it) for bf16 inputs, summed over chunks in fp32;
    casting both operands up instead would run the head's largest GEMM at fp32 speed."""
    if grad_hidden is not None:
        grad_hidden[start:start + grad.shape[0]] = grad @ weight                   # [C, H]
    if grad_weight is not None:
        if grad.dtype == torch.float32:
            grad_weight.addmm_(grad.t(), h)
        else:
            grad_weight.add_(grad.t() @ h)


def log_softmax_in_place(logits: Tensor) -> Tensor:
    """log_softmax over the last dimension, written over `logits` ([C, V] fp32).

    One fused pass per row and no second [C, V] buffer: torch.logsumexp would allocate one (x - max, exponentiated)
    and the loss would then subtract and exponentiate in two more passes. The kernels (CPU, and CUDA's, which
    reduce a row before writing it) read each element before writing the same element."""
    return torch.ops.aten._log_softmax.out(logits, -1, False, out=logits)


def softmax_in_place(logits: Tensor) -> Tensor:
    """softmax over the last dimension, written over `logits` ([C, V] fp32), for the same reasons."""
    return torch.ops.aten._softmax.out(logits, -1, False, out=logits)


class _HostLogitsBuffer:
    """The fp32 [C, V] buffer a chunk's logits are computed into on the CPU, kept from one step to the next.

    Why: glibc serves blocks above 32 MiB with a fresh mmap and returns them on free, so every step's logits
    (311 MB for 512 tokens of Qwen's vocabulary) were new pages that the kernel faulted in and zeroed: 80 ms per
    buffer here, a third of the head GEMM it feeds. Accelerators' caching allocators already reuse their blocks,
    so only real CPU tensors use it (not fake tensors, not under tracing). It holds the largest chunk seen."""

    buffer: Optional[Tensor] = None

    @classmethod
    def get(cls, rows: int, cols: int) -> Tensor:
        if cls.buffer is None or cls.buffer.numel() < rows * cols:
            cls.buffer = None  # free the smaller one first
            cls.buffer = torch.empty(rows * cols, dtype=torch.float32)
        return cls.buffer[: rows * cols].view(rows, cols)


def chunk_logits(h: Tensor, weight: Tensor) -> Tensor:
    """h @ weight.T in fp32: [C, H] x [V, H] -> [C, V]."""
    plain = (torch.Tensor, nn.Parameter)  # not a fake tensor, a DTensor or another subclass
    on_host = (h.device.type == "cpu" and type(h) in plain and type(weight) in plain
               and not torch.compiler.is_compiling())
    if not on_host:
        return (h @ weight.t()).float()
    out = _HostLogitsBuffer.get(h.shape[0], weight.shape[0])
    if h.dtype == weight.dtype == torch.float32:
        return torch.mm(h, weight.t(), out=out)
    return out.copy_(h @ weight.t())


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, label_i) * scale, with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, scale: float | Tensor, chunk_size: int) -> Tensor:
        # hidden: [N, H] (valid positions only), weight: [V, H], labels: [N]; scale: a number or a 0-dim device tensor
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]                       # [C, H]
            y = labels[start:start + chunk_size]                       # [C]
            logits = chunk_logits(h, weight)                          # [C, V] fp32, one chunk at a time
            logp = log_softmax_in_place(logits)                       # [C, V], the same buffer
            total -= logp.gather(1, y[:, None]).sum()
            if need_grad:
                # d(sum CE)/d logits = softmax - onehot, computed in place to keep one [C, V] buffer
                grad = logp.exp_()
                grad.scatter_add_(1, y[:, None], torch.full_like(y[:, None], -1, dtype=grad.dtype))
                grad.mul_(scale)
                accumulate_head_grads(grad.to(hidden.dtype), h, weight, grad_hidden, grad_weight, start)
        if need_grad:
            ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0),
                                  grad_weight.to(weight.dtype) if grad_weight is not None else torch.empty(0))
        return total * scale

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place on the device: x * 1.0 is exact, so loss.backward() gets the forward's gradients bitwise
        # without reading grad_output on the host to tell that case apart. (A second backward through the same
        # graph is refused by autograd: the saved tensors were modified.)
        gh = grad_hidden.mul_(grad_output) if ctx.needs_input_grad[0] else None
        gw = grad_weight.mul_(grad_output) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, scale: float | Tensor = 1.0,
                         chunk_size: int = 1024) -> tuple[Tensor, int]:
    """Summed cross entropy of `hidden @ weight.T` against `labels`, times `scale`, and the number of valid tokens.

    hidden: [..., H]; labels: [...] with IGNORE_INDEX where no loss is wanted; weight: [V, H]. `labels` may live on
    the host while `hidden` is on an accelerator: the valid positions are then found on the host and only they are
    sent to the device (no synchronisation). Labels already on the device cost one (finding the valid positions).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])                         # [N, H]
    labels = labels.reshape(-1)                                           # [N]
    positions = (labels != IGNORE_INDEX).nonzero().squeeze(1)             # [n], where the labels are
    count = positions.numel()
    if count == 0:
        # Keep the graph connected so backward still runs (all gradients zero).
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float(), 0
    labels = labels.index_select(0, positions).to(hidden.device, non_blocking=True)            # [n]
    hidden = hidden.index_select(0, positions.to(hidden.device, non_blocking=True))           # [n, H]
    if not torch.is_grad_enabled():
        with torch.no_grad():
            return _LinearCrossEntropy.forward(_NoGradCtx(), hidden, weight, labels, scale, chunk_size), count
    return _LinearCrossEntropy.apply(hidden, weight, labels, scale, chunk_size), count


class _NoGradCtx:
    """Stands in for autograd's ctx when evaluating without gradients."""

    needs_input_grad = (False, False, False, False, False)

    def save_for_backward(self, *tensors: Tensor) -> None:  # pragma: no cover - never called without grads
        pass


def reference_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The plain formulation (fp32 logits, sum over valid tokens); used by tests as ground truth."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@contextlib.contextmanager
def head_detached(model: nn.Module) -> Iterator[Optional[nn.Linear]]:
    """Run the model without its lm_head (it then returns final hidden states) and yield the head.

    The head's parameters stay registered everywhere else (optimizer, checkpoints, FSDP groups); only the attribute
    is None for the duration of one forward, so the loss can apply the head chunk by chunk.
    """
    head = getattr(model, "lm_head", None)
    if head is None:
        yield None
        return
    model.lm_head = None
    try:
        yield head
    finally:
        model.lm_head = head


def model_loss(model: nn.Module, input_ids: Tensor, labels: Tensor, *, scale: float | Tensor, chunk_size: int,
               position_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None) -> tuple[Tensor, int]:
    """Scaled summed next-token loss of a micro batch (labels already shifted to align with input positions).

    input_ids, labels: [B, T]; labels may stay on the host (see `linear_cross_entropy`). Returns (loss, number of
    valid label tokens).
    """
    with head_detached(model) as head:
        hidden = model(input_ids, position_ids=position_ids, attention_mask=attention_mask)  # [B, T, H]
    if head is None:  # a pipeline stage without the head: its output is not a loss (handled by the pipeline)
        raise ValueError("model_loss needs a model that holds lm_head")
    return linear_cross_entropy(hidden, head.weight, labels, scale=scale, chunk_size=chunk_size)

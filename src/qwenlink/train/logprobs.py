"""Summed log-probabilities of each row's labelled tokens: what a preference objective (train/dpo.py) compares.

Two ways in, matching the two ways train/step.py computes a loss:
- `row_logps_from_hidden`: the model ran with its head detached (one process, FSDP2); the head and log-softmax are
  applied `chunk_size` labelled positions at a time inside one autograd function that recomputes each chunk's
  logits in backward, so no [tokens, vocabulary] tensor outlives a chunk (151936 ids x 2 sequences x 4 KiB of fp32
  per token otherwise). Positions come from the loader's host labels, so nothing waits for the device.
- `row_logps_from_logits`: the logits exist already (a pipeline's last stage, or this rank's vocabulary slice under
  tensor parallelism, where `loss_parallel` computes the softmax statistics with all-reduces over tp).

Labels are already shifted (labels[t] is the target of the logits at t), -100 where nothing is scored.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from qwenlink.train.loss import IGNORE_INDEX, accumulate_head_grads, chunk_logits, log_softmax_in_place, \
    softmax_in_place

Tensor = torch.Tensor


class _LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden_i @ weight.T)[label_i] per position, in chunks; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
        # hidden: [n, H] (labelled positions only), weight: [V, H], labels: [n] -> [n] fp32
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            logp = log_softmax_in_place(chunk_logits(hidden[start:start + chunk_size], weight))  # [C, V]
            y = labels[start:start + chunk_size]
            out[start:start + chunk_size] = logp.gather(1, y[:, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        c = ctx.chunk_size
        for start in range(0, hidden.shape[0], c):
            h = hidden[start:start + c]                                                # [C, H]
            y = labels[start:start + c]
            g = grad_out[start:start + c].float()                                      # [C]
            # d logp / d logits = onehot - softmax, times each position's incoming gradient (one [C, V] buffer)
            grad = softmax_in_place(chunk_logits(h, weight)).mul_(-g[:, None])        # [C, V] fp32
            grad.scatter_add_(1, y[:, None], g[:, None])
            accumulate_head_grads(grad.to(hidden.dtype), h, weight, grad_hidden, grad_weight, start)
        return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None


def row_logps_from_hidden(hidden: Tensor, weight: Tensor, labels: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Per-row sums of the labelled tokens' log-probabilities: hidden [R, T, H], labels [R, T] -> [R] fp32.

    `labels` may live on the host while `hidden` is on an accelerator: positions are found there (no sync)."""
    rows, length = labels.shape
    flat = labels.reshape(-1)
    positions = (flat != IGNORE_INDEX).nonzero().squeeze(1)                     # [n] on the labels' device
    row_of = (positions // length).to(hidden.device, non_blocking=True)         # [n]
    targets = flat.index_select(0, positions).to(hidden.device, non_blocking=True)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions.to(hidden.device, non_blocking=True))
    if torch.is_grad_enabled():
        token = _LinearTokenLogprobs.apply(picked, weight, targets, chunk_size)     # [n]
    else:
        with torch.no_grad():
            token = _LinearTokenLogprobs.forward(_NoCtx(), picked, weight, targets, chunk_size)
    return torch.zeros(rows, dtype=torch.float32, device=hidden.device).index_add(0, row_of, token)


class _NoCtx:
    """Stands in for autograd's ctx without gradients (nothing is saved)."""

    def save_for_backward(self, *tensors: Tensor) -> None:
        pass


def row_logps_from_logits(logits: Tensor, labels: Tensor, tp_mesh: Optional[object] = None) -> Tensor:
    """Per-row sums of the labelled tokens' log-probabilities from logits [R, T, V] (or this rank's vocabulary
    slice [R, T, V/tp] with `tp_mesh`; then inside `loss_parallel`, see parallel/tensor.py) -> [R] fp32."""
    rows, length = labels.shape
    labels = labels.to(logits.device, non_blocking=True)
    if tp_mesh is not None:
        from torch.distributed.tensor import DTensor, Shard

        logits = DTensor.from_local(logits.float(), tp_mesh, [Shard(-1)], run_check=False)
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none")                                      # [R x T], 0 where ignored
    if hasattr(ce, "full_tensor"):
        ce = ce.full_tensor()
    return -ce.view(rows, length).sum(-1)

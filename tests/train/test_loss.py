"""The chunked linear cross entropy against the plain formulation; label masking through the real model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model
from qwenlink.train.loss import IGNORE_INDEX, linear_cross_entropy, model_loss, reference_cross_entropy


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_matches_plain_cross_entropy_values_and_gradients(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)   # [B, T, H]
    weight = torch.randn(50, 16, generator=g, requires_grad=True)     # [V, H]
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX
    loss, n = linear_cross_entropy(hidden, weight, labels, scale=0.25, chunk_size=chunk)
    (3 * loss).backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = reference_cross_entropy(hidden @ weight.t(), labels) * 0.25
    (3 * ref).backward()
    assert n == 18
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], weight.grad)


def test_no_grad_evaluation_and_all_masked() -> None:
    hidden, weight = torch.randn(2, 4, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 4))
    with torch.no_grad():
        loss, n = linear_cross_entropy(hidden, weight, labels, chunk_size=3)
    torch.testing.assert_close(loss, reference_cross_entropy(hidden @ weight.t(), labels))
    masked = torch.full((2, 4), IGNORE_INDEX)
    h = hidden.clone().requires_grad_()
    loss, n = linear_cross_entropy(h, weight, masked)
    loss.backward()
    assert n == 0 and loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_single_unmasked_label_gives_that_tokens_loss() -> None:
    model = build_model(get_preset("test-tiny"), seed=0)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[1, 5] = 42
    loss, n = model_loss(model, ids, labels, scale=1.0, chunk_size=4)
    logits = model(ids)                                     # [B, T, V]
    expected = F.cross_entropy(logits[1, 5][None].float(), torch.tensor([42]))
    assert n == 1
    torch.testing.assert_close(loss, expected)
    assert model.lm_head is not None  # the head is back after the loss borrowed it


def test_bf16_autocast_close_to_fp32() -> None:
    model = build_model(get_preset("test-tiny"), seed=0)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = ids.roll(-1, dims=1)
    ref, _ = model_loss(model, ids, labels, scale=1 / 32, chunk_size=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = model_loss(model, ids, labels, scale=1 / 32, chunk_size=7)
    assert low.dtype == torch.float32
    assert abs(low.item() - ref.item()) < 0.05


def test_host_logits_buffer_is_reused_and_never_leaks_an_earlier_call() -> None:
    """On the CPU a chunk's logits are computed into one buffer kept between calls (no fresh pages every step):
    successive calls with other data, a smaller chunk and a bf16 head each still equal the plain formulation."""
    from qwenlink.train.loss import _HostLogitsBuffer

    g = torch.Generator().manual_seed(1)
    weight = torch.randn(300, 16, generator=g)                         # [V, H]
    pointers = set()
    for tokens, chunk, dtype in ((40, 32, torch.float32), (9, 4, torch.float32), (40, 32, torch.bfloat16)):
        hidden = torch.randn(tokens, 16, generator=g).to(dtype).requires_grad_()
        w = weight.to(dtype, copy=True).requires_grad_()
        labels = torch.randint(0, 300, (tokens,), generator=g)
        loss, _ = linear_cross_entropy(hidden, w, labels, chunk_size=chunk)
        loss.backward()
        pointers.add(_HostLogitsBuffer.buffer.data_ptr())
        h32, w32 = hidden.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        ref = reference_cross_entropy(h32 @ w32.t(), labels)
        ref.backward()
        tol = dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 else {}  # bf16 logits: rounded before softmax
        torch.testing.assert_close(loss, ref, **tol)
        torch.testing.assert_close(hidden.grad.float(), h32.grad, **tol)
        torch.testing.assert_close(w.grad.float(), w32.grad, **tol)
    assert len(pointers) == 1  # the first call's buffer served the later ones

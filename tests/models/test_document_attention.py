"""Document-aware attention (models/documents.py): several documents per row, each attended causally on its own,
without a [T, T] mask. Equal (fp32, 1e-5) to the dense-mask reference and to transformers running every document
alone, in logits and gradients; composes with activation checkpointing and LoRA; the backend follows the device."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hf_helpers import make_hf_model
from qwenlink.checkpoint.hf import load_hf_model
from qwenlink.models import documents as documents_mod
from qwenlink.models.documents import (DocumentMask, attention_backend, document_attention, flex_available,
                                       flex_document_attention, segment_attention)
from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model

TOL = dict(rtol=0, atol=1e-5)
# Two rows of 40 tokens: documents of mixed length, one of a single token, and a row that is one whole document.
LENGTHS = [[7, 1, 12, 20], [40]]


def packed(lengths: list[list[int]], vocab: int = 320, seed: int = 0) -> tuple[torch.Tensor, DocumentMask]:
    g = torch.Generator().manual_seed(seed)
    seqlen = sum(lengths[0])
    segments = torch.stack([torch.repeat_interleave(torch.arange(1, len(r) + 1), torch.tensor(r)) for r in lengths])
    assert segments.shape == (len(lengths), seqlen)
    return torch.randint(0, vocab, (len(lengths), seqlen), generator=g), DocumentMask.from_segment_ids(segments)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_document_mask_from_segments_and_eod() -> None:
    docs = DocumentMask.from_segment_ids(torch.tensor([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]]))
    assert docs.bounds == ((0, 2, 5, 7), (0, 7))
    assert docs.doc_ids.tolist() == [[0, 0, 1, 1, 1, 2, 2], [0] * 7]
    assert docs.positions().tolist() == [[0, 1, 0, 1, 2, 0, 1], list(range(7))]
    # EOD (9) ends its document: the next token starts a new one; an EOD at the very end starts nothing.
    eod = DocumentMask.from_eod(torch.tensor([[5, 9, 5, 5, 9, 9, 5, 9]]), eod_id=9)
    assert eod.bounds == ((0, 2, 5, 6, 8),)
    assert eod.positions().tolist() == [[0, 1, 0, 1, 2, 0, 0, 1]]
    dense = eod.to_dense()[0, 0]
    assert dense[3].tolist() == [False, False, True, True, False, False, False, False]
    assert dense.sum() == 3 + 6 + 1 + 3


def test_segment_attention_equals_dense_mask_kernel_with_gradients() -> None:
    _, docs = packed(LENGTHS)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 40, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    out = segment_attention(q, k, v, docs)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=docs.to_dense(), enable_gqa=True)
    torch.testing.assert_close(out, ref, **TOL)
    w = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_model_equals_dense_mask_reference() -> None:
    """Same logits and gradients as the model run with the equivalent [B, 1, T, T] mask."""
    model = build_model(get_preset("test-tiny"), seed=3)
    ids, docs = packed(LENGTHS)
    positions = docs.positions()
    results = []
    for mask in (docs, docs.to_dense()):
        model.zero_grad(set_to_none=True)
        logits = model(ids, position_ids=positions, attention_mask=mask)  # [B, T, V]
        (logits.float().square().mean()).backward()
        results.append((logits.detach(), grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    assert results[0][1].keys() == results[1][1].keys()
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], **TOL, msg=name)


def test_model_equals_transformers_running_each_document_alone(tmp_path) -> None:
    """Packed rows through qwenlink == every document through transformers' Qwen2 on its own (positions from 0):
    logits, and the gradients of the summed next-token loss."""
    hf, path = make_hf_model(tmp_path, heads=4, kv_heads=2)
    ours = load_hf_model(path).train()
    ids, docs = packed(LENGTHS)
    logits = ours(ids, position_ids=docs.positions(), attention_mask=docs)  # [B, T, V]
    loss = 0.0
    ref_rows = []
    for row, bounds in enumerate(docs.bounds):
        parts = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            doc = ids[row:row + 1, start:end]
            out = hf(doc).logits  # [1, n, V]
            parts.append(out[0])
            loss = loss + F.cross_entropy(out[0, :-1], doc[0, 1:], reduction="sum") if end - start > 1 else loss
        ref_rows.append(torch.cat(parts))
    loss.backward()
    torch.testing.assert_close(logits, torch.stack(ref_rows).detach(), **TOL)
    # The same loss from the packed logits: within each document only (labels -100 at each document's last token).
    labels = torch.full_like(ids, -100)
    for row, bounds in enumerate(docs.bounds):
        for start, end in zip(bounds[:-1], bounds[1:]):
            labels[row, start:end - 1] = ids[row, start + 1:end]
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").backward()
    hf_grads = {n.removeprefix("model."): p.grad for n, p in hf.named_parameters()}
    got = grads(ours)
    assert got.keys() == hf_grads.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, hf_grads[name], **TOL, msg=name)


def test_activation_checkpointing_and_lora_with_documents() -> None:
    """Checkpointed LoRA layers recompute the same document attention: gradients equal the plain model's."""
    from qwenlink.models.lora import LoraConfig, apply_lora, iter_lora_modules
    from qwenlink.parallel.parallelize import apply_activation_checkpointing

    ids, docs = packed(LENGTHS)
    results = []
    for checkpointed in (False, True):
        model = build_model(get_preset("test-tiny"), seed=3)
        apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["all-linear"]))
        torch.manual_seed(5)
        for _, module in iter_lora_modules(model):
            torch.nn.init.normal_(module.lora_B, std=0.1)  # adapters that change the output
        if checkpointed:
            apply_activation_checkpointing(model, "full", 1)
        logits = model(ids, position_ids=docs.positions(), attention_mask=docs)
        logits.float().square().mean().backward()
        results.append((logits.detach(), grads(model)))
    assert type(model.layers["0"]).__name__ == "CheckpointWrapper"
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    names = {n.replace("._checkpoint_wrapped_module", "") for n in results[1][1]}
    assert names == set(results[0][1]) and any("lora_A" in n for n in names)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(grad, results[0][1][name.replace("._checkpoint_wrapped_module", "")], **TOL)


def test_backend_follows_the_device(monkeypatch) -> None:
    """CPU (no FlexAttention backward in torch 2.13) takes the per-document segments; CUDA takes FlexAttention."""
    assert attention_backend(torch.device("cpu")) == "segments"
    assert attention_backend(torch.device("cuda")) == ("flex" if flex_available() else "segments")
    called = []
    monkeypatch.setattr(documents_mod, "flex_document_attention", lambda *a, **k: called.append("flex") or a[0])
    monkeypatch.setattr(documents_mod, "segment_attention", lambda *a, **k: called.append("segments") or a[0])
    monkeypatch.setattr(documents_mod, "attention_backend", lambda device: "flex" if device.type == "meta" else
                        "segments")
    q = torch.zeros(1, 2, 4, 8)
    document_attention(q, q, q, DocumentMask.from_starts(torch.zeros(1, 4, dtype=torch.bool)))
    document_attention(q.to("meta"), q.to("meta"), q.to("meta"),
                       DocumentMask.from_starts(torch.zeros(1, 4, dtype=torch.bool)))
    assert called == ["segments", "flex"]


@pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_equals_segments_forward() -> None:
    """The CUDA path's document mask, checked on CPU with FlexAttention's eager forward (CPU has no backward)."""
    _, docs = packed(LENGTHS)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 40, 8, generator=g) for h in (4, 2, 2))
    with torch.no_grad():
        out = flex_document_attention(q, k, v, docs, compiled=False)
        ref = segment_attention(q, k, v, docs)
    torch.testing.assert_close(out, ref, **TOL)


def test_kv_cache_with_documents_is_refused() -> None:
    from qwenlink.models.qwen2 import KVCache

    config = dataclasses.replace(get_preset("test-tiny"), num_hidden_layers=1)
    model = build_model(config, seed=0)
    ids, docs = packed([[3, 5]])
    cache = KVCache(config, 1, 16, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="not with a kv_cache"):
        model(ids, attention_mask=docs, kv_cache=cache)


def test_segments_use_the_blocked_kernel_not_the_math_one() -> None:
    """Memory linear in T: every document goes through SDPA's flash kernel (blocked; 3-D inputs or a mask would send
    it to the math kernel, which materialises each [n, n] score matrix)."""
    from torch.profiler import profile

    _, docs = packed(LENGTHS)
    q, k, v = (torch.randn(2, h, 40, 8, requires_grad=True) for h in (4, 2, 2))
    with profile() as prof:
        segment_attention(q, k, v, docs).sum().backward()
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names
    assert not any("math" in n or "softmax" in n for n in names), sorted(names)

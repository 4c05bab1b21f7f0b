"""qwenlink's Qwen2 equals transformers' Qwen2ForCausalLM, loaded through the HF checkpoint path."""

from __future__ import annotations

import time

import pytest
import torch

from hf_helpers import make_hf_model
from qwenlink.checkpoint.hf import load_hf_model
from qwenlink.models.presets import PRESETS
from qwenlink.models.qwen2 import build_model

CASES = {
    "mha-untied": dict(heads=4, kv_heads=4, tied=False),
    "gqa-untied": dict(heads=4, kv_heads=2, tied=False),
    "gqa-tied": dict(heads=8, kv_heads=2, tied=True, hidden=128),
    "mqa-tied-theta5e6": dict(heads=4, kv_heads=1, tied=True, theta=5e6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf, path = make_hf_model(tmp_path, **CASES[case])
    ours = load_hf_model(path).eval()
    ids = torch.randint(0, 320, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5


def test_left_padding_with_attention_mask(tmp_path):
    hf, path = make_hf_model(tmp_path, kv_heads=2)
    ours = load_hf_model(path).eval()
    ids = torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, :2] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        got = ours(ids, attention_mask=mask, position_ids=position_ids)
        ref_default_pos = hf(ids, attention_mask=mask).logits
        got_default_pos = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert torch.isfinite(got).all()  # padded query rows must not produce NaN that leaks into real rows
    assert (got - ref)[real].abs().max().item() <= 1e-5
    assert (got_default_pos - ref_default_pos)[real].abs().max().item() <= 1e-5
    # A left-padded row with shifted positions equals the same prompt alone.
    with torch.no_grad():
        alone = ours(ids[0:1, 5:])
    assert (got[0, 5:] - alone[0]).abs().max().item() <= 1e-5


def test_explicit_position_ids_restart(tmp_path):
    """Packed documents restart positions; rotary must follow the given positions, not the slot index."""
    hf, path = make_hf_model(tmp_path)
    ours = load_hf_model(path).eval()
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(3))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        ref = hf(ids, position_ids=position_ids).logits
        got = ours(ids, position_ids=position_ids)
    assert (got - ref).abs().max().item() <= 1e-5


def test_bf16_close_to_transformers(tmp_path):
    hf, path = make_hf_model(tmp_path, dtype=torch.bfloat16)
    ours = load_hf_model(path)
    assert next(ours.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits.float()
        got = ours(ids).float()
    assert (got - ref).abs().max().item() <= 2e-2


def test_fixture_model_logits(tiny_fixture_hf):
    """The real transformers-written fixture directory loads and matches transformers."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_fixture_hf).eval()
    ours = load_hf_model(tiny_fixture_hf).eval()
    ids = torch.randint(0, 258, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_72b_builds_on_meta_quickly():
    start = time.perf_counter()
    model = build_model(PRESETS["qwen1.5-72b"], device="meta")
    elapsed = time.perf_counter() - start
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 72_287_920_128
    assert elapsed < 10  # generous: construction must not allocate or initialise 72B parameters


def test_pipeline_stage_forward_without_embedding_or_head(tmp_path):
    """Deleting modules (as a pipeline split does) leaves a working forward over hidden states."""
    _, path = make_hf_model(tmp_path, layers=4)
    full = load_hf_model(path).eval()
    first = load_hf_model(path).eval()
    second = load_hf_model(path).eval()
    del first.layers["2"], first.layers["3"]
    first.norm = None
    first.lm_head = None
    del second.layers["0"], second.layers["1"]
    second.embed_tokens = None
    ids = torch.randint(0, 320, (2, 7))
    with torch.no_grad():
        hidden = first(ids)
        assert hidden.shape == (2, 7, 64)
        assert torch.equal(second(hidden), full(ids))

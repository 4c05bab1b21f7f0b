"""oneDNN-prepacked linear layers: same results as nn.Linear, same parameters, safe around training and LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common import run_cli
from qwenlink.inference import prepack
from qwenlink.inference.generate import SamplingParams, generate
from qwenlink.inference.prepack import PrepackedLinear, prepack_linears
from qwenlink.models.lora import LoraConfig, apply_lora
from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model

pytestmark = pytest.mark.skipif(not prepack.prepack_available(), reason="this PyTorch build has no oneDNN kernels")

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _model(dtype=torch.float32):
    return build_model(get_preset("test-tiny"), dtype=dtype, seed=0).eval()


@pytest.fixture(autouse=True)
def pack_small_fp32(monkeypatch):
    """The test model's fp32 matrices are far below the size where packing pays off; pack them anyway here."""
    monkeypatch.setattr(prepack, "FP32_MIN_ELEMENTS", 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_prepacked_linear_equals_linear_for_any_row_count(dtype, bias):
    torch.manual_seed(0)
    plain = nn.Linear(48, 80, bias=bias).to(dtype)
    packed = PrepackedLinear(plain, batch_hint=8)
    with torch.inference_mode():
        for shape in [(1, 48), (1, 1, 48), (3, 48), (8, 1, 48), (2, 5, 48), (16, 48)]:
            x = torch.randn(shape, dtype=dtype)
            got = packed(x)
            assert got.shape == plain(x).shape and got.dtype == dtype
            torch.testing.assert_close(got, plain(x), **TOLERANCE[dtype])


def test_prepacking_keeps_parameters_tying_and_state_dict():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]
    swapped = prepack_linears(model, batch_hint=4)
    layers = model.config.num_hidden_layers
    assert swapped == 7 * layers + 1  # q, k, v, o, gate, up, down per layer + the head
    assert isinstance(model.layers["0"].self_attn.q_proj, PrepackedLinear)
    assert [id(p) for p in model.parameters()] == params_before
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight
    assert prepack_linears(model, batch_hint=4) == 0  # already swapped: nothing left to do


def test_weight_changed_in_place_is_repacked():
    model = _model()
    prepack_linears(model, batch_hint=2)
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        model.layers["0"].mlp.down_proj.weight.mul_(3.0)
        model.lm_head.weight.add_(0.01)
    fresh = _model()
    with torch.no_grad():
        fresh.layers["0"].mlp.down_proj.weight.mul_(3.0)
        fresh.lm_head.weight.add_(0.01)
        torch.testing.assert_close(model(tokens), fresh(tokens), atol=1e-5, rtol=1e-5)


def test_training_through_prepacked_layers_uses_autograd():
    model = _model()
    reference = _model()
    prepack_linears(model, batch_hint=2)
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    for m in (model, reference):
        m.train()
        m(tokens).float().logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)


def test_lora_adapters_train_after_the_base_was_prepacked():
    """Frozen prepacked layers must stay differentiable for their inputs: adapters behind them get gradients."""
    model = _model()
    generate(model, [[5, 6, 7]], SamplingParams(max_new_tokens=2))  # the engine prepacks the model in place
    assert isinstance(model.lm_head, PrepackedLinear)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    model(torch.tensor([[5, 6, 7, 8]])).float().logsumexp(-1).mean().backward()
    adapters = [(n, p) for n, p in model.named_parameters() if "lora_B" in n]
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in adapters)


def test_replaced_or_converted_weights_are_not_served_stale():
    model = _model()
    prepack_linears(model, batch_hint=2)
    tokens = torch.tensor([[5, 6, 7, 8]])
    fresh = _model()
    with torch.inference_mode():
        for m in (model, fresh):
            m.layers["1"].mlp.up_proj.weight = nn.Parameter(m.layers["1"].mlp.up_proj.weight * 2)
        torch.testing.assert_close(model(tokens), fresh(tokens), atol=1e-5, rtol=1e-5)
        model.to(torch.bfloat16)
        fresh.to(torch.bfloat16)
        torch.testing.assert_close(model(tokens), fresh(tokens), atol=2e-2, rtol=2e-2)


def test_lora_layers_are_left_alone():
    model = _model()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    prepack_linears(model, batch_hint=2)
    attn = model.layers["0"].self_attn
    assert not isinstance(attn.q_proj, PrepackedLinear) and isinstance(attn.k_proj, PrepackedLinear)


def test_unavailable_build_swaps_nothing(monkeypatch):
    monkeypatch.setattr(prepack, "prepack_available", lambda: False)
    model = _model()
    assert prepack_linears(model, batch_hint=2) == 0
    assert type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_tokens_equal_with_and_without_prepacking(dtype):
    prompts = [[5, 17, 42, 99, 3], [7, 8], [250, 11, 12, 13, 14, 15, 16, 19, 200], [1]]
    plain, _ = generate(_model(dtype), prompts, SamplingParams(max_new_tokens=12), prepack=False)
    packed_model = _model(dtype)
    packed, _ = generate(packed_model, prompts, SamplingParams(max_new_tokens=12))
    assert isinstance(packed_model.lm_head, PrepackedLinear)
    assert [g.tokens for g in packed] == [g.tokens for g in plain]


def test_generate_cli_no_prepack_gives_the_same_text(tiny_fixture_hf):
    common = ["generate", "--model", str(tiny_fixture_hf), "--prompt", "hello there", "--max-new-tokens", "8"]
    fast = run_cli(*common)
    plain = run_cli(*common, "--no-prepack")
    assert fast.returncode == 0 and plain.returncode == 0, fast.stderr + plain.stderr
    assert fast.stdout == plain.stdout and fast.stdout.strip()


def test_small_fp32_matrices_keep_the_plain_kernel(monkeypatch):
    monkeypatch.setattr(prepack, "FP32_MIN_ELEMENTS", 1 << 20)
    model = _model()
    assert prepack_linears(model, batch_hint=8) == 0
    bf16 = _model(torch.bfloat16)
    assert prepack_linears(bf16, batch_hint=8) == 7 * bf16.config.num_hidden_layers + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_greedy_batch_equals_transformers_generate(tmp_path, dtype):
    """With every projection prepacked, batched greedy decoding still equals HF `generate` token for token."""
    from hf_helpers import hf_greedy_left_padded, make_hf_model
    from qwenlink.checkpoint.hf import load_hf_model

    hf, path = make_hf_model(tmp_path, kv_heads=2, dtype=dtype)
    model = load_hf_model(path).eval()
    prompts = [[5, 17, 42, 99, 3], [7, 8], [250, 11, 12, 13, 14, 15, 16, 19, 200]]
    ours, _ = generate(model, prompts, SamplingParams(max_new_tokens=12))
    assert isinstance(model.layers["0"].mlp.down_proj, PrepackedLinear)
    assert [g.tokens for g in ours] == hf_greedy_left_padded(hf, prompts, 12)

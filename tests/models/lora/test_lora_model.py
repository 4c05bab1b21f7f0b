"""LoRA on the model: identity at init, merge == unmerged, only adapters (and modules_to_save) train, bad configs."""

from __future__ import annotations

import pytest
import torch

from lora_helpers import IDS, hf_base, lora_model, qwenlink_base
from qwenlink.errors import QwenlinkError
from qwenlink.models.lora import (LoraConfig, LoraLinear, apply_lora, cast_frozen_, count_parameters, merge_lora,
                                  trainable_parameters)
from qwenlink.models.qwen2 import build_model
from qwenlink.train.loss import model_loss


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return hf_base(tmp_path_factory.mktemp("lora"))[1]


def test_megatron_names_expand_to_hf_projections():
    cfg = LoraConfig(target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                     modules_to_save=["word_embeddings", "output_layer"])
    assert cfg.targets() == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert cfg.saved_modules() == ("embed_tokens", "lm_head")
    assert LoraConfig(target_modules=["linear_fc1", "self_attn.v_proj"]).targets() == ("v_proj", "gate_proj",
                                                                                        "up_proj")
    assert LoraConfig(r=16, alpha=32).scaling == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0), "lora.r must be a positive integer"),
    (dict(r=-4), "lora.r must be a positive integer"),
    (dict(alpha=0), "lora.alpha must be positive"),
    (dict(dropout=1.0), "lora.dropout"),
    (dict(target_modules=["qkv_proj"]), "valid names: q_proj, k_proj"),
    (dict(target_modules=["c_attn"]), "matches no projection"),
    (dict(target_modules=[]), "is empty"),
    (dict(modules_to_save=["norm"]), "modules_to_save: 'norm'"),
])
def test_bad_lora_config_fails_naming_the_field(kwargs, message):
    with pytest.raises(QwenlinkError, match=message):
        LoraConfig(**kwargs)


def test_at_init_outputs_equal_the_base(base_dir):
    base = qwenlink_base(base_dir)
    with torch.no_grad():
        expected = base(IDS)
    model = apply_lora(qwenlink_base(base_dir), LoraConfig(r=4, alpha=8))
    assert all(isinstance(model.layers["0"].mlp.up_proj, LoraLinear) for _ in range(1))
    assert model.layers["0"].self_attn.q_proj.lora_A.abs().sum() > 0  # A random, B zero
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, atol=0, rtol=0)
    # base parameter names are unchanged; adapters add lora_A / lora_B next to them
    names = set(model.state_dict())
    assert set(base.state_dict()) <= names
    assert "layers.1.mlp.down_proj.lora_B" in names


def test_merged_equals_unmerged(base_dir):
    cfg = LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["query_key_value", "dense_4h_to_h"])
    model = lora_model(base_dir, cfg)
    with torch.no_grad():
        unmerged = model(IDS)
        merged_model = merge_lora(model)
        merged = merged_model(IDS)
    assert not any(isinstance(m, LoraLinear) for m in merged_model.modules())
    assert set(merged_model.state_dict()) == set(qwenlink_base(base_dir).state_dict())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert (merged - qwenlink_base(base_dir)(IDS)).abs().max() > 1e-3  # the adapter did change the output


def test_only_adapters_and_saved_modules_train(base_dir):
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1, modules_to_save=["lm_head"])
    model = apply_lora(qwenlink_base(base_dir), cfg).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    labels = torch.roll(IDS, -1, dims=1)
    for _ in range(3):
        loss, _ = model_loss(model, IDS, labels, scale=1.0 / labels.numel(), chunk_size=8)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert "lm_head.weight" in changed and "layers.0.self_attn.q_proj.lora_B" in changed
    assert not any(k.endswith("q_proj.weight") or k.endswith("q_proj.bias") for k in changed)
    # optimizer state exists for exactly the trainable parameters
    assert {id(p) for p in optimizer.state} == {id(p) for p in params}
    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(p.numel() for p in params) < n_total


def test_bf16_base_with_fp32_adapters_trains(base_dir):
    model = apply_lora(qwenlink_base(base_dir), LoraConfig(r=4, alpha=8))
    cast_frozen_(model, torch.bfloat16)
    q = model.layers["0"].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.dtype == torch.float32
    labels = torch.roll(IDS, -1, dims=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model_loss(model, IDS, labels, scale=1.0, chunk_size=8)
    loss.backward()
    assert q.lora_B.grad is not None and q.lora_B.grad.dtype == torch.float32 and q.weight.grad is None


def test_tied_model_saving_embeddings_trains_the_shared_weight():
    from qwenlink.models.config import ModelConfig

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = apply_lora(build_model(config, seed=0), LoraConfig(r=2, modules_to_save=["lm_head"]))
    assert model.embed_tokens.weight.requires_grad and model.lm_head.weight is model.embed_tokens.weight


def test_meta_device_apply_then_materialise_initialises_adapters():
    from qwenlink.models.config import ModelConfig

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = apply_lora(build_model(config, device="meta"), LoraConfig(r=2))
    model.to_empty(device="cpu")
    model.init_weights()
    q = model.layers["1"].self_attn.q_proj
    assert torch.count_nonzero(q.lora_B) == 0 and torch.isfinite(q.lora_A).all() and q.lora_A.abs().sum() > 0

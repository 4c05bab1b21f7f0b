"""PEFT interop: adapters exported here load with peft onto transformers' Qwen2ForCausalLM and give the same logits;
adapters made by peft import here and give the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from lora_helpers import IDS, hf_base, lora_model, qwenlink_base
from qwenlink.checkpoint.peft import WEIGHTS_FILE, apply_peft_adapter, save_model_adapter
from qwenlink.models.lora import LoraConfig

peft = pytest.importorskip("peft")


def _peft_logits(base_dir, adapter_dir) -> torch.Tensor:
    from transformers import Qwen2ForCausalLM

    base = Qwen2ForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("tied,rslora,saved", [(False, False, []), (False, True, ["output_layer"]),
                                               (True, False, ["word_embeddings"])])
def test_exported_adapter_loads_in_peft_with_same_logits(tmp_path, tied, rslora, saved):
    _, base_dir = hf_base(tmp_path, tied=tied)
    cfg = LoraConfig(r=4, alpha=8, target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                     modules_to_save=saved, use_rslora=rslora)
    model = lora_model(base_dir, cfg)
    with torch.no_grad():
        for name in cfg.saved_modules():  # as if trained: the saved module differs from the base
            getattr(model, name).weight.add_(0.01)
        ours = model(IDS)
    out = save_model_adapter(model, tmp_path / "adapter", cfg, base_model=str(base_dir))
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj"]
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in keys
    assert len([k for k in keys if "lora_" in k]) == 2 * 7 * 2
    theirs = _peft_logits(base_dir, out)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if saved:  # modules_to_save really changed the output (and was saved)
        plain = qwenlink_base(base_dir)
        reapplied = apply_peft_adapter(plain, out)
        assert reapplied.lora.saved_modules()
        assert any(k.endswith(("lm_head.weight", "embed_tokens.weight")) for k in keys)


def test_peft_made_adapter_imports_with_same_logits(tmp_path):
    hf_model, base_dir = hf_base(tmp_path)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf_model, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    pm.save_pretrained(tmp_path / "peft_adapter")
    with torch.no_grad():
        theirs = pm.eval()(IDS).logits
    model = qwenlink_base(base_dir)
    adapter = apply_peft_adapter(model, tmp_path / "peft_adapter")
    assert adapter.lora.r == 8 and adapter.lora.targets() == ("q_proj", "v_proj", "down_proj")
    with torch.no_grad():
        ours = model.eval()(IDS)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_peft_regex_targets_only_some_layers(tmp_path):
    hf_model, base_dir = hf_base(tmp_path)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=r"model\.layers\.1\.self_attn\.(k|o)_proj")
    pm = peft.get_peft_model(hf_model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.fill_(0.03)
    pm.save_pretrained(tmp_path / "regex_adapter")
    with torch.no_grad():
        theirs = pm.eval()(IDS).logits
    model = qwenlink_base(base_dir)
    adapter = apply_peft_adapter(model, tmp_path / "regex_adapter")
    assert adapter.modules == ["layers.1.self_attn.k_proj", "layers.1.self_attn.o_proj"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS), theirs, atol=1e-5, rtol=1e-5)

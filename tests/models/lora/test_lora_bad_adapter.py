"""An adapter that does not match the model fails loudly, naming the tensor / field (never silently ignored)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_helpers import IDS, hf_base, lora_model, qwenlink_base
from qwenlink.checkpoint.peft import CONFIG_FILE, WEIGHTS_FILE, apply_peft_adapter, save_model_adapter
from qwenlink.errors import QwenlinkError
from qwenlink.models.lora import LoraConfig


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(base dir, a matching adapter dir) of the 2-layer tiny model; r 4 on q/k/v/o + gate/up/down."""
    tmp = tmp_path_factory.mktemp("bad")
    _, base_dir = hf_base(tmp)
    cfg = LoraConfig(r=4, alpha=8)
    adapter = save_model_adapter(lora_model(base_dir, cfg), tmp / "adapter", cfg)
    return base_dir, adapter


def _copy(src, dst, *, config=None, tensors=None):
    dst.mkdir()
    data = json.loads((src / CONFIG_FILE).read_text())
    data.update(config or {})
    (dst / CONFIG_FILE).write_text(json.dumps(data))
    state = load_file(str(src / WEIGHTS_FILE))
    if tensors is not None:
        state = tensors(state)
    save_file(state, str(dst / WEIGHTS_FILE))
    return dst


def _apply(base_dir, adapter, *, model=None):
    return apply_peft_adapter(qwenlink_base(base_dir) if model is None else model, adapter)


@torch.no_grad()
def _hf_merged_logits(base_dir, adapter) -> torch.Tensor:
    """The reference, independent of qwenlink's LoRA code and of peft: transformers' model with W + (alpha / r) B A
    added to every projection the file names (by its own keys), run on the test ids."""
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    config = json.loads((adapter / CONFIG_FILE).read_text())
    scaling = config["lora_alpha"] / config["r"]
    state = load_file(str(adapter / WEIGHTS_FILE))
    merged = 0
    for key, lora_a in state.items():
        if key.endswith(".lora_A.weight"):
            module = hf.get_submodule(key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"))
            module.weight += scaling * state[key.replace(".lora_A.", ".lora_B.")] @ lora_a
            merged += 1
    assert merged == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    return hf(IDS).logits


def test_matching_adapter_applies(made):
    """Applying a matching adapter reads its hyper-parameters and changes the model exactly as merging it would."""
    base_dir, adapter_dir = made
    base = qwenlink_base(base_dir)
    with torch.no_grad():
        before = base(IDS)
    adapter = _apply(base_dir, adapter_dir, model=base)
    assert (adapter.lora.r, adapter.lora.alpha) == (4, 8)
    assert len(adapter.modules) == 2 * 7 and "layers.1.mlp.down_proj" in adapter.modules
    with torch.no_grad():
        after = base(IDS)
        exported = lora_model(base_dir, LoraConfig(r=4, alpha=8))(IDS)  # the model the adapter was saved from
    assert (after - before).abs().max() > 1e-3  # the adapter is not a no-op
    torch.testing.assert_close(after, exported, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, _hf_merged_logits(base_dir, adapter_dir), atol=1e-5, rtol=1e-5)


def test_wrong_rank_in_config(made, tmp_path):
    base_dir, adapter = made
    bad = _copy(adapter, tmp_path / "a", config={"r": 8})
    with pytest.raises(QwenlinkError, match=r"q_proj\.lora_A\.weight' has shape \[4, 64\], expected \[8, 64\]"):
        _apply(base_dir, bad)


def test_wrong_target_module(made, tmp_path):
    base_dir, adapter = made
    bad = _copy(adapter, tmp_path / "a", config={"target_modules": ["c_attn", "c_proj"]})
    with pytest.raises(QwenlinkError, match="'c_attn' matches no projection.*valid names: q_proj"):
        _apply(base_dir, bad)


def test_config_targets_fewer_modules_than_the_weights(made, tmp_path):
    base_dir, adapter = made
    bad = _copy(adapter, tmp_path / "a", config={"target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(QwenlinkError, match="adapts layers.0.self_attn.k_proj, which target_modules does not"):
        _apply(base_dir, bad)


def test_missing_tensor(made, tmp_path):
    base_dir, adapter = made
    drop = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    bad = _copy(adapter, tmp_path / "a", tensors=lambda s: {k: v for k, v in s.items() if k != drop})
    with pytest.raises(QwenlinkError, match="no tensor 'base_model.model.model.layers.1.mlp.up_proj.lora_B.weight'"):
        _apply(base_dir, bad)


def test_different_hidden_size(made, tmp_path):
    _, adapter = made
    _, other = hf_base(tmp_path, hidden=32, heads=4, kv_heads=2)
    with pytest.raises(QwenlinkError, match=r"has shape \[4, 64\], expected \[4, 32\].*different model"):
        _apply(other, adapter)


def test_more_layers_than_the_model(made, tmp_path):
    _, adapter = made
    _, other = hf_base(tmp_path, layers=1)
    with pytest.raises(QwenlinkError, match="layers.1.*does not belong to any projection of this model"):
        _apply(other, adapter)


def test_unsupported_features_and_bad_r(made, tmp_path):
    base_dir, adapter = made
    for i, (change, message) in enumerate([({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias"),
                                           ({"r": 0}, "lora.r must be a positive integer"),
                                           ({"peft_type": "IA3"}, "peft_type")]):
        bad = _copy(adapter, tmp_path / f"a{i}", config=change)
        with pytest.raises(QwenlinkError, match=message):
            _apply(base_dir, bad)


def test_not_an_adapter_directory(made, tmp_path):
    base_dir, _ = made
    with pytest.raises(QwenlinkError, match="not found"):
        _apply(base_dir, tmp_path / "nope")
    with pytest.raises(QwenlinkError, match="no adapter_config.json"):
        _apply(base_dir, base_dir)


def test_saved_module_with_wrong_vocab(made, tmp_path):
    base_dir, adapter = made
    extra = {"base_model.model.lm_head.weight": torch.zeros(100, 64)}
    bad = _copy(adapter, tmp_path / "a", config={"modules_to_save": ["lm_head"]},
                tensors=lambda s: {**s, **extra})
    with pytest.raises(QwenlinkError, match=r"lm_head.weight' has shape \[100, 64\], but the model's lm_head"):
        _apply(base_dir, bad)

"""Against the real thing: checkpoints Megatron-LM's own converter wrote from a tiny HF Qwen2 / Llama model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from common import fixture_dir
from qwenlink.checkpoint.hf import load_hf_model, read_hf_config
from qwenlink.checkpoint.megatron import save_megatron
from qwenlink.checkpoint.megatron_layout import make_layout
from qwenlink.checkpoint.megatron_read import MegatronSource
from qwenlink.checkpoint.safe_load import safe_torch_load
from qwenlink.checkpoint.sources import HFSource, model_from_source

QWEN = ("megatron-core-tiny-qwen2",)
LAYOUTS = [("mcore-tp1", 1, 1), ("mcore-tp2", 2, 1), ("mcore-tp1-pp2", 1, 2)]


def _rank_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("model_optim_rng.pt"))


@pytest.mark.parametrize("name,tp,pp", LAYOUTS)
def test_reading_fixture_gives_the_hf_tensors_exactly(name, tp, pp):
    hf = HFSource(fixture_dir(*QWEN, "hf"))
    meg = MegatronSource(fixture_dir(*QWEN, name))
    assert (meg.layout.tp, meg.layout.pp, meg.naming) == (tp, pp, "core")
    assert meg.config.vocab_size == 258 and meg.padded_vocab == (512 if tp == 2 else 384)
    for n in hf._shapes:
        a, b = meg.get(n), hf.get(n)
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), n


def test_fixture_padding_repeats_the_last_real_row():
    """The fact our writer relies on, checked in Megatron's own output."""
    ckpt = safe_torch_load(fixture_dir(*QWEN, "mcore-tp1", "iter_0000001", "mp_rank_00", "model_optim_rng.pt"))
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        w = ckpt["model"][key]
        assert torch.equal(w[258:], w[257:258].expand(384 - 258, -1))


def test_config_from_args_and_from_reference():
    """Megatron's args omit HF's rms_norm_eps (its converter records its own default 1e-5); --config-from fixes it."""
    hf_dir = fixture_dir(*QWEN, "hf")
    ref = read_hf_config(hf_dir)
    meg = MegatronSource(fixture_dir(*QWEN, "mcore-tp2"))
    assert meg.config.rms_norm_eps == 1e-5 and ref.rms_norm_eps == 1e-6
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rope_theta", "tie_word_embeddings", "qkv_bias",
                  "model_type"):
        assert getattr(meg.config, field) == getattr(ref, field), field
    assert MegatronSource(fixture_dir(*QWEN, "mcore-tp2"), reference=ref).config == ref


@pytest.mark.parametrize("name", ["mcore-tp2", "mcore-tp1-pp2"])
def test_logits_of_fixture_equal_hf(name):
    hf_dir = fixture_dir(*QWEN, "hf")
    ours = model_from_source(MegatronSource(fixture_dir(*QWEN, name), reference=read_hf_config(hf_dir))).eval()
    ref = load_hf_model(hf_dir).eval()
    tokens = torch.tensor([[1, 5, 77, 257, 3, 9, 120, 42]])
    with torch.no_grad():
        assert torch.equal(ours(tokens), ref(tokens))


@pytest.mark.parametrize("name,tp,pp", LAYOUTS)
def test_writing_reproduces_megatron_converter_output(tmp_path, name, tp, pp):
    expected_root = fixture_dir(*QWEN, name)
    source = HFSource(fixture_dir(*QWEN, "hf"))
    out = save_megatron(source, tmp_path / "out", make_layout(source.config, tp, pp))
    assert _rank_files(out) == _rank_files(expected_root)
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "1"
    for rel in _rank_files(expected_root):
        want, got = safe_torch_load(expected_root / rel), safe_torch_load(out / rel)
        assert (got["checkpoint_version"], got["iteration"]) == (want["checkpoint_version"], want["iteration"])
        assert list(got["model"]) == list(want["model"]), rel  # same keys in the same order
        for key, tensor in want["model"].items():
            if key.endswith("_extra_state"):
                continue
            mine = got["model"][key]
            assert mine.dtype == tensor.dtype and mine.shape == tensor.shape, key
            assert torch.equal(mine, tensor), f"{rel}: {key}"
        for arg in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "group_query_attention", "kv_channels", "padded_vocab_size", "vocab_size", "add_qkv_bias",
                    "swiglu", "normalization", "untie_embeddings_and_output_weights", "tensor_model_parallel_size",
                    "pipeline_model_parallel_size", "max_position_embeddings", "params_dtype", "rotary_base",
                    "make_vocab_size_divisible_by", "position_embedding_type", "add_position_embedding"):
            assert getattr(got["args"], arg) == getattr(want["args"], arg), arg


def test_llama_fixture_without_qkv_bias(tmp_path):
    root = fixture_dir("megatron-core-tiny-llama")
    hf, meg = HFSource(root / "hf"), MegatronSource(root / "mcore-tp1")
    assert meg.config.model_type == "llama" and not meg.config.qkv_bias
    for n in hf._shapes:
        assert torch.equal(meg.get(n), hf.get(n)), n
    out = save_megatron(hf, tmp_path / "out", make_layout(hf.config))
    rel = "iter_0000001/mp_rank_00/model_optim_rng.pt"
    want, got = safe_torch_load(root / "mcore-tp1" / rel), safe_torch_load(out / rel)
    assert list(got["model"]) == list(want["model"])
    assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items() if v is not None)


def test_cli_fixture_to_hf_reproduces_the_hf_files(tmp_path):
    from qwenlink.cli import main

    hf_dir = fixture_dir(*QWEN, "hf")
    out = tmp_path / "hf"
    rc = main(["convert", "--input", str(fixture_dir(*QWEN, "mcore-tp1-pp2")), "--output", str(out), "--to", "hf",
               "--config-from", str(hf_dir)])
    assert rc == 0
    want, got = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(want) == sorted(got)
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    assert read_hf_config(out) == read_hf_config(hf_dir)
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 258

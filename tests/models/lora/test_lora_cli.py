"""`qwenlink convert --merge-lora` and `qwenlink generate/serve --lora`: merged == unmerged, mismatches fail loudly."""

from __future__ import annotations

import json

import pytest
import torch

from common import run_cli
from lora_helpers import randomize_adapters
from qwenlink.checkpoint.hf import load_hf_model
from qwenlink.checkpoint.peft import CONFIG_FILE, save_model_adapter
from qwenlink.models.lora import LoraConfig, apply_lora

PROMPT = "hello world"


@pytest.fixture(scope="module")
def adapter(tiny_fixture_hf_module, tmp_path_factory):
    """A PEFT adapter (r 4, all projections, lm_head saved) for the fixture model, with weights big enough to change
    greedy decoding."""
    cfg = LoraConfig(r=4, alpha=8, modules_to_save=["output_layer"])
    model = apply_lora(load_hf_model(tiny_fixture_hf_module), cfg)
    randomize_adapters(model, seed=5, scale=0.3)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    return save_model_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter", cfg)


@pytest.fixture(scope="module")
def tiny_fixture_hf_module():
    from common import fixture_dir

    return fixture_dir("megatron-core-tiny-qwen2", "hf")


def _generate(model, *extra):
    result = run_cli("generate", "--model", str(model), "--prompt", PROMPT, "--greedy", "--max-new-tokens", "8",
                     "--device", "cpu", *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_merge_lora_to_hf_equals_unmerged_and_generate_lora(tmp_path, tiny_fixture_hf_module, adapter):
    base = tiny_fixture_hf_module
    merged_dir = tmp_path / "merged"
    result = run_cli("convert", "--input", str(base), "--output", str(merged_dir), "--to", "hf",
                     "--merge-lora", str(adapter))
    assert result.returncode == 0, result.stderr
    # transformers' merged model == peft's unmerged adapter on the base, in fp32
    peft = pytest.importorskip("peft")
    from transformers import Qwen2ForCausalLM

    ids = torch.tensor([[1, 5, 9, 40, 200, 7]])
    with torch.no_grad():
        merged = Qwen2ForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
        unmerged = peft.PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(base), adapter).eval()(ids).logits
        plain = Qwen2ForCausalLM.from_pretrained(base).eval()(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert (merged - plain).abs().max() > 1e-2
    # generate --lora (unmerged) decodes exactly what the merged model decodes, and differs from the base
    with_lora = _generate(base, "--lora", str(adapter))
    assert with_lora == _generate(merged_dir)
    assert with_lora != _generate(base)


def test_merge_lora_to_megatron(tmp_path, tiny_fixture_hf_module, adapter):
    from qwenlink.checkpoint.megatron_read import MegatronSource
    from qwenlink.checkpoint.peft import apply_peft_adapter
    from qwenlink.checkpoint.sources import model_from_source

    out = tmp_path / "mg"
    result = run_cli("convert", "--input", str(tiny_fixture_hf_module), "--output", str(out), "--to", "megatron",
                     "--tp", "2", "--merge-lora", str(adapter), "--config-from", str(tiny_fixture_hf_module))
    assert result.returncode == 0, result.stderr
    merged = model_from_source(MegatronSource(out, reference=load_hf_model(tiny_fixture_hf_module).config)).eval()
    unmerged = load_hf_model(tiny_fixture_hf_module)
    apply_peft_adapter(unmerged, adapter)
    ids = torch.tensor([[1, 5, 9, 40, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), unmerged.eval()(ids), atol=1e-5, rtol=1e-5)


@pytest.fixture
def mismatched(tmp_path, adapter):
    """The adapter claiming r = 8 while its tensors have r = 4."""
    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    for f in adapter.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = json.loads((bad / CONFIG_FILE).read_text())
    data["r"] = 8
    (bad / CONFIG_FILE).write_text(json.dumps(data))
    return bad


@pytest.mark.parametrize("command", ["generate", "serve", "convert"])
def test_mismatched_adapter_fails_loudly(tmp_path, tiny_fixture_hf_module, mismatched, command):
    base = str(tiny_fixture_hf_module)
    if command == "generate":
        args = ["generate", "--model", base, "--prompt", "x", "--lora", str(mismatched), "--device", "cpu"]
    elif command == "serve":
        args = ["serve", "--model", base, "--lora", str(mismatched), "--port", "0", "--device", "cpu"]
    else:
        args = ["convert", "--input", base, "--output", str(tmp_path / "out"), "--to", "hf", "--merge-lora",
                str(mismatched)]
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "q_proj.lora_A.weight' has shape [4, 64], expected [8, 64]" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()

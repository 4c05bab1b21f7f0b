"""qwenlink's Qwen1.5-MoE equals transformers' Qwen2MoeForCausalLM: logits, greedy generation, load-balancing loss,
HF checkpoints in both directions (issue #18, deliverable 1) and bad MoE checkpoints (deliverable 7)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import run_cli
from hf_helpers import hf_greedy_left_padded
from moe_helpers import VOCAB, make_hf_moe_model
from qwenlink.checkpoint.hf import load_hf_model, save_hf_from_source, save_hf_model
from qwenlink.checkpoint.sources import HFSource
from qwenlink.errors import QwenlinkError
from qwenlink.inference.generate import generate
from qwenlink.inference.sampling import SamplingParams
from qwenlink.models import qwen2_moe
from qwenlink.models.qwen2_moe import load_balancing_loss, record_routing

PROMPTS = [[5, 17, 42, 9, 100], [7, 8], [200, 3, 3, 61, 250, 12, 77, 1]]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    hf, path = make_hf_moe_model(tmp_path_factory.mktemp("hf_moe"))
    return hf, path, load_hf_model(path).eval()


def _left_padded(seed: int = 1):
    ids = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[0, :5] = 0
    mask[2, :2] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_logits_match_transformers_padded_batch(moe):
    hf, _, ours = moe
    ids, mask, pos = _left_padded()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos)
        full_ref, full = hf(ids).logits, ours(ids)
    assert (got - ref)[mask.bool()].abs().max().item() <= 1e-5
    assert (full - full_ref).abs().max().item() <= 1e-5


def test_variant_fields_match_transformers(tmp_path):
    """norm_topk_prob = true, a dense layer among sparse ones (mlp_only_layers), top-1 routing."""
    hf, path = make_hf_moe_model(tmp_path, layers=3, experts=4, top_k=1, norm_topk_prob=True, mlp_only_layers=(1,))
    ours = load_hf_model(path).eval()
    assert type(ours.layers["1"].mlp).__name__ == "MLP"
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_no_token_dropping_output_independent_of_batch(moe):
    """No capacity limit: a sequence's logits do not depend on what else is in its batch."""
    _, _, ours = moe
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        batch = ours(ids)
        alone = ours(ids[2:3])
    assert (batch[2] - alone[0]).abs().max().item() <= 1e-5


def test_load_balancing_loss_and_its_gradient_match_transformers(moe):
    hf, path, _ = moe
    ours = load_hf_model(path)  # own copy: gradients are taken
    record_routing(ours)
    ids, mask, pos = _left_padded(seed=7)
    for attention_mask in (mask, None):
        hf.zero_grad()
        ours.zero_grad()
        out = hf(ids, attention_mask=attention_mask, position_ids=pos, output_router_logits=True)
        ours(ids, attention_mask=attention_mask, position_ids=pos)
        aux = load_balancing_loss(ours, attention_mask)
        assert abs(aux.item() - out.aux_loss.item()) <= 1e-6
        out.aux_loss.backward()
        aux.backward()
        for layer in ("0", "1"):
            ref = hf.model.layers[int(layer)].mlp.gate.weight.grad
            assert (ours.layers[layer].mlp.gate.weight.grad - ref).abs().max().item() <= 1e-6
    record_routing(ours, False)
    assert load_balancing_loss(ours) is None


def test_greedy_generation_equals_transformers(moe):
    hf, _, ours = moe
    got, _ = generate(ours, PROMPTS, SamplingParams(max_new_tokens=10))
    assert [g.tokens for g in got] == hf_greedy_left_padded(hf, PROMPTS, 10)


def test_grouped_gemm_equals_expert_loop(moe):
    """The grouped-GEMM path (CUDA's) and the loop give the same outputs and gradients (on CPU where torch has a
    CPU _grouped_mm)."""
    if not qwen2_moe.grouped_mm_available():
        pytest.skip("this torch has no _grouped_mm")
    _, path, _ = moe
    model = load_hf_model(path)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(9))
    results = []
    try:
        for impl in ("loop", "grouped"):
            qwen2_moe.set_expert_impl(impl)
            model.zero_grad()
            out = model(ids)
            out.square().mean().backward()
            results.append((out.detach(), model.layers["0"].mlp.experts.down_proj.weight.grad.clone()))
    except RuntimeError as exc:
        if "grouped" in str(exc).lower() or "not implemented" in str(exc).lower():
            pytest.skip(f"no CPU _grouped_mm in this build: {exc}")
        raise
    finally:
        qwen2_moe.set_expert_impl("auto")
    (out_loop, grad_loop), (out_grouped, grad_grouped) = results
    assert (out_loop - out_grouped).abs().max().item() <= 1e-5
    assert (grad_loop - grad_grouped).abs().max().item() <= 1e-6


def test_unrouted_experts_are_not_computed(moe, monkeypatch):
    """One token routes to top_k experts; the others are never multiplied."""
    _, _, ours = moe
    computed = []
    original = qwen2_moe.grouped_linear

    def spy(x, weight, counts, host_counts):
        computed.append([e for e, n in enumerate(host_counts) if n])
        return original(x, weight, counts, host_counts)

    monkeypatch.setattr(qwen2_moe, "grouped_linear", spy)
    qwen2_moe.set_expert_impl("loop")  # the grouped GEMM gets zero rows for them, checked by its equality test
    try:
        with torch.no_grad():
            ours(torch.tensor([[11]]))
    finally:
        qwen2_moe.set_expert_impl("auto")
    assert computed and all(len(experts) == ours.config.num_experts_per_tok for experts in computed)


def test_hf_write_sharded_streamed_and_read_back(moe, tmp_path):
    from transformers import Qwen2MoeForCausalLM

    hf, path, ours = moe
    out = save_hf_model(ours, tmp_path / "saved", max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").is_file()
    back = Qwen2MoeForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
    # Streamed conversion (one tensor source, per-expert tensors split from the stacked weights) is bitwise.
    streamed = save_hf_from_source(HFSource(out), tmp_path / "streamed", max_shard_bytes=150_000)
    original = load_file(path / "model.safetensors")
    copied = {}
    for name in json.loads((streamed / "model.safetensors.index.json").read_text())["weight_map"].values():
        copied.update(load_file(streamed / name))
    assert original.keys() == copied.keys()
    assert all(torch.equal(original[k], copied[k]) for k in original)
    assert json.loads((streamed / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]


# ---- bad input (deliverable 7) --------------------------------------------------------------------------------------
def test_missing_expert_tensor_is_named(moe, tmp_path):
    _, path, _ = moe
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(QwenlinkError, match=r"'model.layers.1.mlp.experts.5.up_proj.weight' missing"):
        load_hf_model(bad)
    result = run_cli("generate", "--model", str(bad), "--prompt", "hi", "--max-new-tokens", "1")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "experts.5.up_proj.weight" in lines[0] and "Traceback" not in result.stderr


def test_top_k_above_expert_count_is_refused(moe, tmp_path):
    _, path, _ = moe
    bad = tmp_path / "topk"
    bad.mkdir()
    config = json.loads((path / "config.json").read_text())
    config["num_experts_per_tok"] = config["num_experts"] + 1
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    result = run_cli("info", str(bad))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "num_experts_per_tok 9 is above num_experts 8" in lines[0], result.stderr


# ---- sizes (deliverable 6) ------------------------------------------------------------------------------------------
def test_a27b_preset_counts_equal_transformers_and_info_reports_active(capsys):
    """The preset's config builds transformers' 14.3B model; active parameters drop the 56 unrouted experts of each
    layer, and FLOPs per token count only the active matmul parameters."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from qwenlink.commands.info import run_info
    from qwenlink.models.presets import get_preset

    config = get_preset("qwen1.5-moe-a2.7b")
    two_layers = dataclasses.replace(config, num_hidden_layers=2)  # the layers are alike: 2 are enough to compare
    hf_dict = two_layers.to_hf_dict()
    with torch.device("meta"):
        hf = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{k: v for k, v in hf_dict.items()
                                                   if k not in ("architectures", "model_type")}))
    assert two_layers.num_params() == sum(p.numel() for p in hf.parameters())
    assert config.num_params() == 14_315_784_192
    unrouted = 24 * (60 - 4) * 3 * 2048 * 1408
    assert config.num_params(active=True) == config.num_params() - unrouted
    assert config.flops_per_token(8192) == 6.0 * (config.num_params(active=True) - 151936 * 2048) + \
        12.0 * 24 * 2048 * 8192
    assert run_info("qwen1.5-moe-a2.7b") == 0
    out = capsys.readouterr().out
    assert "Qwen2MoeForCausalLM" in out and "parameters: 14.32B" in out and "active parameters per token: 2.69B" in out


def test_legacy_megatron_conversion_and_peft_export_of_moe_refused(moe, tmp_path):
    from qwenlink.checkpoint.convert import ConvertOptions, convert
    from qwenlink.checkpoint.peft import save_peft_adapter
    from qwenlink.models.lora import LoraConfig

    _, path, ours = moe
    # megatron-core naming converts (tests/checkpoint/test_megatron_moe.py); legacy ModelLink naming has no MoE layout.
    with pytest.raises(QwenlinkError, match=r"a mixture-of-experts model \(8 experts\) has no legacy \(ModelLink\)"):
        convert(path, tmp_path / "mg", ConvertOptions(to="megatron-legacy"))
    assert not (tmp_path / "mg").exists()
    state = {"layers.0.mlp.experts.gate_proj.lora_A": torch.zeros(8, 4, 64),
             "layers.0.mlp.experts.gate_proj.lora_B": torch.zeros(8, 32, 4)}
    with pytest.raises(QwenlinkError, match=r"adapters on a mixture of experts' feed-forward"):
        save_peft_adapter(tmp_path / "peft", state, LoraConfig(r=4, target_modules=["gate_proj"]), ours.config)

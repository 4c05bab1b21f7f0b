"""HF/qwenlink -> Megatron (core and legacy naming, any TP/PP/VPP) -> back is bit-identical; placement is Megatron's."""

from __future__ import annotations

import argparse
import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from ckpt_helpers import assert_same_tensors, params, random_model
from qwenlink.checkpoint.hf import read_hf_config, save_hf_model
from qwenlink.checkpoint.megatron import chunk_roles, save_megatron
from qwenlink.checkpoint.megatron_layout import make_layout, padded_vocab_size
from qwenlink.checkpoint.megatron_names import build_chunk
from qwenlink.checkpoint.megatron_read import MegatronSource
from qwenlink.checkpoint.safe_load import safe_torch_load
from qwenlink.checkpoint.sources import ModelSource, model_from_source
from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model

# (GQA or MHA, tied or not, qkv bias or not) rotate through the layouts so every combination meets several of them.
VARIANTS = [dict(kv_heads=4), dict(kv_heads=8, tied=True), dict(kv_heads=4, tied=True, qkv_bias=False),
            dict(kv_heads=8, qkv_bias=False)]
LAYOUTS = [(tp, pp, vpp) for tp, pp, vpp in itertools.product((1, 2, 4), (1, 2, 4), (1, 2))
           if not (vpp > 1 and pp == 1)]
CASES = [(naming, *layout, VARIANTS[i % len(VARIANTS)])
         for i, (naming, layout) in enumerate(itertools.product(("core", "legacy"), LAYOUTS))]


def _roundtrip(model, tmp_path, layout, **kw):
    out = save_megatron(ModelSource(model), tmp_path / "meg", layout, **kw)
    source = MegatronSource(out)
    return source, model_from_source(source)


@pytest.mark.parametrize("naming,tp,pp,vpp,variant", CASES,
                         ids=[f"{c[0]}-tp{c[1]}-pp{c[2]}-vpp{c[3]}-{i % 4}" for i, c in enumerate(CASES)])
def test_roundtrip_bit_identical(tmp_path, naming, tp, pp, vpp, variant):
    model = random_model(**variant)
    layout = make_layout(model.config, tp, pp, vpp)
    source, back = _roundtrip(model, tmp_path, layout, naming=naming)
    assert source.naming == naming and source.layout == layout
    assert back.config == model.config
    assert_same_tensors(params(back), params(model))


@pytest.mark.parametrize("naming,tp,pp,vpp", [("core", 2, 2, 2), ("legacy", 4, 2, 1)])
def test_logits_after_roundtrip_equal(tmp_path, naming, tp, pp, vpp):
    model = random_model(kv_heads=4, seed=3).eval()
    _, back = _roundtrip(model, tmp_path, make_layout(model.config, tp, pp, vpp), naming=naming)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back.eval()(tokens), model(tokens))


def _layer_of(norm: torch.Tensor, model) -> int:
    """Which source layer a tensor came from (every layer's input norm is distinct random data)."""
    hits = [i for i in range(model.config.num_hidden_layers)
            if torch.equal(norm, model.layers[str(i)].input_layernorm.weight)]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("naming", ["core", "legacy"])
def test_virtual_pipeline_placement(tmp_path, naming):
    """8 layers, PP 2, 2 chunks: rank 0 holds layers 0-1 (model0) and 4-5 (model1); rank 1 holds 2-3 and 6-7."""
    model = random_model(layers=8)
    out = save_megatron(ModelSource(model), tmp_path / "m", make_layout(model.config, 1, 2, 2), naming=naming)
    want = {(0, 0): [0, 1], (0, 1): [4, 5], (1, 0): [2, 3], (1, 1): [6, 7]}
    for p in range(2):
        ckpt = safe_torch_load(out / "iter_0000001" / f"mp_rank_00_{p:03d}" / "model_optim_rng.pt")
        assert "model" not in ckpt and {"model0", "model1"} <= set(ckpt)
        for c in range(2):
            chunk = ckpt[f"model{c}"]
            if naming == "core":
                norms = [chunk[f"decoder.layers.{j}.input_layernorm.weight"] for j in range(2)]
                assert "decoder.layers.2.input_layernorm.weight" not in chunk  # local numbering
                assert ("embedding.word_embeddings.weight" in chunk) == ((p, c) == (0, 0))
                assert ("output_layer.weight" in chunk) == ((p, c) == (1, 1))
            else:
                enc = chunk["language_model"]["encoder"]
                norms = [enc[f"layers.{j}.input_norm.weight"] for j in range(2)]
                assert ("embedding" in chunk["language_model"]) == ((p, c) == (0, 0))
                assert ("final_norm.weight" in enc) == ((p, c) == (1, 1))
            assert [_layer_of(n, model) for n in norms] == want[(p, c)]
        assert ckpt["args"].virtual_pipeline_model_parallel_size == 2
        assert ckpt["args"].num_layers_per_virtual_pipeline_stage == 2


def test_num_layer_list_uneven_stages(tmp_path):
    model = random_model(layers=8)
    layout = make_layout(model.config, 2, 3, num_layer_list=[2, 4, 2])
    source, back = _roundtrip(model, tmp_path, layout, naming="legacy")
    assert source.layout.layer_counts == ((2,), (4,), (2,))
    assert source.args.num_layer_list == "2,4,2"
    assert_same_tensors(params(back), params(model))
    with pytest.raises(QwenlinkError, match="sum to num_hidden_layers 8"):
        make_layout(model.config, 1, 2, num_layer_list=[3, 4])


def test_tied_head_copy_where_megatron_expects_it(tmp_path):
    model = random_model(tied=True)
    emb = model.embed_tokens.weight
    for naming, pp in (("legacy", 2), ("core", 2), ("legacy", 1), ("core", 1)):
        out = save_megatron(ModelSource(model), tmp_path / f"{naming}{pp}", make_layout(model.config, 1, pp),
                            naming=naming)
        last = "mp_rank_00" if pp == 1 else "mp_rank_00_001"
        chunk = safe_torch_load(out / "iter_0000001" / last / "model_optim_rng.pt")["model"]
        if naming == "legacy":
            head = chunk.get("word_embeddings_for_head", {}).get("weight")
            assert "output_layer" not in chunk["language_model"]
        else:
            head = chunk.get("output_layer.weight")
        if pp == 1:
            assert head is None
        else:
            assert torch.equal(head[:50], emb) and head.shape[0] == 128  # padded like the embedding


def test_written_args_are_plain_and_load_with_weights_only(tmp_path):
    model = random_model(tied=True)
    out = save_megatron(ModelSource(model), tmp_path / "m", make_layout(model.config, 2, 2, 2), naming="legacy",
                        dtype=torch.bfloat16, iteration=42)
    files = sorted(out.rglob("model_optim_rng.pt"))
    assert len(files) == 4 and (out / "latest_checkpointed_iteration.txt").read_text() == "42"
    for file in files:
        # Only the stdlib Namespace needs admitting: no Megatron (or qwenlink) class is referenced.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(file, weights_only=True)
        assert ckpt["iteration"] == 42 and ckpt["checkpoint_version"] == 3.0

        def plain(v) -> bool:
            if isinstance(v, dict):
                return all(isinstance(k, str) and plain(x) for k, x in v.items())
            if isinstance(v, list):
                return all(plain(x) for x in v)
            return v is None or isinstance(v, (bool, int, float, str, torch.dtype))

        bad = {k: type(v) for k, v in vars(ckpt["args"]).items() if not plain(v)}
        assert not bad
        a = ckpt["args"]
        assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (2, 2)
        assert a.params_dtype == torch.bfloat16 and a.bf16 and a.untie_embeddings_and_output_weights is False
        assert a.padded_vocab_size == padded_vocab_size(50, 128, 2) == 256


def test_release_and_input_iteration(tmp_path):
    model = random_model(layers=2)
    out = save_megatron(ModelSource(model), tmp_path / "m", make_layout(model.config), iteration="release")
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (out / "release" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert safe_torch_load(out / "release" / "mp_rank_00" / "model_optim_rng.pt")["iteration"] == 0
    assert_same_tensors(params(model_from_source(MegatronSource(out))), params(model))
    # An iteration directory can also be given directly, or picked with iteration=.
    assert MegatronSource(out / "release").iteration == "release"
    assert MegatronSource(out, iteration="release").dir.name == "release"


def test_dtype_cast_and_transformer_engine_names(tmp_path):
    model = random_model(layers=2)
    out = save_megatron(ModelSource(model), tmp_path / "te", make_layout(model.config, 2), impl="transformer_engine",
                        dtype=torch.bfloat16)
    chunk = safe_torch_load(out / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt")["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in chunk
    assert "decoder.layers.0.input_layernorm.weight" not in chunk
    back = model_from_source(MegatronSource(out))
    assert_same_tensors(params(back), {k: v.to(torch.bfloat16) for k, v in params(model).items()})


def test_hf_files_roundtrip_through_cli(tmp_path):
    """HF dir -> megatron (TP2 PP2 VPP2) -> HF dir: same safetensors tensors and same config.json."""
    from qwenlink.cli import main

    model = random_model(layers=4, kv_heads=4)
    save_hf_model(model, tmp_path / "hf")
    assert main(["convert", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "meg"), "--to", "megatron",
                 "--tp", "2", "--pp", "2", "--vpp", "2"]) == 0
    assert main(["convert", "--input", str(tmp_path / "meg"), "--output", str(tmp_path / "hf2"), "--to", "hf"]) == 0
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads(
        (tmp_path / "hf2" / "config.json").read_text())
    assert read_hf_config(tmp_path / "hf2") == model.config


def _rank_shapes(config: ModelConfig, tp: int, pp: int, lpvs: int | None, divisible_by: int):
    """Per (pp rank, chunk) the legacy state dict of TP rank 0, planned on the meta device (no memory)."""
    model = build_model(config, device="meta", dtype=torch.bfloat16)
    layout = make_layout(config, tp, pp, layers_per_virtual_stage=lpvs)
    padded = padded_vocab_size(config.vocab_size, divisible_by, tp)
    out = {}
    for p in range(layout.pp):
        for c in range(layout.vpp):
            ranks = chunk_roles(ModelSource(model), layout, p, c, padded_vocab=padded, naming="legacy")
            assert len(ranks) == tp and all(r.keys() == ranks[0].keys() for r in ranks)
            out[(p, c)] = build_chunk(ranks[0], "legacy")
    return layout, out


def test_qwen15_7b_seed_layout_shapes():
    """Qwen1.5-7B at the seed's TP8 PP1 (ModelLink's vocab padding: divisible by 1)."""
    config = get_preset("qwen1.5-7b")
    config.num_hidden_layers = 2
    layout, chunks = _rank_shapes(config, 8, 1, None, 1)
    lm = chunks[(0, 0)]["language_model"]
    assert lm["embedding"]["word_embeddings"]["weight"].shape == (151936 // 8, 4096)
    assert lm["output_layer"]["weight"].shape == (151936 // 8, 4096)
    enc = lm["encoder"]
    assert enc["layers.1.self_attention.query_key_value.weight"].shape == (3 * 4096 // 8, 4096)
    assert enc["layers.1.self_attention.query_key_value.bias"].shape == (3 * 4096 // 8,)
    assert enc["layers.1.self_attention.dense.weight"].shape == (4096, 4096 // 8)
    assert enc["layers.1.mlp.dense_h_to_4h.weight"].shape == (2 * 11008 // 8, 4096)
    assert enc["layers.1.mlp.dense_4h_to_h.weight"].shape == (4096, 11008 // 8)
    assert enc["final_norm.weight"].shape == (4096,)
    assert all(t.dtype == torch.bfloat16 for t in enc.values())


def test_qwen15_32b_seed_layout_shapes():
    """Qwen1.5-32B (GQA, 8 groups) at the seed's TP8 PP4 with 2 layers per virtual stage (16 of its 64 layers)."""
    config = get_preset("qwen1.5-32b")
    config.num_hidden_layers = 16
    layout, chunks = _rank_shapes(config, 8, 4, 2, 1)
    assert layout.vpp == 2 and layout.global_layers(1, 1) == [10, 11]
    for (p, c), chunk in chunks.items():
        lm = chunk["language_model"]
        enc = lm["encoder"]
        assert sorted({k.split(".")[1] for k in enc if k.startswith("layers.")}) == ["0", "1"]
        # 40 query heads + 2 x 8 kv heads of 128, one group per TP rank.
        assert enc["layers.0.self_attention.query_key_value.weight"].shape == ((40 + 16) * 128 // 8, 5120)
        assert enc["layers.0.self_attention.dense.weight"].shape == (5120, 5120 // 8)
        assert enc["layers.0.mlp.dense_h_to_4h.weight"].shape == (2 * 27392 // 8, 5120)
        assert ("embedding" in lm) == ((p, c) == (0, 0))
        assert ("output_layer" in lm) == ((p, c) == (3, 1))
    assert chunks[(0, 0)]["language_model"]["embedding"]["word_embeddings"]["weight"].shape == (152064 // 8, 5120)


def test_qwenlink_checkpoint_roundtrip_and_init_from_megatron(tmp_path):
    """Megatron -> qwenlink DCP -> Megatron -> model; and loading Megatron weights into an allocated model."""
    from qwenlink.checkpoint.convert import ConvertOptions, convert
    from qwenlink.checkpoint.loader import load_into, read_config

    model = random_model(layers=4, tied=True)
    save_megatron(ModelSource(model), tmp_path / "meg", make_layout(model.config, 2, 2), naming="legacy")
    convert(tmp_path / "meg", tmp_path / "q", ConvertOptions(to="qwenlink"), notice=lambda m: None)
    convert(tmp_path / "q", tmp_path / "meg2", ConvertOptions(to="megatron", tp=1, pp=4), notice=lambda m: None)
    assert_same_tensors(params(model_from_source(MegatronSource(tmp_path / "meg2"))), params(model))
    target = build_model(read_config(tmp_path / "meg"), seed=5)
    load_into(target, tmp_path / "meg", notice=lambda m: None)
    assert_same_tensors(params(target), params(model))

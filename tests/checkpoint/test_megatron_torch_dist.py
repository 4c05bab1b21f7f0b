"""Megatron's torch_dist checkpoints against megatron-core itself: what `dist_checkpointing.save` wrote from a GPTModel
reads with that model's (and transformers') logits, and what qwenlink writes `dist_checkpointing.load` accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_helpers import assert_same_tensors, cli_main, params, random_model  # noqa: F401 (fixture)
from common import fixture_dir
from qwenlink.checkpoint.loader import detect_format, load_into, open_source
from qwenlink.checkpoint.megatron_dist import save_torch_dist
from qwenlink.checkpoint.megatron_dist_read import TorchDistSource
from qwenlink.checkpoint.megatron_layout import make_layout
from qwenlink.checkpoint.safe_load import MegatronStandIn
from qwenlink.checkpoint.sources import HFSource, ModelSource, model_from_source
from qwenlink.errors import QwenlinkError
from qwenlink.models.qwen2 import build_model

QWEN = "megatron-core-tiny-qwen2"
TOKENS = [[1, 5, 77, 257, 3, 9, 120, 42], [7, 0, 19, 200, 4, 33, 2, 11]]


def _mcore(tmp_path: Path, mode: str, directory: Path, model: dict, **extra) -> torch.Tensor:
    """Run megatron-core (mcore_gpt.py) in a child process; its logits for TOKENS."""
    logits = tmp_path / f"{mode}-logits.pt"
    spec = dict(mode=mode, dir=str(directory), model=model, tokens=TOKENS, logits=str(logits), **extra)
    spec_file = tmp_path / f"{mode}-spec.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("mcore_gpt.py")), str(spec_file)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(logits, weights_only=True)


def _shape_of(cfg, padded: int) -> dict:
    return dict(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                groups=cfg.num_key_value_heads, ffn=cfg.intermediate_size, qkv_bias=cfg.qkv_bias,
                tied=cfg.tie_word_embeddings, eps=cfg.rms_norm_eps, theta=cfg.rope_theta, padded_vocab=padded)


def test_fixture_reads_as_the_hf_model():
    """megatron-core 0.16.1's save of the fixture model: every tensor equals the HF original, bit for bit."""
    root = fixture_dir(QWEN, "mcore-torch-dist-tp1")
    assert detect_format(root) == "megatron" and detect_format(root / "iter_0000001") == "megatron"
    meg, hf = open_source(root), HFSource(fixture_dir(QWEN, "hf"))
    assert isinstance(meg, TorchDistSource) and meg.padded_vocab == 384 and meg.config.vocab_size == 258
    assert isinstance(meg.args.model_type, MegatronStandIn)  # common.pt went through the allow-list
    for name in hf._shapes:
        a, b = meg.get(name), hf.get(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_fixture_to_hf_gives_transformers_logits(tmp_path, cli_main):
    from transformers import AutoModelForCausalLM

    hf_dir = fixture_dir(QWEN, "hf")
    rc, _, err = cli_main("convert", "--input", fixture_dir(QWEN, "mcore-torch-dist-tp1"), "--output",
                          tmp_path / "hf", "--to", "hf", "--config-from", hf_dir)
    assert rc == 0, err
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(tokens).logits
        ref = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(tokens).logits
    assert torch.equal(ours, ref)


def test_megatron_core_save_converts_to_hf_with_its_logits(tmp_path, cli_main):
    """A fresh GPTModel (GQA, qkv bias, untied, every tensor random) saved by dist_checkpointing.save -> qwenlink
    convert --to hf -> transformers gives megatron-core's logits; `model.init_from`'s load_into reads it too."""
    from transformers import AutoModelForCausalLM

    shape = dict(layers=3, hidden=64, heads=4, groups=2, ffn=96, qkv_bias=True, tied=False, eps=1e-6, theta=10000.0,
                 padded_vocab=384)
    args = dict(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                group_query_attention=True, kv_channels=16, padded_vocab_size=384, vocab_size=300,
                add_qkv_bias=True, add_bias_linear=False, swiglu=True, normalization="RMSNorm", norm_epsilon=1e-6,
                position_embedding_type="rope", rotary_base=10000, untie_embeddings_and_output_weights=True,
                max_position_embeddings=128, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                ckpt_format="torch_dist")
    saved = tmp_path / "mcore"
    want = _mcore(tmp_path, "save", saved, shape, seed=3, args=args)
    rc, _, err = cli_main("convert", "--input", saved, "--output", tmp_path / "hf", "--to", "hf")
    assert rc == 0, err
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(torch.tensor(TOKENS)).logits
    assert got.shape[-1] == 300
    assert torch.allclose(got, want[..., :300], atol=1e-4, rtol=1e-4), (got - want[..., :300]).abs().max()
    source = open_source(saved)
    model = build_model(source.config, init=False)
    model.to_empty(device="cpu")
    load_into(model, saved)
    assert_same_tensors(params(model), params(model_from_source(source)))


@pytest.mark.parametrize("variant", [dict(kv_heads=2, qkv_bias=True), dict(kv_heads=4, tied=True, qkv_bias=False)],
                         ids=["gqa-bias-untied", "mha-tied"])
def test_qwenlink_output_loads_in_megatron_core_with_the_same_logits(tmp_path, cli_main, variant):
    model = random_model(layers=3, heads=4, hidden=64, ffn=96, vocab=260, seed=5, **variant)
    for p in model.parameters():
        p.data.mul_(0.5)
    out = save_torch_dist(ModelSource(model), tmp_path / "dist", make_layout(model.config, 2, 3))
    files = sorted(p.name for p in (out / "iter_0000001").iterdir())
    assert files == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "1"
    meg = _mcore(tmp_path, "load", out, _shape_of(model.config, 512))  # padded to 128 x TP 2
    with torch.no_grad():
        ours = model.eval()(torch.tensor(TOKENS))
    assert torch.allclose(meg[..., :260], ours, atol=1e-4, rtol=1e-4), (meg[..., :260] - ours).abs().max()
    back = open_source(out)
    assert back.saved_layout == (2, 3) and back.config == model.config
    assert_same_tensors(params(model_from_source(back)), params(model))


def test_cli_writes_torch_dist_and_refuses_legacy(tmp_path, cli_main):
    hf_dir = fixture_dir(QWEN, "hf")
    rc, _, err = cli_main("convert", "--input", hf_dir, "--output", tmp_path / "d", "--to", "megatron",
                          "--format", "torch_dist", "--dtype", "bf16")
    assert rc == 0, err
    source = open_source(tmp_path / "d")
    assert source.get("embed_tokens.weight").dtype == torch.bfloat16
    assert torch.equal(source.get("layers.1.mlp.up_proj.weight"),
                       HFSource(hf_dir).get("layers.1.mlp.up_proj.weight").to(torch.bfloat16))
    rc, _, err = cli_main("convert", "--input", hf_dir, "--output", tmp_path / "l", "--to", "megatron-legacy",
                          "--format", "torch_dist")
    assert rc == 2 and "use --to megatron" in err and not (tmp_path / "l").exists()
    rc, _, err = cli_main("convert", "--input", hf_dir, "--output", tmp_path / "h", "--to", "hf", "--format",
                          "torch_dist")
    assert rc == 2 and "Megatron output only" in err


def _copy_fixture(tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "dist"
    shutil.copytree(fixture_dir(QWEN, "mcore-torch-dist-tp1"), root)
    return root


def test_bad_inputs_are_one_line(tmp_path, cli_main):
    root = _copy_fixture(tmp_path)
    (root / "iter_0000001" / "__0_1.distcp").write_bytes(b"")  # truncated: half the tensors lost
    rc, _, err = cli_main("convert", "--input", root, "--output", tmp_path / "out", "--to", "hf")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "cannot read tensor" in err and not (tmp_path / "out").exists()

    root = _copy_fixture(tmp_path / "b")
    torch.save({"iteration": 1, "checkpoint_version": 3.0}, root / "iter_0000001" / "common.pt")
    with pytest.raises(QwenlinkError, match=r"common\.pt: no 'args' entry"):
        open_source(root)


def test_metadata_pickle_stays_on_the_allow_list(tmp_path):
    """A `.metadata` that names any other global is refused before anything runs."""
    import os
    import pickle

    root = _copy_fixture(tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (root / "iter_0000001" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(QwenlinkError, match=r"\.metadata: refused to load checkpoint metadata: disallowed global"):
        open_source(root)
    assert not marker.exists()

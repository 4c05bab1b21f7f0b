"""HF checkpoint directories: bit-identical round trips, sharded files, streaming loads, transformers compatibility."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_helpers import make_hf_model
from qwenlink.checkpoint.hf import load_hf_model, read_hf_config, save_hf_model
from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2 import build_model
from qwenlink.tokenizer import Tokenizer


def _all_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_identical(tmp_path, dtype, tied):
    _, src = make_hf_model(tmp_path / "src", tied=tied, dtype=dtype)
    model = load_hf_model(src)
    assert next(model.parameters()).dtype == dtype
    save_hf_model(model, tmp_path / "out")
    before, after = _all_tensors(src), _all_tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype
        assert torch.equal(before[name].view(torch.uint8), after[name].view(torch.uint8)), name
    assert read_hf_config(src) == read_hf_config(tmp_path / "out")


def test_sharded_save_and_load_and_transformers_reads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf, src = make_hf_model(tmp_path / "src")
    model = load_hf_model(src)
    out = save_hf_model(model, tmp_path / "sharded", max_shard_bytes=40_000, tokenizer=Tokenizer.default())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    reloaded = load_hf_model(out)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 320, (2, 8))
    with torch.no_grad():
        assert (theirs(ids).logits - hf(ids).logits).abs().max() <= 1e-6


def test_save_of_a_fresh_model_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = build_model(config, seed=0).eval()
    save_hf_model(model, tmp_path / "m", dtype="bf16")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        ours_bf16 = load_hf_model(tmp_path / "m", dtype="fp32")(ids)
        assert (theirs(ids).logits - ours_bf16).abs().max() <= 1e-5


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    _, src = make_hf_model(tmp_path / "src")
    model = load_hf_model(src)
    import qwenlink.checkpoint.hf as hf_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_module, "save_file", broken)
    with pytest.raises(OSError):
        save_hf_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_load_streams_tensor_by_tensor(tmp_path):
    """Peak anonymous memory while loading stays near one model's size, not model + checkpoint."""
    config = ModelConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8)
    save_hf_model(build_model(config, seed=0), tmp_path / "m")
    small = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2)
    save_hf_model(build_model(small, seed=0), tmp_path / "warmup")
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    script = textwrap.dedent(f"""
        import threading, time
        from qwenlink.checkpoint.hf import load_hf_model
        def anon():
            for line in open('/proc/self/status'):
                if line.startswith('RssAnon:'):
                    return int(line.split()[1]) * 1024
        load_hf_model({str(tmp_path / 'warmup')!r})  # first-use allocations of torch/safetensors are not the load's
        base = anon(); peak = [base]; done = [False]
        def watch():
            while not done[0]:
                peak[0] = max(peak[0], anon()); time.sleep(0.002)
        t = threading.Thread(target=watch); t.start()
        model = load_hf_model({str(tmp_path / 'm')!r})
        done[0] = True; t.join()
        peak[0] = max(peak[0], anon())
        print(peak[0] - base)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.strip().splitlines()[-1])
    assert growth < 1.25 * size, f"loading a {size / 1e6:.0f} MB checkpoint grew anonymous memory by {growth / 1e6:.0f} MB"


def test_misshaped_and_missing_tensors_are_named(tmp_path):
    _, src = make_hf_model(tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(QwenlinkError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\[7, 64\].*\[160, 64\]"):
        load_hf_model(src)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(QwenlinkError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_hf_model(src)


def test_safetensors_metadata_dtype_kept(tmp_path):
    _, src = make_hf_model(tmp_path / "src", dtype=torch.bfloat16)
    save_hf_model(load_hf_model(src), tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"

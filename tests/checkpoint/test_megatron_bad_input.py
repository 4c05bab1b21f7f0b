"""Bad Megatron inputs get one line naming the file / rank / tensor, from the library and from the CLI."""

from __future__ import annotations

import argparse
import os
import shutil

import pytest
import torch

from ckpt_helpers import cli_main, random_model  # noqa: F401 (cli_main is a fixture)
from common import fixture_dir
from qwenlink.checkpoint.megatron import save_megatron
from qwenlink.checkpoint.megatron_layout import make_layout
from qwenlink.checkpoint.megatron_read import MegatronSource
from qwenlink.checkpoint.safe_load import safe_torch_load
from qwenlink.checkpoint.sources import ModelSource
from qwenlink.errors import QwenlinkError

REL = "iter_0000001/{}/model_optim_rng.pt"


@pytest.fixture
def tp2(tmp_path):
    """A writable copy of Megatron's TP2 fixture."""
    dst = tmp_path / "tp2"
    shutil.copytree(fixture_dir("megatron-core-tiny-qwen2", "mcore-tp2"), dst)
    for root, dirs, files in os.walk(dst):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
    os.chmod(dst, 0o755)
    return dst


def _rewrite(path, edit) -> None:
    """Load a rank file, edit it, save it back (args keep their stand-ins out: replaced by a plain Namespace)."""
    ckpt = safe_torch_load(path, mmap=False)
    ckpt["args"] = argparse.Namespace(**{k: v for k, v in vars(ckpt["args"]).items()
                                         if k not in ("model_type", "attention_backend")})
    edit(ckpt)
    torch.save(ckpt, path)


def test_missing_tracker_names_the_file_and_input_iteration_picks_one(tp2):
    (tp2 / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(QwenlinkError, match=r"latest_checkpointed_iteration.txt: missing.*iter_0000001"):
        MegatronSource(tp2)
    assert MegatronSource(tp2, iteration=1).layout.tp == 2


def test_tracker_naming_a_missing_iteration(tp2):
    (tp2 / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(QwenlinkError, match="iter_0000007: iteration directory missing"):
        MegatronSource(tp2)


def test_missing_rank_dir_is_named(tp2):
    shutil.rmtree(tp2 / "iter_0000001" / "mp_rank_01")
    with pytest.raises(QwenlinkError, match=r"mp_rank_01: missing \(tensor rank 1"):
        MegatronSource(tp2)


def test_missing_pipeline_rank_is_named(tmp_path):
    model = random_model(layers=4)
    out = save_megatron(ModelSource(model), tmp_path / "m", make_layout(model.config, 2, 2))
    shutil.rmtree(out / "iter_0000001" / "mp_rank_00_001")
    with pytest.raises(QwenlinkError, match=r"mp_rank_00_001: missing \(tensor rank 0, pipeline rank 1"):
        MegatronSource(out)


def test_inconsistent_tp_shard_shapes(tp2):
    key = "decoder.layers.1.mlp.linear_fc1.weight"
    _rewrite(tp2 / REL.format("mp_rank_01"), lambda ck: ck["model"].__setitem__(key, ck["model"][key][:64]))
    with pytest.raises(QwenlinkError, match=rf"mp_rank_01/model_optim_rng.pt: inconsistent TP shards: {key} has "
                                            r"shape \[64, 64\] but \[128, 64\]"):
        MegatronSource(tp2)


def test_inconsistent_replicated_tensor(tp2):
    key = "decoder.layers.0.input_layernorm.weight"
    _rewrite(tp2 / REL.format("mp_rank_01"), lambda ck: ck["model"][key].mul_(2))
    source = MegatronSource(tp2)
    with pytest.raises(QwenlinkError, match=f"mp_rank_01.*replicated tensor {key} differs"):
        source.get("layers.0.input_layernorm.weight")


def test_args_disagreeing_with_tensors(tp2):
    def groups(ck):
        ck["args"].num_query_groups = 4  # the tensors hold 2 groups

    for rank in ("mp_rank_00", "mp_rank_01"):
        _rewrite(tp2 / REL.format(rank), groups)
    with pytest.raises(QwenlinkError, match=r"mp_rank_00/model_optim_rng.pt: tensor decoder.layers.0.self_attention."
                                            r"linear_qkv.weight has shape \[64, 64\], expected \[96, 64\]"):
        MegatronSource(tp2)
    _rewrite(tp2 / REL.format("mp_rank_00"), lambda ck: setattr(ck["args"], "num_layers", 3))
    with pytest.raises(QwenlinkError, match="args.num_layers is 3 but the tensors hold 2"):
        MegatronSource(tp2)


def test_args_tp_size_disagreeing_with_rank_dirs(tp2):
    _rewrite(tp2 / REL.format("mp_rank_00"), lambda ck: setattr(ck["args"], "tensor_model_parallel_size", 4))
    with pytest.raises(QwenlinkError, match=r"mp_rank_02: missing .*args say TP 4"):
        MegatronSource(tp2)


def test_unexpected_tensor_is_named(tp2):
    key = "decoder.layers.0.self_attention.linear_proj.bias"
    for rank in ("mp_rank_00", "mp_rank_01"):
        _rewrite(tp2 / REL.format(rank), lambda ck: ck["model"].__setitem__(key, torch.zeros(64)))
    with pytest.raises(QwenlinkError, match=f"unexpected tensor '{key}'"):
        MegatronSource(tp2)


def test_malicious_rank_file_refused_through_the_cli(tp2, tmp_path, cli_main):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    _rewrite(tp2 / REL.format("mp_rank_01"), lambda ck: ck.__setitem__("args", Payload()))
    rc, out, err = cli_main("convert", "--input", tp2, "--output", tmp_path / "out", "--to", "hf")
    assert rc == 2 and not marker.exists() and not (tmp_path / "out").exists()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "mp_rank_01/model_optim_rng.pt: refused to load pickle: disallowed global 'posix.system'" in err


@pytest.mark.parametrize("case,args,message", [
    ("unknown", [], "unknown checkpoint format"),
    ("torch_dist", [], "torch_dist (distributed) Megatron checkpoint"),
    ("tp3", ["--to", "megatron", "--tp", "3"], "--tp 3 does not divide num_attention_heads 4"),
    ("pp3", ["--to", "megatron", "--pp", "3"], "--pp 3 does not divide num_hidden_layers 2"),
    ("exists", [], "already exists and is not empty"),
    ("tp-for-hf", ["--to", "hf", "--tp", "2"], "apply to Megatron output only"),
    ("iteration", ["--to", "megatron", "--iteration", "last"], "expected an iteration number or 'release'"),
])
def test_cli_errors_are_one_line(tmp_path, cli_main, case, args, message):
    src = fixture_dir("megatron-core-tiny-qwen2", "hf")
    out = tmp_path / "out"
    if case == "unknown":
        src = tmp_path / "empty"
        src.mkdir()
        (src / "notes.txt").write_text("hi")
    elif case == "torch_dist":
        src = tmp_path / "dist"
        (src / "iter_0000001").mkdir(parents=True)
        (src / "iter_0000001" / "__0_0.distcp").write_bytes(b"")
        (src / "latest_checkpointed_iteration.txt").write_text("1")
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    full = ["convert", "--input", src, "--output", out] + (args if "--to" in args else ["--to", "hf"] + args)
    rc, _, err = cli_main(*full)
    assert rc == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine" if case == "exists" else not out.exists()

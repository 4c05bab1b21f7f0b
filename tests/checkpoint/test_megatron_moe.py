"""Qwen1.5-MoE <-> megatron-core MoE checkpoints: megatron-core's own MoE GPTModel loads qwenlink's output and gives
transformers' logits; HF -> Megatron (any TP/PP/EP) -> HF is bit-identical; bad MoE checkpoints are one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_helpers import assert_same_tensors, cli_main, params  # noqa: F401 (cli_main is a fixture)
from moe_helpers import VOCAB, make_hf_moe_model
from qwenlink.checkpoint.hf import read_hf_config
from qwenlink.checkpoint.loader import load_into, open_source
from qwenlink.checkpoint.megatron import save_megatron
from qwenlink.checkpoint.megatron_layout import make_layout
from qwenlink.checkpoint.megatron_read import MegatronSource
from qwenlink.checkpoint.safe_load import safe_torch_load
from qwenlink.checkpoint.sources import ModelSource, model_from_source
from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig
from qwenlink.models.qwen2 import build_model

TOKENS = [[1, 5, 77, 257, 3, 9, 120, 42, 300, 18], [7, 0, 19, 200, 4, 33, 2, 11, 64, 319]]
EXPERT = "decoder.layers.{j}.mlp.experts.local_experts.{i}.linear_fc{k}.weight"


def _hf_logits(hf) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor(TOKENS)).logits


def _rope_theta(hf_config) -> float:
    """transformers 5 keeps rope_theta in rope_parameters; older versions as an attribute."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def _megatron_core_logits(tmp_path: Path, directory: Path, hf_config, padded: int, tp: int = 1,
                          ep: int = 1) -> list[torch.Tensor]:
    """megatron-core's MoE GPTModel at TP x EP (mcore_moe_gpt.py, one child process per rank) loaded with the rank
    files of `directory`; each rank's logits for TOKENS."""
    model = dict(layers=hf_config.num_hidden_layers, hidden=hf_config.hidden_size,
                 heads=hf_config.num_attention_heads, groups=hf_config.num_key_value_heads,
                 ffn=hf_config.intermediate_size, eps=hf_config.rms_norm_eps, theta=_rope_theta(hf_config),
                 experts=hf_config.num_experts, top_k=hf_config.num_experts_per_tok,
                 moe_ffn=hf_config.moe_intermediate_size, shared_ffn=hf_config.shared_expert_intermediate_size,
                 pre_softmax=not hf_config.norm_topk_prob, padded_vocab=padded)
    logits = tmp_path / "mcore-logits.pt"
    spec_file = tmp_path / "mcore-spec.json"
    spec_file.write_text(json.dumps(dict(dir=str(directory), tp=tp, ep=ep, model=model, tokens=TOKENS,
                                         logits=str(logits))))
    with socket.socket() as s:  # a free port for the ranks' gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = tp * ep
    logs = [tmp_path / f"mcore-rank{r}.log" for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as log:  # files, not pipes: a rank blocked on a full pipe would hang the others
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("mcore_moe_gpt.py")), str(spec_file)],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": str(world),
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}))
    for proc in procs:
        try:
            proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            proc.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(log.read_text()[-2000:] for log in logs)
    return [torch.load(f"{logits}.{r}", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("tp,ep,norm_topk_prob", [(1, 1, False), (1, 1, True), (2, 2, False)],
                         ids=["qwen1.5-moe-routing", "renormalised-top-k", "tp2-ep2"])
def test_megatron_core_moe_model_gives_transformers_logits(tmp_path, cli_main, tp, ep, norm_topk_prob):
    """transformers' Qwen2MoeForCausalLM -> `qwenlink convert --to megatron` -> megatron-core's own GPTModel (MoE
    local spec, SequentialMLP, gated shared expert; load_state_dict strict) computes the same logits in fp32: in one
    process from mp_rank_00, and at TP 2 x EP 2 in four gloo processes each loading its own mp_rank_TT_EEE file.
    Qwen1.5-MoE routes without renormalising (norm_topk_prob false = moe_router_pre_softmax); the other case checks
    that args carry the routing, not a constant."""
    hf, hf_dir = make_hf_moe_model(tmp_path / "hf", hidden=64, layers=3, heads=4, kv_heads=2, experts=8, top_k=2,
                                   moe_ffn=32, shared_ffn=48, ffn=96, norm_topk_prob=norm_topk_prob, seed=4)
    rc, _, err = cli_main("convert", "--input", hf_dir, "--output", tmp_path / "meg", "--to", "megatron",
                          "--tp", tp, "--ep", ep)
    assert rc == 0, err
    first = "mp_rank_00" if ep == 1 else "mp_rank_00_000"
    args = safe_torch_load(tmp_path / "meg" / "iter_0000001" / first / "model_optim_rng.pt")["args"]
    assert (args.num_experts, args.moe_router_topk, args.moe_router_pre_softmax, args.moe_shared_expert_gate) == \
        (8, 2, not norm_topk_prob, True)
    assert (args.tensor_model_parallel_size, args.expert_model_parallel_size) == (tp, ep)
    want = _hf_logits(hf)
    for got in _megatron_core_logits(tmp_path, tmp_path / "meg", hf.config, args.padded_vocab_size, tp, ep):
        assert got.shape[-1] == args.padded_vocab_size == (384 if tp == 1 else 512)  # 320 padded to 128 x TP
        torch.testing.assert_close(got[..., :VOCAB], want, atol=1e-5, rtol=1e-5)


@pytest.fixture
def moe_hf(tmp_path, capsys):
    made = make_hf_moe_model(tmp_path / "hf", hidden=32, layers=4, heads=4, kv_heads=2, experts=8, top_k=2,
                             moe_ffn=16, shared_ffn=24, ffn=48, mlp_only_layers=(2,), seed=1)
    capsys.readouterr()  # transformers' progress bar is not the command's output
    return made


def test_cli_roundtrip_tp2_pp2_ep2_bitwise(tmp_path, cli_main, moe_hf):
    """HF -> Megatron at TP 2 x PP 2 x EP 2 (mp_rank_TT_PPP_EEE) -> HF: every tensor and the model config (with
    its dense layer, mlp_only_layers [2]) come back."""
    _, hf_dir = moe_hf
    meg = tmp_path / "meg"
    rc, _, err = cli_main("convert", "--input", hf_dir, "--output", meg, "--to", "megatron", "--tp", 2, "--pp", 2,
                          "--ep", 2)
    assert rc == 0, err
    ranks = sorted(p.name for p in (meg / "iter_0000001").iterdir())
    assert ranks == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    rc, _, err = cli_main("convert", "--input", meg, "--output", tmp_path / "back", "--to", "hf")
    assert rc == 0, err
    want, got = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert_same_tensors(got, want)
    assert read_hf_config(tmp_path / "back") == read_hf_config(hf_dir)
    # `model.init_from` reads the same directory into a model built empty (the loader's path, not convert's).
    source = open_source(meg)
    model = build_model(source.config, init=False)
    model.to_empty(device="cpu")
    load_into(model, meg)
    assert_same_tensors(params(model), params(model_from_source(source)))


def _random_moe(**kw) -> tuple:
    shape = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, model_type="qwen2_moe",
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)
    cfg = ModelConfig(**(shape | kw))
    model = build_model(cfg, dtype=torch.float32, seed=0)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return cfg, model


@pytest.mark.parametrize("tp,pp,vpp,ep,kw,impl", [(1, 1, None, 2, {}, "local"),
                                                   (2, 1, None, 4, dict(decoder_sparse_step=2), "local"),
                                                   (1, 2, 2, 8, dict(mlp_only_layers=[0]), "local"),
                                                   (2, 4, None, 1, {}, "local"),
                                                   (2, 2, None, 2, dict(mlp_only_layers=[1]), "transformer_engine")])
def test_roundtrip_layouts_bitwise(tmp_path, tp, pp, vpp, ep, kw, impl):
    """Expert-parallel splits with TP, PP and virtual stages, dense layers among sparse ones, both norm namings."""
    cfg, model = _random_moe(**kw)
    out = save_megatron(ModelSource(model), tmp_path / "m", make_layout(cfg, tp, pp, vpp, ep=ep), impl=impl)
    source = MegatronSource(out)
    assert source.layout.ep == ep and source.config == cfg
    assert_same_tensors(params(model_from_source(source)), params(model))


def test_expert_placement_is_megatrons(tmp_path):
    """EP 2, PP 1: mp_rank_TT_EEE; expert rank 1's local_experts.i is expert 4 + i, fc1 = [gate; up] per TP rank,
    fc2 split on its input dimension; router and shared-expert gate replicated; args say EP 2."""
    cfg, model = _random_moe()
    out = save_megatron(ModelSource(model), tmp_path / "m", make_layout(cfg, 2, 1, ep=2))
    assert sorted(p.name for p in (out / "iter_0000001").iterdir()) == \
        ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    mlp = model.layers["1"].mlp
    for t in range(2):
        ckpt = safe_torch_load(out / "iter_0000001" / f"mp_rank_{t:02d}_001" / "model_optim_rng.pt")
        chunk, args = ckpt["model"], ckpt["args"]
        assert (args.expert_model_parallel_size, args.num_experts, args.moe_ffn_hidden_size) == (2, 8, 16)
        rows = slice(8 * t, 8 * (t + 1))
        gate_up = torch.cat([mlp.experts.gate_proj.weight[5, rows], mlp.experts.up_proj.weight[5, rows]])
        assert torch.equal(chunk[EXPERT.format(j=1, i=1, k=1)], gate_up)
        assert torch.equal(chunk[EXPERT.format(j=1, i=1, k=2)], mlp.experts.down_proj.weight[5][:, rows])
        assert EXPERT.format(j=1, i=4, k=1) not in chunk
        assert torch.equal(chunk["decoder.layers.1.mlp.router.weight"], mlp.gate.weight)
        assert torch.equal(chunk["decoder.layers.1.mlp.shared_experts.gate_weight"], mlp.shared_expert_gate.weight)
        shared = torch.cat([mlp.shared_expert.gate_proj.weight[12 * t:12 * (t + 1)],
                            mlp.shared_expert.up_proj.weight[12 * t:12 * (t + 1)]])
        assert torch.equal(chunk["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"], shared)


def _one_line(rc: int, err: str) -> None:
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_missing_expert_is_named(tmp_path, cli_main):
    cfg, model = _random_moe()
    out = save_megatron(ModelSource(model), tmp_path / "m", make_layout(cfg, 1, 2, ep=2))
    file = out / "iter_0000001" / "mp_rank_00_001_001" / "model_optim_rng.pt"
    ckpt = torch.load(file, weights_only=False)
    del ckpt["model"][EXPERT.format(j=0, i=3, k=2)]
    torch.save(ckpt, file)
    rc, _, err = cli_main("convert", "--input", out, "--output", tmp_path / "hf", "--to", "hf")
    _one_line(rc, err)
    assert f"{file}: tensor {EXPERT.format(j=0, i=3, k=2)} missing" in err and not (tmp_path / "hf").exists()
    with pytest.raises(QwenlinkError, match=r"mp_rank_00_001_001.*local_experts\.3\.linear_fc2\.weight missing"):
        MegatronSource(out)


def test_bad_expert_parallel_sizes_are_refused(tmp_path, cli_main, moe_hf, tiny_fixture_hf):
    _, hf_dir = moe_hf
    rc, _, err = cli_main("convert", "--input", hf_dir, "--output", tmp_path / "a", "--to", "megatron", "--ep", 3)
    _one_line(rc, err)
    assert "--ep 3 does not divide num_experts 8" in err and not (tmp_path / "a").exists()
    rc, _, err = cli_main("convert", "--input", tiny_fixture_hf, "--output", tmp_path / "b", "--to", "megatron",
                          "--ep", 2)
    _one_line(rc, err)
    assert "mixture-of-experts model only" in err and not (tmp_path / "b").exists()
    rc, _, err = cli_main("convert", "--input", hf_dir, "--output", tmp_path / "c", "--to", "hf", "--ep", 2)
    _one_line(rc, err)
    assert "Megatron output only" in err
    for extra, why in ((["--to", "megatron-legacy"], "no legacy (ModelLink)"),
                       (["--to", "megatron", "--format", "torch_dist"], "torch format only")):
        rc, _, err = cli_main("convert", "--input", hf_dir, "--output", tmp_path / "d", *extra)
        _one_line(rc, err)
        assert why in err and not (tmp_path / "d").exists()


def test_damaged_expert_parallel_checkpoints_are_one_line(tmp_path, cli_main):
    import shutil

    cfg, model = _random_moe()
    out = save_megatron(ModelSource(model), tmp_path / "m", make_layout(cfg, 1, 1, ep=4))
    it = out / "iter_0000001"
    shutil.rmtree(it / "mp_rank_00_002")
    with pytest.raises(QwenlinkError, match=r"mp_rank_00_002: missing \(tensor rank 0, pipeline rank 0, expert rank "
                                            r"2 of TP 1 x PP 1 x EP 4\)"):
        MegatronSource(out)

    out = save_megatron(ModelSource(model), tmp_path / "n", make_layout(cfg, 1, 1, ep=2))
    file = out / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt"
    ckpt = torch.load(file, weights_only=False)
    ckpt["model"][EXPERT.format(j=2, i=4, k=1)] = ckpt["model"][EXPERT.format(j=2, i=0, k=1)]
    torch.save(ckpt, file)
    with pytest.raises(QwenlinkError, match=r"mp_rank_00_001/model_optim_rng.pt: tensor decoder.layers.2.mlp.experts"
                                            r".local_experts.4.linear_fc1.weight is beyond the 4 experts each expert "
                                            r"rank holds \(8 experts over EP 2\)"):
        MegatronSource(out)

    out = save_megatron(ModelSource(model), tmp_path / "g", make_layout(cfg))
    file = out / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    ckpt = torch.load(file, weights_only=False)
    ckpt["model"]["decoder.layers.0.mlp.experts.weight1"] = torch.zeros(32, 8 * 32)
    torch.save(ckpt, file)
    rc, _, err = cli_main("convert", "--input", out, "--output", tmp_path / "hf", "--to", "hf")
    _one_line(rc, err)
    assert "decoder.layers.0.mlp.experts.weight1" in err and "moe_grouped_gemm off" in err


def test_transformer_engine_grouped_gemm_names_read(tmp_path):
    """TEGroupedMLP (Megatron-LM with --moe-grouped-gemm under Transformer Engine) names expert i's weights
    mlp.experts.linear_fc1.weight{i} / linear_fc2.weight{i}, laid out as SequentialMLP's: read bit for bit."""
    import re

    cfg, model = _random_moe()
    out = save_megatron(ModelSource(model), tmp_path / "m", make_layout(cfg, 2, 1, ep=2),
                        impl="transformer_engine")
    for file in out.glob("iter_0000001/*/model_optim_rng.pt"):
        ckpt = torch.load(file, weights_only=False)
        renamed = {}
        for key, value in ckpt["model"].items():
            match = re.match(r"(.*mlp\.experts\.)local_experts\.(\d+)\.linear_fc([12])\.(weight|_extra_state)$", key)
            if match is None:
                renamed[key] = value
            elif match.group(4) == "weight":
                renamed[f"{match.group(1)}linear_fc{match.group(3)}.weight{match.group(2)}"] = value
            else:
                renamed[f"{match.group(1)}linear_fc{match.group(3)}._extra_state"] = None
        assert "decoder.layers.0.mlp.experts.linear_fc1.weight3" in renamed
        ckpt["model"] = renamed
        torch.save(ckpt, file)
    assert_same_tensors(params(model_from_source(MegatronSource(out))), params(model))


def _rewrite_args(out: Path, **changes) -> None:
    """Edit `args` in every rank file (as another writer would have recorded them); None deletes an entry."""
    for file in out.glob("iter_0000001/*/model_optim_rng.pt"):
        ckpt = torch.load(file, weights_only=False)
        for name, value in changes.items():
            if value is None:
                delattr(ckpt["args"], name)
            else:
                setattr(ckpt["args"], name, value)
        torch.save(ckpt, file)


def test_config_from_megatron_args_alone_and_routing_qwen2_moe_lacks_refused(tmp_path):
    """Without qwenlink's own record (a Megatron-LM-written checkpoint) the MoE config comes from the tensors and
    Megatron's MoE args; args asking for routing Qwen2-MoE does not have, or a reference config that disagrees, are
    refused in one line."""
    cfg, model = _random_moe(mlp_only_layers=[1])
    out = save_megatron(ModelSource(model), tmp_path / "m", make_layout(cfg, 2, 2, ep=2))
    _rewrite_args(out, qwenlink_hf_config=None)
    source = MegatronSource(out)
    assert source.config == cfg
    assert_same_tensors(params(model_from_source(source)), params(model))
    other, _ = _random_moe(num_experts_per_tok=3)
    with pytest.raises(QwenlinkError, match=r"reference config: num_experts_per_tok is 3 but the Megatron checkpoint"):
        MegatronSource(out, reference=other)
    _rewrite_args(out, moe_router_score_function="sigmoid")
    with pytest.raises(QwenlinkError, match=r"mp_rank_00_000_000/model_optim_rng.pt: args.moe_router_score_function="
                                            r"'sigmoid' is not supported \(Qwen2-MoE has a softmax router\)"):
        MegatronSource(out)

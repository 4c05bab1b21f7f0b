"""The one loader (checkpoint/loader.py): format detection, configs, models and loading into a built model, for every
format; and the dtype check every reader applies (an integer tensor where a weight belongs is refused)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_helpers import random_model
from common import fixture_dir, run_cli, write_counting_corpus
from qwenlink.checkpoint import dcp
from qwenlink.checkpoint.convert import ConvertOptions, convert
from qwenlink.checkpoint.hf import load_hf_model, read_hf_config, save_hf_model
from qwenlink.checkpoint.loader import detect_format, load_into, load_model, read_config, resolve_config
from qwenlink.checkpoint.lora_run import LORA_FILE
from qwenlink.checkpoint.megatron import save_megatron
from qwenlink.checkpoint.megatron_layout import make_layout
from qwenlink.checkpoint.megatron_read import MegatronSource
from qwenlink.checkpoint.peft import read_peft_adapter
from qwenlink.checkpoint.sources import HFSource, ModelSource
from qwenlink.errors import QwenlinkError
from qwenlink.models.lora import LoraConfig, apply_lora, iter_lora_modules, merge_lora
from qwenlink.models.qwen2 import Qwen2Model, build_model

QWEN = ("megatron-core-tiny-qwen2",)


def _hf() -> Path:
    return fixture_dir(*QWEN, "hf")


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _copy(src: Path, dst: Path) -> Path:
    """A writable copy of a (read-only) fixture."""
    shutil.copytree(src, dst)
    for root, dirs, files in os.walk(dst):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
    os.chmod(dst, 0o755)
    return dst


@pytest.fixture(scope="module")
def qwenlink_ckpt(tmp_path_factory) -> Path:
    """The HF fixture as a weights-only qwenlink checkpoint (what `convert --to qwenlink` writes)."""
    out = tmp_path_factory.mktemp("ql") / "ckpt"
    return convert(_hf(), out, ConvertOptions(to="qwenlink"), notice=lambda m: None)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, Qwen2Model]:
    """A LoRA run's checkpoint as the trainer writes it (adapters only + lora.json naming the base), with non-zero
    adapters, and the model it must load as (the base with those adapters merged)."""
    root = tmp_path_factory.mktemp("lora") / "checkpoints"
    lora = LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    model = apply_lora(load_hf_model(_hf(), dtype=torch.float32), lora)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, module in iter_lora_modules(model):
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.1)
    reference = {"base_model": str(_hf()), "base_dtype": "fp32", "r": 4, "alpha": 8.0, "dropout": 0.0,
                 "use_rslora": False, "target_modules": ["q_proj", "v_proj"], "modules_to_save": []}
    dcp.save_checkpoint(root, 5, model, None, train_state={"step": 5}, job_toml="", keep_last=1,
                        trainable_only=True, extra_files={LORA_FILE: json.dumps(reference)})
    return root, merge_lora(model).eval()


# ---- detection --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parts,fmt", [
    (("hf",), "hf"),
    (("mcore-tp1",), "megatron"),
    (("mcore-tp1-pp2",), "megatron"),
    (("mcore-tp2", "iter_0000001"), "megatron"),  # an iteration directory given directly
])
def test_detect_format_of_fixtures(parts, fmt):
    assert detect_format(fixture_dir(*QWEN, *parts)) == fmt


def test_detect_qwenlink_and_lora_checkpoints(qwenlink_ckpt, lora_run):
    assert detect_format(qwenlink_ckpt) == "qwenlink"
    assert detect_format(qwenlink_ckpt / "step_00000000") == "qwenlink"  # a step directory holds config.json too
    root, _ = lora_run
    assert detect_format(root) == "qwenlink-lora"
    assert detect_format(root / "step_00000005") == "qwenlink-lora"


def test_detect_refuses_what_is_no_checkpoint(tmp_path, qwenlink_ckpt):
    with pytest.raises(QwenlinkError, match=r"nowhere: model directory not found"):
        detect_format(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(QwenlinkError, match=r"file: expected a directory"):
        detect_format(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QwenlinkError, match=r"empty: unknown checkpoint format"):
        detect_format(tmp_path / "empty")
    partial = _copy(qwenlink_ckpt, tmp_path / "partial")
    (partial / "step_00000000" / "COMPLETE").unlink()
    with pytest.raises(QwenlinkError, match=r"partial/step_00000000: qwenlink checkpoint is incomplete \(no COMPLETE "
                                            r"marker: its save was interrupted\)"):
        detect_format(partial)


# ---- configs and models -----------------------------------------------------------------------------------------------
def test_read_config_is_the_same_architecture_in_every_format(qwenlink_ckpt, lora_run):
    want = read_hf_config(_hf())
    for path in (_hf(), qwenlink_ckpt, lora_run[0], fixture_dir(*QWEN, "mcore-tp1-pp2")):
        got = read_config(path)
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "tie_word_embeddings", "qkv_bias"):
            assert getattr(got, field) == getattr(want, field), (path, field)
    assert resolve_config("test-tiny").num_hidden_layers > 0
    with pytest.raises(QwenlinkError, match="model directory not found"):
        resolve_config("./no/such/dir")


@pytest.mark.parametrize("which", ["hf", "qwenlink", "megatron", "lora"])
def test_load_model_gives_the_same_weights_from_every_format(which, qwenlink_ckpt, lora_run):
    reference = load_hf_model(_hf())
    path = {"hf": _hf(), "qwenlink": qwenlink_ckpt, "megatron": fixture_dir(*QWEN, "mcore-tp2"),
            "lora": lora_run[0]}[which]
    loaded = load_model(str(path), dtype=torch.float32)
    assert loaded.tokenizer_dir == (_hf() if which == "hf" else None)
    want = _params(lora_run[1] if which == "lora" else reference)
    got = _params(loaded.model)
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), f"{which}: {name}"


def test_lora_checkpoint_with_a_missing_base_is_refused(tmp_path, lora_run):
    root = _copy(lora_run[0], tmp_path / "ckpt")
    ref_file = root / "step_00000005" / LORA_FILE
    ref = json.loads(ref_file.read_text())
    ref["base_model"] = str(tmp_path / "gone")
    ref_file.write_text(json.dumps(ref))
    with pytest.raises(QwenlinkError, match=r"lora.json: base_model .*gone.* not found"):
        load_model(str(root))


# ---- loading into a built model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mcore-tp1", "mcore-tp2", "mcore-tp1-pp2"])
def test_load_into_a_meta_built_model_and_a_pipeline_stage(name):
    """Megatron weights (any layout) into a model built on meta and materialised, and into a stage with modules
    missing, as the trainer builds them; each holds exactly the HF twin's tensors afterwards."""
    path, reference = fixture_dir(*QWEN, name), _params(load_hf_model(_hf()))
    with torch.device("meta"):
        model = Qwen2Model(read_config(path))
    model = model.to_empty(device="cpu")
    model.tie_weights()
    load_into(model, path, notice=lambda m: None)
    assert all(torch.equal(p, reference[n]) for n, p in _params(model).items())

    with torch.device("meta"):
        stage = Qwen2Model(read_config(path))
    del stage.layers["0"]
    stage.embed_tokens = None  # the last stage of two: layer 1, the final norm and the head
    stage = stage.to_empty(device="cpu")
    load_into(stage, path, notice=lambda m: None)
    got = _params(stage)
    assert sorted(got) == sorted(n for n in reference if not n.startswith(("layers.0.", "embed_tokens")))
    assert all(torch.equal(p, reference[n]) for n, p in got.items())


@pytest.mark.parametrize("fmt", ["hf", "megatron"])
def test_load_into_a_last_stage_whose_tied_head_is_the_embedding(tmp_path, fmt):
    """With tied embeddings the last of two stages holds the head but not the embedding; the head is loaded from the
    embedding (HF files store no head; Megatron's first stage holds the embedding)."""
    model = random_model(layers=2, tied=True)
    path = tmp_path / fmt
    if fmt == "hf":
        save_hf_model(model, path)
    else:
        save_megatron(ModelSource(model), path, make_layout(model.config, 1, 2))
    with torch.device("meta"):
        stage = Qwen2Model(model.config)
    del stage.layers["0"]
    stage.embed_tokens = None
    stage = stage.to_empty(device="cpu")
    load_into(stage, path, notice=lambda m: None)
    assert sorted(_params(stage)) == sorted([n for n in _params(model) if n.startswith("layers.1.")]
                                            + ["lm_head.weight", "norm.weight"])
    assert torch.equal(stage.lm_head.weight, model.embed_tokens.weight)
    assert all(torch.equal(p, _params(model)[n]) for n, p in _params(stage).items() if n != "lm_head.weight")


def test_load_into_checks_shapes_and_refuses_a_lora_run(lora_run):
    small = build_model(dataclasses.replace(read_config(fixture_dir(*QWEN, "mcore-tp1")), intermediate_size=64),
                        init=False)
    with pytest.raises(QwenlinkError, match=r"mcore-tp1: tensor 'layers.0.mlp.gate_proj.weight' has shape "
                                            r"\[128, 64\] in the checkpoint but \[64, 64\] in the model"):
        load_into(small, fixture_dir(*QWEN, "mcore-tp1"), notice=lambda m: None)
    with pytest.raises(QwenlinkError, match=r"is a LoRA run's checkpoint \(adapters only.*--to hf"):
        load_into(build_model(read_hf_config(_hf()), init=False), lora_run[0])


def test_load_into_tensor_parallel_shards_reads_each_ranks_slices(tmp_path):
    """Two processes (gloo): a meta model sharded by the inference TP plan, materialised, loaded from Megatron's TP2
    files; each rank's local shards equal the HF tensors' slices and the sharded logits equal the HF model's."""
    worker = Path(__file__).with_name("load_into_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(worker), str(fixture_dir(*QWEN, "mcore-tp2")), str(_hf()), str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "ok", rank


# ---- dtypes -----------------------------------------------------------------------------------------------------------
def _hf_with_int8_norm(root: Path) -> Path:
    hf = _copy(_hf(), root)
    tensors = load_file(hf / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones_like(tensors["model.norm.weight"], dtype=torch.int8)
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    return hf


INT8_NORM = r"model.safetensors: tensor 'model.norm.weight' is stored as int8, but a model weight must be floating point"


def test_convert_refuses_an_int8_weight_in_one_line(tmp_path):
    """Through the real command line: exit code 2, one line naming the file and tensor, nothing written; and the
    same refusal for every output format."""
    hf = _hf_with_int8_norm(tmp_path / "int8")
    out = tmp_path / "out"
    result = run_cli("convert", "--input", str(hf), "--output", str(out), "--to", "megatron")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{hf}/model.safetensors: tensor 'model.norm.weight' is stored as int8" in lines[0]
    assert not out.exists()
    for to in ("hf", "qwenlink"):
        with pytest.raises(QwenlinkError, match=INT8_NORM):
            convert(hf, tmp_path / to, ConvertOptions(to=to), notice=lambda m: None)
        assert not (tmp_path / to).exists()


def test_loading_refuses_an_int8_weight(tmp_path):
    hf = _hf_with_int8_norm(tmp_path / "int8")
    with pytest.raises(QwenlinkError, match=INT8_NORM):
        load_model(str(hf))
    with pytest.raises(QwenlinkError, match=INT8_NORM):
        load_into(build_model(read_hf_config(hf), init=False), hf)
    with pytest.raises(QwenlinkError, match=INT8_NORM):
        HFSource(hf).get("norm.weight")


def test_megatron_reader_refuses_an_int8_weight(tmp_path):
    class Int8Norm:
        def __init__(self, source) -> None:
            self.source, self.config = source, source.config

        def get(self, name: str) -> torch.Tensor:
            tensor = self.source.get(name)
            return tensor.to(torch.int8) if name == "norm.weight" else tensor

    source = Int8Norm(HFSource(_hf()))
    out = save_megatron(source, tmp_path / "meg", make_layout(source.config, 1, 2))
    with pytest.raises(QwenlinkError, match=r"mp_rank_00_001/model_optim_rng.pt: tensor 'decoder.final_layernorm.weight' "
                                            r"is stored as int8"):
        MegatronSource(out)


def test_qwenlink_checkpoint_reader_refuses_an_int8_weight(tmp_path):
    model = load_hf_model(_hf(), dtype=torch.float32)
    model.norm.weight = torch.nn.Parameter(torch.ones(model.config.hidden_size, dtype=torch.int8),
                                           requires_grad=False)
    dcp.save_checkpoint(tmp_path / "ckpt", 1, model, None, train_state={"step": 1}, job_toml="", keep_last=1)
    with pytest.raises(QwenlinkError, match=r"step_00000001: tensor 'norm.weight' is stored as int8"):
        load_model(str(tmp_path / "ckpt"))


def test_peft_reader_refuses_an_int8_adapter(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "target_modules": ["q_proj"]}))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({key: torch.zeros(4, 64, dtype=torch.int8)}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(QwenlinkError, match=rf"adapter_model.safetensors: tensor '{key}' is stored as int8"):
        read_peft_adapter(adapter, read_hf_config(_hf()))


# ---- the trainer's model.init_from ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_counting_corpus(tmp_path_factory.mktemp("corpus"), 40)  # token ids 10..59: inside the 258 of HF


def _first_loss(corpus: str, out: Path, init_from: Path, *extra: str) -> float:
    from qwenlink.train.config import load_config
    from qwenlink.train.trainer import Trainer

    cfg = load_config(None, [f"--model.init_from={init_from}", f"--data.path={corpus}", "--data.seq_length=16",
                             "--train.micro_batch_size=2", "--train.global_batch_size=4", "--train.train_iters=1",
                             "--train.device=cpu", f"--job.output_dir={out}", "--metrics.tensorboard=false",
                             "--checkpoint.save_final=false", *extra])
    trainer = Trainer(cfg, stream=io.StringIO())
    assert trainer.train() == 0
    return trainer.history[0]["loss"]


@pytest.mark.parametrize("name", ["mcore-tp1", "mcore-tp1-pp2"])
def test_init_from_megatron_gives_the_hf_twins_first_step_loss(tmp_path, corpus, name):
    """Megatron's args record its own rms_norm_eps (1e-5), not HF's (1e-6): set it with model.arch, as a user would,
    and the Megatron checkpoint trains exactly like the HF directory it was converted from."""
    hf_loss = _first_loss(corpus, tmp_path / "hf", _hf())
    megatron = fixture_dir(*QWEN, name)
    assert read_config(megatron).rms_norm_eps == 1e-5
    assert _first_loss(corpus, tmp_path / "meg", megatron, "--model.arch.rms_norm_eps=1e-6") == hf_loss

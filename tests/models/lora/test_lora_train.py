"""LoRA in the trainer: adapter-only checkpoints with a base reference, exact resume, modules_to_save trained and
saved, optimizer state only for trainable parameters, adapter export, bad configs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from common import run_cli, write_counting_corpus
from qwenlink.checkpoint import dcp as ckpt
from qwenlink.checkpoint.hf import load_hf_model, save_hf_model
from qwenlink.checkpoint.loader import load_model
from qwenlink.checkpoint.peft import apply_peft_adapter
from qwenlink.errors import QwenlinkError
from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model
from qwenlink.train.config import load_config
from qwenlink.train.trainer import Trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base HF dir, pretraining data prefix) for the test-tiny architecture."""
    root = tmp_path_factory.mktemp("lora_train")
    base = save_hf_model(build_model(get_preset("test-tiny"), seed=11), root / "base")
    return base, write_counting_corpus(root, 60)


def _config(setup, out: Path, *extra: str):
    base, prefix = setup
    return load_config(None, [
        f"--model.init_from={base}", f"--data.path={prefix}", "--data.seq_length=16", "--train.micro_batch_size=2",
        "--train.global_batch_size=4", "--train.train_iters=4", "--train.device=cpu", "--optim.lr=1e-2",
        "--optim.warmup_iters=1", f"--job.output_dir={out}", "--metrics.tensorboard=false",
        "--metrics.progress=lines", "--lora.enabled=true", "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0.1",
        "--lora.modules_to_save=[\"output_layer\"]", *extra])


def _trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_lora_checkpoint_resume_and_export(setup, tmp_path):
    base_dir = setup[0]
    # one uninterrupted run
    straight = Trainer(_config(setup, tmp_path / "a", f"--lora.export_adapter={tmp_path / 'adapter'}"),
                       stream=io.StringIO())
    assert straight.train() == 0
    # the same run stopped after step 2 and resumed from its checkpoint (dropout RNG included)
    first = Trainer(_config(setup, tmp_path / "b"), stream=io.StringIO())
    first.train(stop_at=2)
    resumed = Trainer(_config(setup, tmp_path / "b"), stream=io.StringIO())
    assert resumed.state.step == 2
    resumed.train()
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[2:]]
    want, got = _trainable(straight), _trainable(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name

    # the checkpoint holds only adapters + lm_head (modules_to_save) and their optimizer state, plus lora.json
    step = ckpt.find_latest(tmp_path / "b" / "checkpoints")
    keys = set(ckpt._dcp().FileSystemReader(str(step)).read_metadata().state_dict_metadata)
    model_keys = {k[len("model."):] for k in keys if k.startswith("model.")}
    assert model_keys == set(want)
    optim_params = {k[len("optimizer.state."):].rsplit(".", 1)[0] for k in keys if k.startswith("optimizer.state.")}
    assert optim_params == set(want)  # exp_avg / exp_avg_sq / step of trainable tensors only
    assert all(k.endswith((".lora_A", ".lora_B", "lm_head.weight")) for k in want)
    assert json.loads((step / "lora.json").read_text())["base_model"] == str(base_dir)

    # the base stayed frozen; lm_head (modules_to_save) and adapters trained
    base = load_hf_model(base_dir)
    params = dict(straight.model.named_parameters())
    for name, p in base.named_parameters():
        if name != "lm_head.weight":
            assert torch.equal(p, params[name]), name
    assert not torch.equal(base.lm_head.weight, params["lm_head.weight"])
    # optimizer state only for trainable parameters
    assert {id(p) for p in straight.optimizer.state} == {id(p) for p in params.values() if p.requires_grad}

    # the exported PEFT adapter reproduces the trained model on the base
    apply_peft_adapter(base, tmp_path / "adapter")
    ids = torch.tensor([[12, 13, 14, 15, 16, 30, 31]])
    straight.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(ids), straight.model(ids), atol=1e-6, rtol=1e-6)

    # resuming with a different rank is refused
    with pytest.raises(QwenlinkError, match="r = 4 but the config has 8"):
        Trainer(_config(setup, tmp_path / "b", "--lora.r=8"), stream=io.StringIO())


def test_lora_checkpoint_is_usable_after_the_run(setup, tmp_path):
    """Without lora.export_adapter at training time: `convert --to peft` writes the same adapter from the checkpoint,
    and the checkpoint loads as a model (generate, eval, convert) as its base with the adapters merged."""
    from safetensors.torch import load_file

    trainer = Trainer(_config(setup, tmp_path / "run", f"--lora.export_adapter={tmp_path / 'exported'}"),
                      stream=io.StringIO())
    assert trainer.train() == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    result = run_cli("convert", "--input", str(checkpoints), "--to", "peft", "--output", str(tmp_path / "later"))
    assert result.returncode == 0, result.stderr
    exported = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    later = load_file(tmp_path / "later" / "adapter_model.safetensors")
    assert exported.keys() == later.keys() and all(torch.equal(exported[k], later[k]) for k in exported)
    assert json.loads((tmp_path / "later" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "exported" / "adapter_config.json").read_text())

    ids = torch.tensor([[12, 13, 14, 15, 16, 30, 31]])
    merged = load_model(str(checkpoints)).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), trainer.model.eval()(ids), atol=1e-5, rtol=1e-5)

    # Refused with one line: a full model is no LoRA checkpoint; a checkpoint whose base has gone.
    result = run_cli("convert", "--input", str(setup[0]), "--to", "peft", "--output", str(tmp_path / "x"))
    assert result.returncode == 2 and "--to peft exports the adapters" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "x").exists()
    step = ckpt.find_latest(checkpoints)
    reference = json.loads((step / "lora.json").read_text())
    (step / "lora.json").write_text(json.dumps({**reference, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(QwenlinkError, match="base_model .*gone.* not found"):
        load_model(str(checkpoints))


def test_lora_optimizer_state_is_a_small_fraction_of_full(setup, tmp_path):
    """A wider model (hidden 256) where LoRA r 8 on all projections is ~2% of the parameters."""
    def state_bytes(trainer: Trainer) -> int:
        trainer.train(stop_at=1)
        return sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)
    prefix = setup[1]
    wide = save_hf_model(build_model(_wide_config(), seed=1), tmp_path / "wide")
    common = [f"--model.init_from={wide}", f"--data.path={prefix}", "--data.seq_length=16",
              "--train.micro_batch_size=2", "--train.global_batch_size=2", "--train.train_iters=1",
              "--train.device=cpu", "--metrics.tensorboard=false", "--metrics.progress=lines",
              "--checkpoint.save_final=false"]
    full = Trainer(load_config(None, common + [f"--job.output_dir={tmp_path / 'f'}"]), stream=io.StringIO())
    lora = Trainer(load_config(None, common + [f"--job.output_dir={tmp_path / 'l'}", "--lora.enabled=true",
                                               "--lora.r=8"]), stream=io.StringIO())
    full_bytes, lora_bytes = state_bytes(full), state_bytes(lora)
    assert 0 < lora_bytes < 0.05 * full_bytes, (lora_bytes, full_bytes)


def _wide_config():
    from dataclasses import replace

    return replace(get_preset("test-tiny"), hidden_size=256, intermediate_size=688, vocab_size=4096,
                   num_attention_heads=8, num_key_value_heads=8)


@pytest.mark.parametrize("extra,message", [
    (["--model.init_from="], "lora.enabled needs model.init_from"),
    (["--lora.r=0"], "lora.r must be a positive integer"),
    (["--lora.target_modules=[\"qkv\"]"], "valid names: q_proj"),
    (["--lora.base_dtype=bf16"], "needs train.dtype"),
    (["--lora.modules_to_save=[\"norm\"]"], "modules_to_save: 'norm'"),
])
def test_bad_lora_config(setup, tmp_path, extra, message):
    with pytest.raises(QwenlinkError, match=message):
        _config(setup, tmp_path, *extra)


def test_bf16_base_is_stored_in_bf16_under_the_precision_policy(setup, tmp_path):
    """lora.base_dtype = bf16 stores the frozen base in bf16 from the start (cast on the meta model, before FSDP2
    shards it: a cast afterwards would leave FSDP2's fp32 shards behind), adapters stay fp32 master weights, and
    the run computes exactly as with an fp32-stored base (the bf16 policy computes the base in bf16 either way)."""
    runs = {}
    for base_dtype in ("fp32", "bf16"):
        t = Trainer(_config(setup, tmp_path / base_dtype, "--train.dtype=bf16", f"--lora.base_dtype={base_dtype}",
                            "--lora.dropout=0.0"), stream=io.StringIO())
        assert t.train() == 0
        runs[base_dtype] = t
    bf16 = runs["bf16"]
    stored = {(p.requires_grad, p.dtype) for p in bf16.model.parameters()}
    assert stored == {(True, torch.float32), (False, torch.bfloat16)}
    shards = bf16.model.layers["0"]._get_fsdp_state()._fsdp_param_group.fsdp_params  # what FSDP2 really keeps
    assert {(f._sharded_param_data.dtype, f.sharded_param.requires_grad) for f in shards} == \
        {(torch.float32, True), (torch.bfloat16, False)}
    assert [r["loss"] for r in bf16.history] == [r["loss"] for r in runs["fp32"].history]

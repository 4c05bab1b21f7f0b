"""The training loop: learning, exact resume, gradient accumulation, failure policy, bad input."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from qwenlink.checkpoint import dcp as ckpt
from qwenlink.errors import QwenlinkError
from qwenlink.train import step as step_mod
from qwenlink.train.loss import model_loss
from qwenlink.train.trainer import Trainer


def quiet(cfg, **kw) -> Trainer:
    return Trainer(cfg, stream=io.StringIO(), **kw)


def test_loss_decreases_when_overfitting(make_config) -> None:
    cfg = make_config("train.train_iters=20", "optim.lr=2e-2", "optim.min_lr=2e-2", "data.seq_length=16")
    t = quiet(cfg)
    assert t.train() == 0
    losses = [r["loss"] for r in t.history]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3, losses


def test_resume_is_bitwise_identical(make_config) -> None:
    straight = quiet(make_config("train.train_iters=10", out="a"))
    straight.train()
    first = quiet(make_config("train.train_iters=10", out="b"))
    first.train(stop_at=5)
    resumed = quiet(make_config("train.train_iters=10", out="b"))
    assert resumed.state.step == 5 and resumed.resumed_from is not None
    resumed.train()
    a = [r["loss"] for r in straight.history]
    b = [r["loss"] for r in first.history] + [r["loss"] for r in resumed.history]
    assert a == b  # every step, bitwise (fp32 on CPU)
    assert [r["grad_norm"] for r in straight.history][5:] == [r["grad_norm"] for r in resumed.history]
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_gradient_accumulation_matches_one_big_batch(make_config) -> None:
    one = quiet(make_config("train.micro_batch_size=1", "train.global_batch_size=4", "train.train_iters=3",
                            "checkpoint.save_final=false", out="a"))
    big = quiet(make_config("train.micro_batch_size=4", "train.global_batch_size=4", "train.train_iters=3",
                            "checkpoint.save_final=false", out="b"))
    assert one.accum == 4 and big.accum == 1
    one.train()
    big.train()
    for r1, r4 in zip(one.history, big.history):
        assert r1["loss"] == pytest.approx(r4["loss"], rel=1e-5)
        assert r1["grad_norm"] == pytest.approx(r4["grad_norm"], rel=1e-4)
    # Adam divides by sqrt(v), which magnifies last-bit differences of tiny gradients: compare to a small
    # fraction of one update (lr 5e-3) instead of bitwise.
    for p, q in zip(one.model.parameters(), big.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5)


def test_accumulated_gradients_equal_big_batch_gradients(make_config) -> None:
    t = quiet(make_config("train.micro_batch_size=4", "train.global_batch_size=4", "checkpoint.save_final=false",
                          "train.loss_chunk_size=5"))
    batch = t.data.next()
    halves = [type(batch)(batch.input_ids[i:i + 1], batch.labels[i:i + 1]) for i in range(4)]
    grads = []
    for parts in ([batch], halves):
        loss = t.step_fn.forward_backward(parts, t.step_fn.count_valid(parts))
        grads.append((loss, [p.grad.clone() for p in t.model.parameters()]))
        t.optimizer.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for g1, g4 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g1, g4, rtol=1e-5, atol=1e-7)


def test_sft_loss_only_on_labels(make_config, sft_prefix: str) -> None:
    cfg = make_config("job.mode=sft", f"data.path={sft_prefix}", "data.seq_length=32", "train.train_iters=2",
                      "data.pad_id=0", "checkpoint.save_final=false")
    t = quiet(cfg)
    batch = t.data.next()
    assert batch.input_ids.shape[1] % 8 == 0
    valid = int((batch.labels != -100).sum())
    assert 0 < valid == 5 * batch.input_ids.shape[0]  # 4 reply tokens + end token per sample, nothing else
    # Right-padded: plain causal attention, no mask tensor - and the same loss and gradients as with the padding mask
    assert batch.attention_mask is None and batch.position_ids is None
    lengths = (batch.input_ids != 0).sum(1)
    mask = (torch.arange(batch.input_ids.shape[1])[None] < lengths[:, None]).long()  # [B, T] 1 = real token
    results = []
    for kwargs in ({}, {"attention_mask": mask}):
        loss, _ = model_loss(t.model, batch.input_ids, batch.labels, scale=1.0, chunk_size=64, **kwargs)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in t.model.parameters()]))
        t.optimizer.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    t.train()
    assert all(math.isfinite(r["loss"]) for r in t.history)


def test_packed_sft_and_activation_checkpointing(make_config, sft_prefix: str) -> None:
    base = ("job.mode=sft", f"data.path={sft_prefix}", "data.seq_length=32", "data.pack=true", "data.pad_id=0",
            "train.train_iters=2", "checkpoint.save_final=false")
    plain = quiet(make_config(*base, out="a"))
    ac = quiet(make_config(*base, "train.activation_checkpoint=full", out="b"))
    plain.train()
    ac.train()
    assert [r["loss"] for r in plain.history] == pytest.approx([r["loss"] for r in ac.history], rel=1e-6)
    assert type(ac.model.layers["0"]).__name__ == "CheckpointWrapper"


def test_nonfinite_loss_is_skipped_counted_and_aborts_without_nan_checkpoint(make_config, monkeypatch) -> None:
    real = step_mod.model_loss
    calls = {"n": 0}
    poisoned_steps = {3}  # one transient NaN step, then from step 6 on every step

    def flaky(model, *args, **kwargs):
        loss, n = real(model, *args, **kwargs)
        calls["n"] += 1
        step = (calls["n"] - 1) // 2 + 1  # two micro batches per step
        if step in poisoned_steps or step >= 6:
            loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(step_mod, "model_loss", flaky)
    cfg = make_config("train.train_iters=20", "train.max_nonfinite_steps=3", "checkpoint.interval=1")
    t = quiet(cfg)
    with pytest.raises(QwenlinkError, match=r"not finite for 3 steps in a row \(steps 6..8.*stopped without saving"):
        t.train()
    assert t.state.skipped_nonfinite == 4
    assert [r["skipped_nonfinite"] for r in t.history][:5] == [0, 0, 1, 1, 1]
    assert t._params_finite()
    latest = ckpt.find_latest(cfg.checkpoint_dir)
    assert latest is not None and latest.name == "step_00000005"  # nothing written after the poison began
    assert not (cfg.checkpoint_dir / "step_00000006").exists()
    # And weights that did turn non-finite are never saved.
    t.state.nonfinite_in_row = 0
    with torch.no_grad():
        next(t.model.parameters())[0, 0] = float("inf")
    assert t.save() is None and ckpt.find_latest(cfg.checkpoint_dir).name == "step_00000005"


def test_checkpoint_without_marker_is_ignored_on_resume(make_config) -> None:
    cfg = make_config("train.train_iters=4", "checkpoint.interval=2", "checkpoint.keep_last=5")
    quiet(cfg).train(stop_at=4)
    step4 = cfg.checkpoint_dir / "step_00000004"
    (step4 / ckpt.COMPLETE).unlink()  # as if the process died before the marker was written
    resumed = quiet(cfg)
    assert resumed.state.step == 2 and resumed.resumed_from.name == "step_00000002"


def test_shape_mismatch_names_the_tensor(make_config) -> None:
    cfg = make_config("train.train_iters=1")
    quiet(cfg).train()
    # allowed config changes still cannot load tensors of another shape (the guard itself: test_resume_guard.py)
    wider = make_config("train.train_iters=2", "model.arch.intermediate_size=96", "checkpoint.allow_config_change=true")
    with pytest.raises(QwenlinkError, match=r"tensor 'layers.0.mlp.gate_proj.weight' has shape \[160, 64\] in the "
                                            r"checkpoint but \[96, 64\] in the model"):
        quiet(wider)


def test_init_from_checkpoint_finetune_starts_fresh(make_config) -> None:
    src = make_config("train.train_iters=3", out="src")
    trained = quiet(src)
    trained.train()
    ft = quiet(make_config("train.train_iters=2", f"model.init_from={src.checkpoint_dir}", "model.preset=",
                           "train.finetune=true", out="ft"))
    assert ft.state.step == 0 and not ft.optimizer.state
    for p, q in zip(trained.model.parameters(), ft.model.parameters()):
        assert torch.equal(p, q)
    cont = quiet(make_config("train.train_iters=5", f"model.init_from={src.checkpoint_dir}", out="cont"))
    assert cont.state.step == 3 and cont.optimizer.state  # Megatron's --load without --finetune


def test_seq_length_above_max_positions(make_config) -> None:
    with pytest.raises(QwenlinkError, match=r"data.seq_length \(1024\) is above the model's "
                                            r"max_position_embeddings \(512\)"):
        quiet(make_config("data.seq_length=1024"))


def test_data_path_without_index_files(make_config, tmp_path: Path) -> None:
    (tmp_path / "only.bin").write_bytes(b"")
    with pytest.raises(QwenlinkError, match=r"only.idx not found; expected an indexed dataset"):
        quiet(make_config(f"data.path={tmp_path / 'only'}"))
    with pytest.raises(QwenlinkError, match=r"for sft give the --output-prefix"):
        quiet(make_config("job.mode=sft", "data.pad_id=0", f"data.path={tmp_path / 'nothing'}"))


def test_export_hf_loads_back(make_config, tmp_path: Path) -> None:
    from qwenlink.checkpoint.hf import load_hf_model

    cfg = make_config("train.train_iters=2", f"checkpoint.export_hf={tmp_path / 'hf'}", "data.tokenizer=default")
    t = quiet(cfg)
    t.train()
    back = load_hf_model(tmp_path / "hf")
    for p, q in zip(t.model.parameters(), back.parameters()):
        assert torch.equal(p, q)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_validation_loss_and_perplexity(make_config, pretrain_prefix: str) -> None:
    cfg = make_config("train.train_iters=4", f"data.valid_path={pretrain_prefix}", "metrics.eval_interval=2",
                      "metrics.eval_iters=2", "checkpoint.save_final=false")
    t = quiet(cfg)
    t.train()
    evaluated = [r for r in t.history if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    for r in evaluated:
        assert math.isfinite(r["val_loss"]) and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert t.model.training  # evaluation put the model back in training mode


def test_bf16_compute_keeps_fp32_master_weights(make_config) -> None:
    fp32 = quiet(make_config("train.train_iters=2", "checkpoint.save_final=false", out="a"))
    bf16 = quiet(make_config("train.train_iters=2", "train.dtype=bf16", "checkpoint.save_final=false", out="b"))
    fp32.train()
    bf16.train()
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in bf16.optimizer.state.values())
    for a, b in zip(fp32.history, bf16.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)


def test_compile_applies_in_one_process(make_config) -> None:
    """parallel.compile = true compiles every decoder block in one process too, and trains like eager."""
    four = "model.arch.num_hidden_layers=4"
    eager = quiet(make_config("train.train_iters=2", "checkpoint.save_final=false", four, out="a"))
    eager.train()
    compiled = quiet(make_config("train.train_iters=2", "checkpoint.save_final=false", "parallel.compile=true", four,
                                 out="b"))
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers.values())
    from torch._dynamo.utils import counters

    counters.clear()
    compiled.train()
    assert [r["loss"] for r in compiled.history] == pytest.approx([r["loss"] for r in eager.history], rel=1e-5)
    # Every block shares its graphs: neither the layer ids nor the steps recompile, and nothing breaks the graph
    # (tests/parallel/test_compile_guards.py holds blocks to one graph, with and without activation checkpointing).
    assert counters["frames"]["total"] == counters["frames"]["ok"] <= 2 < len(compiled.model.layers)


def test_lora_dropout_recomputes_the_same_masks_under_activation_checkpointing(make_config, tmp_path) -> None:
    """Recomputed blocks must draw the forward's dropout masks: the same run with and without checkpointing."""
    from qwenlink.checkpoint.hf import save_hf_model
    from qwenlink.models.presets import get_preset
    from qwenlink.models.qwen2 import build_model

    base = tmp_path / "base"
    save_hf_model(build_model(get_preset("test-tiny"), seed=3), base)
    lora = ["lora.enabled=true", "lora.r=4", "lora.dropout=0.2", f"model.init_from={base}", "model.preset=",
            "train.train_iters=4", "checkpoint.save_final=false", "optim.lr=1e-2"]
    plain = quiet(make_config(*lora, out="plain"))
    plain.train()
    ac = quiet(make_config(*lora, "train.activation_checkpoint=full", out="ac"))
    ac.train()
    assert [r["loss"] for r in ac.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-6)


def test_sft_pad_id_comes_from_the_tokenizer_and_must_fit_the_vocabulary(make_config, tmp_path) -> None:
    """A 258-token model with its own tokenizer: the pad id is the tokenizer's (not Qwen's 151643), and an
    explicit id outside the vocabulary is refused before training, naming the field."""
    import numpy as np

    from common import fixture_dir
    from qwenlink.data.indexed import IndexedDatasetWriter

    hf = fixture_dir("megatron-core-tiny-qwen2", "hf")
    prefix = tmp_path / "small"
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(f"{prefix}_packed_input_ids_document", np.int32) as ids, \
            IndexedDatasetWriter(f"{prefix}_packed_labels_document", np.int32) as labels, \
            IndexedDatasetWriter(f"{prefix}_packed_attention_mask_document", np.int32) as mask:
        for n in rng.integers(3, 14, 16):  # lengths differ, so every micro batch is padded
            sample = rng.integers(2, 250, int(n)).tolist()
            ids.add_document(sample)
            labels.add_document([-100] * (len(sample) // 2) + sample[len(sample) // 2:])
            mask.add_document([1] * len(sample))
    sft = ("job.mode=sft", f"data.path={prefix}", f"data.tokenizer={hf}", f"model.init_from={hf}", "model.preset=",
           "train.train_iters=2", "checkpoint.save_final=false")
    t = quiet(make_config(*sft, out="auto"))
    assert t.cfg.data.pad_id == 1  # the fixture tokenizer's pad token
    t.train()
    assert all(math.isfinite(r["loss"]) for r in t.history)
    with pytest.raises(QwenlinkError, match=r"data.pad_id = 151643 is outside the model's vocabulary of 258"):
        quiet(make_config(*sft, "data.pad_id=151643", out="explicit"))

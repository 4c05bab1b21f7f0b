"""Documents in micro batches: data.reset_attention_mask / reset_position_ids for pretraining and data.pack for SFT
carry a DocumentMask (per-row document ids, O(T)) to the model, never a [B, 1, T, T] tensor."""

from __future__ import annotations

import io
import math

import pytest
import torch

from qwenlink.data.instruction import packed_attention_mask
from qwenlink.errors import QwenlinkError
from qwenlink.models.documents import DocumentMask
from qwenlink.train.config import load_config, parallel_plan
from qwenlink.train.data import collate
from qwenlink.train.loss import model_loss
from qwenlink.train.trainer import Trainer

EOD = 9


def pretrain_cfg(*overrides: str):
    return load_config(None, ["--job.mode=pretrain", "--data.seq_length=8", "--data.path=unused",
                              f"--data.eod_id={EOD}", *[f"--{o}" for o in overrides]])


def samples() -> list[dict]:
    rows = [[5, 6, EOD, 7, 8, EOD, EOD, 4], [1, 2, 3, 4, 5, 6, 7, 8]]
    return [{"input_ids": torch.tensor(r), "labels": torch.tensor(r).roll(-1)} for r in rows]


def test_reset_position_ids_restart_after_each_eod() -> None:
    batch = collate(samples(), pretrain_cfg("data.reset_position_ids=true"))
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 0], list(range(8))]
    assert batch.attention_mask is None  # positions only: attention still crosses documents (as Megatron allows)


def test_reset_attention_mask_carries_documents() -> None:
    batch = collate(samples(), pretrain_cfg("data.reset_attention_mask=true", "data.reset_position_ids=true"))
    docs = batch.attention_mask
    assert isinstance(docs, DocumentMask) and docs.bounds == ((0, 3, 6, 7, 8), (0, 8))
    assert batch.position_ids.tolist()[0] == [0, 1, 2, 0, 1, 2, 0, 0]
    assert collate(samples(), pretrain_cfg()).attention_mask is None  # off by default
    moved = batch.pinned().to(torch.device("cpu")) if torch.cuda.is_available() else batch.to(torch.device("cpu"))
    assert moved.attention_mask.bounds == docs.bounds


def test_packed_sft_collate_equals_the_dense_mask_on_real_tokens() -> None:
    segments = torch.tensor([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    items = [{"input_ids": torch.arange(8), "labels": torch.arange(8), "position_ids": torch.zeros(8, dtype=torch.long),
              "segment_ids": s} for s in segments]
    cfg = load_config(None, ["--job.mode=sft", "--data.pack=true", "--data.seq_length=8", "--data.path=unused"])
    docs = collate(items, cfg).attention_mask
    assert isinstance(docs, DocumentMask)
    real = (segments != 0)[:, None, :, None]  # rows of real tokens: padding rows differ (see DocumentMask)
    assert torch.equal(docs.to_dense() & real, packed_attention_mask(segments) & real)


def test_reset_flags_are_refused_outside_pretraining_and_accepted_under_pp() -> None:
    with pytest.raises(QwenlinkError, match="are for pretraining"):
        load_config(None, ["--job.mode=sft", "--data.path=unused", "--data.reset_attention_mask=true"])
    from qwenlink.models.presets import get_preset

    # Documents reach every pipeline stage (tests/parallel/test_context_parallel.py: cp2 x pp2, pp2 x vpp2 x dp2).
    cfg = pretrain_cfg("data.reset_position_ids=true", "data.reset_attention_mask=true", "parallel.pp=2",
                       "train.global_batch_size=4")
    assert parallel_plan(cfg, 2, get_preset("test-tiny")).pp == 2


def test_trainer_pretrains_with_documents(make_config) -> None:
    """The trainer's batches carry documents; the model's loss on them equals the dense-mask reference; it trains."""
    cfg = make_config("data.reset_attention_mask=true", "data.reset_position_ids=true", "data.eod_id=10",
                      "data.seq_length=96", "train.train_iters=2", "checkpoint.save_final=false")
    trainer = Trainer(cfg, stream=io.StringIO())
    batch = trainer.data.next()
    docs = batch.attention_mask
    assert isinstance(docs, DocumentMask) and any(len(b) > 2 for b in docs.bounds)  # some rows hold several
    losses = [model_loss(trainer.model, batch.input_ids, batch.labels, scale=1.0, chunk_size=64,
                         position_ids=batch.position_ids, attention_mask=mask)[0].item()
              for mask in (docs, docs.to_dense())]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    trainer.train()
    assert len(trainer.history) == 2 and all(math.isfinite(r["loss"]) for r in trainer.history)

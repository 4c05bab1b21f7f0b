"""Learning-rate schedules and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model
from qwenlink.train.config import load_config
from qwenlink.train.optim import Scheduler, build_optimizer, lr_at, param_groups, warmup_iters


def test_warmup_then_cosine_values() -> None:
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, decay_iters=110, style="cosine")
    assert lr_at(1, **kw) == pytest.approx(0.1)          # first update already moves
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)         # peak at the end of warmup
    assert lr_at(60, **kw) == pytest.approx(0.55)        # half way: (lr + min_lr) / 2
    assert lr_at(85, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)        # stays at min_lr after decay


def test_linear_and_constant() -> None:
    assert lr_at(30, lr=1.0, min_lr=0.0, warmup=0, decay_iters=40, style="linear") == pytest.approx(0.25)
    assert lr_at(1, lr=1.0, min_lr=0.0, warmup=0, decay_iters=40, style="linear") == pytest.approx(0.975)
    assert lr_at(39, lr=2.0, min_lr=0.5, warmup=4, decay_iters=40, style="constant") == 2.0
    assert lr_at(2, lr=2.0, min_lr=0.5, warmup=4, decay_iters=40, style="constant") == 1.0


def test_modellink_warmup_fraction() -> None:
    cfg = load_config(None, ["--train.train_iters=2000", "--optim.warmup_fraction=0.01"])
    assert warmup_iters(cfg.optim, cfg.train.train_iters) == 20


def test_scheduler_sets_every_group() -> None:
    model = build_model(get_preset("test-tiny"), seed=0)
    cfg = load_config(None, ["--optim.lr=1e-3", "--optim.min_lr=1e-4", "--optim.warmup_iters=2",
                             "--train.train_iters=10"])
    opt = build_optimizer(model, cfg.optim)
    sched = Scheduler(opt, cfg)
    assert sched.apply(1) == pytest.approx(5e-4)
    assert all(g["lr"] == pytest.approx(5e-4) for g in opt.param_groups)


def test_weight_decay_skips_norms_and_biases_and_counts_tied_once() -> None:
    config = get_preset("test-tiny")
    config.tie_word_embeddings = True
    model = build_model(config, seed=0)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert id(model.layers["0"].self_attn.q_proj.bias) in ids - {id(p) for p in decay["params"]}
    assert id(model.layers["0"].input_layernorm.weight) in {id(p) for p in no_decay["params"]}
    unique = {id(p) for p in model.parameters()}
    assert len(ids) == len(unique) == sum(len(g["params"]) for g in (decay, no_decay))
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == config.num_params()


def test_fused_on_cpu_when_supported() -> None:
    model = build_model(get_preset("test-tiny"), seed=0)
    cfg = load_config(None, [])
    opt = build_optimizer(model, cfg.optim)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    forced = build_optimizer(model, load_config(None, ["--optim.implementation=for-loop"]).optim)
    assert not forced.defaults.get("fused") and forced.defaults.get("foreach") is False
    assert isinstance(opt, torch.optim.AdamW)

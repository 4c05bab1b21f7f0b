"""Per-block compilation compiles one graph for all decoder layers: no recompilation per layer and no graph break,
with and without activation checkpointing. On the H200 (benchmarks/device_check.py, BENCHMARKS.md) the checkpointed
blocks recompiled on every layer until dynamo's limit of 8, the other layers then running eagerly, for two reasons:
the rotary tables, cached on a shared object by the first layer, were a side effect inside checkpointing's traced
region (every torch), and torch 2.11 guards on the checkpointed call's keyword values, so each layer's name was one
(this test fails on 2.11 without that fix; on 2.13, which does not guard so, the layers' arguments are checked)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model
from qwenlink.parallel.parallelize import apply_activation_checkpointing


@pytest.mark.parametrize("mode, preserve_rng_state, positions", [
    ("none", False, False), ("full", False, False), ("full", True, True)])
def test_every_layer_shares_one_graph(mode, preserve_rng_state, positions):
    config = dataclasses.replace(get_preset("test-tiny"), num_hidden_layers=4)
    model = build_model(config, device="cpu", seed=0)
    reference = build_model(config, device="cpu", seed=0)
    apply_activation_checkpointing(model, mode, 1, preserve_rng_state=preserve_rng_state)
    torch._dynamo.reset()
    counters.clear()
    constants = []
    for layer in model.layers.values():  # what a compiled block could guard on: no per-layer constant
        layer.register_forward_pre_hook(
            lambda _, args, kwargs: constants.extend(v for v in (*args, *kwargs.values()) if isinstance(v, str)),
            with_kwargs=True)
    backend = CompileCounter()  # captures graphs, runs them as traced (no inductor: seconds, not minutes)
    for layer in model.layers.values():
        layer.compile(backend=backend)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(16).repeat(2, 1) if positions else None
    for _ in range(2):
        model.zero_grad()
        model(ids, position_ids=position_ids).float().square().mean().backward()
    assert backend.frame_count == 1, f"{backend.frame_count} graphs for {len(model.layers)} identical layers"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not constants, f"decoder layers were given the constants {sorted(set(constants))}"
    reference(ids, position_ids=position_ids).float().square().mean().backward()
    got = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        twin = next(p for n, p in got.items() if n.replace("_checkpoint_wrapped_module.", "")
                    .replace("_orig_mod.", "") == name)
        torch.testing.assert_close(twin.grad, param.grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()

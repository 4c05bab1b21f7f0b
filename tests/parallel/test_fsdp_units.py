"""Which modules FSDP2 gathers and frees as units, built in this process over the one-rank mesh bf16 jobs use."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from qwenlink.models.config import ModelConfig
from qwenlink.parallel.mesh import ParallelPlan
from qwenlink.parallel.parallelize import ParallelizeOptions, build_layout, build_model_chunks


def chunks_for(tied: bool):
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    layout = build_layout(ParallelPlan(), torch.device("cpu"), config, mixed_precision=True)
    return build_model_chunks(config, layout, ParallelizeOptions(param_dtype=torch.bfloat16)).modules[0]


@pytest.mark.parametrize("tied", [False, True])
def test_layers_and_an_untied_embedding_are_units_of_their_own(tied: bool) -> None:
    model = chunks_for(tied)
    assert isinstance(model, FSDPModule)  # the root: final norm and head
    assert all(isinstance(layer, FSDPModule) for layer in model.layers.values())
    # An untied embedding is freed after its lookup; a tied one is the head's weight and stays in the root unit.
    assert isinstance(model.embed_tokens, FSDPModule) is not tied
    assert not isinstance(model.lm_head, FSDPModule) and not isinstance(model.norm, FSDPModule)
    # Master weights fp32, computed in bf16.
    assert all(p.dtype == torch.float32 for p in model.parameters())

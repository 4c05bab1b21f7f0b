"""The shipped LoRA recipes mirror ModelLink's (r 16, alpha 32, query_key_value dense dense_h_to_4h dense_4h_to_h;
32B on TP8, 72B on TP8 x PP2) and resolve to adapters on every projection."""

from __future__ import annotations

import pytest

from common import REPO
from qwenlink.train.config import load_config
from qwenlink.train.lora import lora_of
from qwenlink.train.trainer import resolve_model_config

CONFIGS = REPO / "configs"


@pytest.mark.parametrize("size,tp,pp", [("32b", 8, 1), ("72b", 8, 2)])
def test_lora_recipes(size, tp, pp):
    cfg = load_config(CONFIGS / f"qwen1.5-{size}-lora.toml")
    lora = lora_of(cfg)
    assert lora is not None and (lora.r, lora.alpha, lora.scaling) == (16, 32.0, 2.0)
    assert lora.targets() == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert (cfg.parallel.tp, cfg.parallel.pp) == (tp, pp)
    assert cfg.train.dtype == "bf16" and cfg.lora.base_dtype == "bf16" and cfg.job.mode == "sft"
    config = resolve_model_config(cfg)
    assert config.num_key_value_heads % tp == 0 and config.num_hidden_layers % pp == 0

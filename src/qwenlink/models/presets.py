"""Named model configurations: every Qwen1.5 size with its exact HF config values, plus small ones for tests.

The values are Qwen1.5's published HF configs (shared/reference/modellink-recipes.md): vocab 151936 up to 7B and
152064 from 14B, rope_theta 5e6 only for 4B, grouped-query attention (8 kv heads) only for 32B and 110B, tied
embeddings only for 0.5B.
"""

from __future__ import annotations

import difflib

from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig


def _qwen15(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int, theta: float = 1e6,
            tied: bool = False) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                       rope_theta=theta, rms_norm_eps=1e-6, tie_word_embeddings=tied)


PRESETS: dict[str, ModelConfig] = {
    "qwen1.5-0.5b": _qwen15(1024, 2816, 24, 16, 16, 151936, tied=True),
    "qwen1.5-1.8b": _qwen15(2048, 5504, 24, 16, 16, 151936),
    "qwen1.5-4b": _qwen15(2560, 6912, 40, 20, 20, 151936, theta=5e6),
    "qwen1.5-7b": _qwen15(4096, 11008, 32, 32, 32, 151936),
    "qwen1.5-14b": _qwen15(5120, 13696, 40, 40, 40, 152064),
    "qwen1.5-32b": _qwen15(5120, 27392, 64, 40, 8, 152064),
    "qwen1.5-72b": _qwen15(8192, 24576, 80, 64, 64, 152064),
    "qwen1.5-110b": _qwen15(8192, 49152, 80, 64, 8, 152064),
    # Small models with the real Qwen vocabulary, for the quickstart and CPU experiments.
    "qwen-tiny": ModelConfig(vocab_size=151936, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                             tie_word_embeddings=True),
    "qwen-small": ModelConfig(vocab_size=151936, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                              tie_word_embeddings=True),
    # The training benchmark's model (hidden 512, 8 layers, 8 heads, 2 kv heads, ffn 1408).
    "qwen-bench": ModelConfig(vocab_size=151936, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096),
    # Qwen1.5-MoE-A2.7B (HF Qwen2MoeForCausalLM): 24 layers, each with 60 routed experts (top-4, ffn 1408, not
    # renormalised) and a gated shared expert (ffn 5632); 14.3B parameters, 2.7B active per token. Public copies of
    # its config.json disagree on max_position_embeddings (8192 for the base model, 32768 for -Chat): this preset
    # uses the base model's 8192; a checkpoint's own config.json always wins.
    "qwen1.5-moe-a2.7b": ModelConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, model_type="qwen2_moe", num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, norm_topk_prob=False,
        decoder_sparse_step=1, router_aux_loss_coef=0.001,
        extra={"bos_token_id": 151643, "eos_token_id": 151643, "max_window_layers": 21, "sliding_window": 32768}),
    # A small mixture of experts with the real vocabulary, for CPU experiments and the MoE benchmark.
    "qwen-moe-tiny": ModelConfig(
        vocab_size=151936, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=4096, model_type="qwen2_moe", num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=256),
    # A toy vocabulary for unit tests (fast to build and run).
    "test-tiny": ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             rope_theta=10000.0),
}


def get_preset(name: str) -> ModelConfig:
    """Return a copy of a preset (so callers can modify it), with a suggestion when the name is mistyped."""
    key = name.lower()
    if key.startswith("qwen1.5-") is False and f"qwen1.5-{key}" in PRESETS:
        key = f"qwen1.5-{key}"
    if key not in PRESETS:
        close = difflib.get_close_matches(key, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise QwenlinkError(f"unknown preset {name!r}{hint} (known: {', '.join(PRESETS)})")
    import copy

    return copy.deepcopy(PRESETS[key])


def is_preset(name: str) -> bool:
    key = name.lower()
    return key in PRESETS or f"qwen1.5-{key}" in PRESETS

"""`qwenlink info`: architecture, parameter count and training FLOPs per token of a preset or model directory."""

from __future__ import annotations

import dataclasses
import json

from qwenlink.checkpoint.loader import resolve_config
from qwenlink.models.config import HF_ARCHITECTURES

DEFAULT_SEQ_LENGTH = 8192  # the ModelLink Qwen1.5 recipes' sequence length


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def run_info(model: str | None, *, seq_length: int | None = None, as_json: bool = False,
             list_presets: bool = False) -> int:
    if list_presets or model is None:
        from qwenlink.models.presets import PRESETS

        for name, preset in PRESETS.items():
            print(f"{name:17s} {_human(preset.num_params()):>8s} params, {preset.num_hidden_layers} layers, "
                  f"hidden {preset.hidden_size}, vocab {preset.vocab_size}")
        return 0
    config = resolve_config(model)
    seq = seq_length or DEFAULT_SEQ_LENGTH
    params = config.num_params()
    active = config.num_params(active=True)
    flops = config.flops_per_token(seq)
    if as_json:
        fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "extra"}
        print(json.dumps({"model": model, **fields, "num_params": params, "num_active_params": active,
                          "seq_length": seq, "train_flops_per_token": flops}, indent=2))
        return 0
    gqa = (f"grouped-query ({config.num_key_value_heads} kv heads)"
           if config.num_key_value_heads != config.num_attention_heads else "multi-head")
    print(f"model: {model}")
    print(f"  architecture: {HF_ARCHITECTURES[config.model_type]}, "
          f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, ffn {config.intermediate_size}")
    if config.is_moe:
        sparse = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
        print(f"  mixture of experts: {sparse} sparse layers, {config.num_experts} experts x ffn "
              f"{config.moe_intermediate_size}, top-{config.num_experts_per_tok}"
              f"{' (renormalised)' if config.norm_topk_prob else ''}, shared expert ffn "
              f"{config.shared_expert_intermediate_size}, aux loss coef {config.router_aux_loss_coef:g}")
    print(f"  attention: {config.num_attention_heads} heads x {config.head_dim}, {gqa}, "
          f"qkv bias {'yes' if config.qkv_bias else 'no'}, rope_theta {config.rope_theta:g}")
    print(f"  vocab: {config.vocab_size}, tied embeddings: {'yes' if config.tie_word_embeddings else 'no'}, "
          f"max positions {config.max_position_embeddings}, rms_norm_eps {config.rms_norm_eps:g}")
    print(f"  parameters: {params / 1e9:.2f}B ({params:,})")
    if config.is_moe:
        print(f"  active parameters per token: {active / 1e9:.2f}B ({active:,}; router, top-"
              f"{config.num_experts_per_tok} experts and the shared expert)")
    matmuls = "active matmul params" if config.is_moe else "matmul params"
    print(f"  training FLOPs per token at seq {seq}: {_human(flops)} ({flops:.4g}; 6 x {matmuls} + "
          f"12 x layers x hidden x seq)")
    return 0

"""Tiny random transformers Qwen2-MoE models saved as HF directories: the reference for the MoE parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320


def make_hf_moe_model(tmp: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 4,
                      experts: int = 8, top_k: int = 2, moe_ffn: int = 32, shared_ffn: int = 48, ffn: int = 96,
                      norm_topk_prob: bool = False, mlp_only_layers: tuple = (), seed: int = 0,
                      dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                      tokenizer_from: Path | None = None):
    """A random `Qwen2MoeForCausalLM` saved to `tmp` with safetensors; returns (hf_model, directory).

    Norms, biases and the router are redrawn larger than HF's init so routing differs between tokens and a mix-up of
    experts, gates or norms cannot pass unnoticed."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv_heads, num_experts=experts,
                            num_experts_per_tok=top_k, moe_intermediate_size=moe_ffn,
                            shared_expert_intermediate_size=shared_ffn, norm_topk_prob=norm_topk_prob,
                            mlp_only_layers=list(mlp_only_layers), max_position_embeddings=512, rope_theta=10000.0,
                            rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = Qwen2MoeForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
            elif name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp, safe_serialization=True, **kwargs)
    if tokenizer_from is not None:  # e.g. the tiny Qwen2 fixture's BPE tokenizer (258 ids, inside VOCAB)
        import shutil

        for f in tokenizer_from.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
                shutil.copy2(f, tmp / f.name)
    return model, tmp

"""Build tiny random transformers Qwen2 models and save them as HF directories (the reference for parity tests)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_hf_model(tmp: Path, *, vocab: int = 320, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                  ffn: int = 160, tied: bool = False, theta: float = 10000.0, seed: int = 0,
                  dtype: torch.dtype = torch.float32, tokenizer_from: Path | None = None):
    """A random `Qwen2ForCausalLM` saved to `tmp` with safetensors; returns (hf_model, directory)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=theta,
                         tie_word_embeddings=tied, max_position_embeddings=512, rms_norm_eps=1e-6)
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    # Non-trivial norms and biases so a mix-up of them cannot pass unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer_from is not None:
        import shutil

        for f in tokenizer_from.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy2(f, tmp / f.name)
    return model, tmp


def hf_greedy_left_padded(hf, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """HF `generate` (greedy) on prompts of different lengths, left-padded into one batch; the new tokens per prompt."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    return out[:, width:].tolist()

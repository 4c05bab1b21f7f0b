"""`qwenlink generate`: complete prompts with a model directory or a preset (random weights)."""

from __future__ import annotations

import argparse
import sys

from qwenlink.device import resolve_device
from qwenlink.errors import QwenlinkError
from qwenlink.inference.generate import SamplingParams, generate
from qwenlink.models.loader import load_model
from qwenlink.tokenizer import Tokenizer, load_tokenizer


def pick_tokenizer(tokenizer_spec: str | None, model_tokenizer_dir) -> Tokenizer:
    if tokenizer_spec is not None:
        return load_tokenizer(tokenizer_spec)
    if model_tokenizer_dir is not None:
        return Tokenizer.from_dir(model_tokenizer_dir)
    return Tokenizer.default()


def check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """A tokenizer producing ids beyond the model's embedding would index out of range mid-run: refuse early."""
    if tokenizer.vocab_size > vocab_size:
        raise QwenlinkError(f"{where}: tokenizer {tokenizer.source or ''} has {tokenizer.vocab_size} ids but the "
                            f"model's vocab_size is {vocab_size}")


def run_generate(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise QwenlinkError("give at least one --prompt")
    from qwenlink.checkpoint.hf import parse_dtype

    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device, dtype=parse_dtype(args.dtype), seed=args.seed)
    tokenizer = pick_tokenizer(args.tokenizer, loaded.tokenizer_dir)
    check_vocab(tokenizer, loaded.model.config.vocab_size, args.model)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]
    prompts = [tokenizer.encode(t) for t in texts]
    temperature = 0.0 if args.greedy or args.temperature is None else args.temperature
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_ids=frozenset(tokenizer.stop_ids()))
    loaded.model.eval()
    results, stats = generate(loaded.model, prompts, params, pad_id=tokenizer.pad_id or 0)
    for prompt, result in zip(args.prompt, results):
        tokens = result.tokens[:-1] if result.finish_reason == "stop" else result.tokens
        if len(args.prompt) > 1:
            print(f"### prompt: {prompt}")
        print(tokenizer.decode(tokens, skip_special_tokens=False))
    print(f"[{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated; prefill "
          f"{stats.prefill_seconds:.3f}s, decode {stats.decode_tokens_per_second:.1f} tokens/s]", file=sys.stderr)
    return 0

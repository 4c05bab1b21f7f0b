"""`qwenlink generate`: complete prompts (from --prompt or a JSONL file) in batches, print or write JSONL."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwenlink.errors import QwenlinkError
from qwenlink.fileio import atomic_write_text
from qwenlink.inference.generate import generate
from qwenlink.inference.prefill import DEFAULT_PREFILL_CHUNK, check_prefill_chunk
from qwenlink.inference.session import open_session, sampling_from_args
from qwenlink.outputs import refuse_clobbering
from qwenlink.tokenizer import Tokenizer


def _read_jsonl_prompts(path: str, tokenizer: Tokenizer) -> list[str]:
    """Each line holds {"prompt": str} or {"messages": [...]} (rendered with the chat template)."""
    file = Path(path)
    if not file.is_file():
        raise QwenlinkError(f"{path}: input file not found")
    texts = []
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()  # -sig: a leading byte order mark is dropped
    except UnicodeDecodeError as exc:
        raise QwenlinkError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise QwenlinkError(f"{path}:{number}: not valid JSON") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            texts.append(record["prompt"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            texts.append(tokenizer.apply_chat_template(record["messages"]))
        else:
            raise QwenlinkError(f"{path}:{number}: expected an object with a 'prompt' string or a 'messages' list")
    if not texts:
        raise QwenlinkError(f"{path}: no prompts found")
    return texts


def run_generate(args: argparse.Namespace) -> int:
    if not args.prompt and not args.input:
        raise QwenlinkError("give at least one --prompt or an --input JSONL file")
    if args.output:
        refuse_clobbering(args.output, {"--input prompt file": args.input, "--model": args.model,
                                        "--lora adapter": getattr(args, "lora", None), "--tokenizer": args.tokenizer})
        if Path(args.output).is_dir():
            raise QwenlinkError(f"{args.output}: --output is a directory (expected a .jsonl file path)")
    check_prefill_chunk(getattr(args, "prefill_chunk", DEFAULT_PREFILL_CHUNK))  # before the model loads
    session = open_session(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                           seed=args.seed, lora=getattr(args, "lora", None))
    tok = session.tokenizer
    params = sampling_from_args(args, tok)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]
    if args.input:
        texts += _read_jsonl_prompts(args.input, tok)
    prompts = [tok.encode(t) for t in texts]
    if any(not p for p in prompts):
        raise QwenlinkError("a prompt is empty after tokenisation")
    results, stats = generate(session.model, prompts, params, decode=tok.decode, max_batch=args.max_batch,
                              prepack=getattr(args, "prepack", True), compile=getattr(args, "compile", False),
                              prefill_chunk=getattr(args, "prefill_chunk", DEFAULT_PREFILL_CHUNK))
    if session.rank != 0:  # tensor-parallel ranks computed the same results; rank 0 reports them
        return 0
    if args.output:
        lines = [json.dumps({"prompt": t, "text": r.text, "tokens": r.tokens, "finish_reason": r.finish_reason},
                            ensure_ascii=False) for t, r in zip(texts, results)]
        atomic_write_text(args.output, "\n".join(lines) + "\n")
    else:
        for text, result in zip(texts, results):
            if len(texts) > 1:
                print(f"### prompt: {text}")
            print(result.text)
    compiled = f"compile {stats.compile_seconds:.1f}s, " if stats.compile_seconds else ""
    print(f"[{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated; {compiled}prefill "
          f"{stats.prefill_seconds:.3f}s, decode {stats.decode_tokens_per_second:.1f} tokens/s]", file=sys.stderr)
    return 0

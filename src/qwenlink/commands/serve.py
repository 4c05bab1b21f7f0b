"""`qwenlink serve`: load a model and run the OpenAI-compatible server until interrupted.

The KV cache is sized at start-up (inference/cache_budget.py): `--max-batch` rows of `--max-context` tokens, lowered
to the rows that fit the cache's memory budget (`--cache-memory`, or `--cache-memory-fraction` of what is free once
the model is loaded), refused when not even one row fits, and allocated before the server listens.

Under torchrun the model is tensor-parallel: rank 0 serves HTTP and the other ranks follow its engine in lockstep.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from qwenlink.errors import QwenlinkError
from qwenlink.inference.cache_budget import (DEFAULT_MEMORY_FRACTION, CachePlan, agree_across_ranks, format_bytes,
                                             memory_budget, parse_size, plan_cache)
from qwenlink.inference.engine import Engine
from qwenlink.inference.lockstep import follow
from qwenlink.inference.openai_api import check_api_key_setting
from qwenlink.inference.prefill import DEFAULT_PREFILL_CHUNK, check_prefill_chunk
from qwenlink.inference.server import ServerLimits, make_server, response_decoder, stop_gracefully
from qwenlink.inference.session import InferenceSession, open_session


def serving_context(args: argparse.Namespace, max_position_embeddings: int) -> tuple[int, int]:
    """(context, longest prompt) from --max-context and --max-prompt-tokens.

    Without --max-context the context is the longest request the server accepts, --max-prompt-tokens +
    --max-tokens-limit (8192 + 2048 by default), at most the model's max_position_embeddings: a longer cache row
    could never be used. Given --max-context, prompts may fill it unless --max-prompt-tokens says otherwise."""
    for option, value in (("--max-prompt-tokens", args.max_prompt_tokens), ("--max-tokens-limit",
                                                                            args.max_tokens_limit)):
        if value is not None and value < 1:
            raise QwenlinkError(f"{option} must be at least 1, got {value}")
    if args.max_context is not None:
        context = args.max_context
        if context > max_position_embeddings:
            raise QwenlinkError(f"--max-context {context} exceeds the model's max_position_embeddings "
                                f"{max_position_embeddings}")
        prompt = args.max_prompt_tokens if args.max_prompt_tokens is not None else context
        return context, prompt
    prompt = args.max_prompt_tokens if args.max_prompt_tokens is not None else ServerLimits.max_prompt_tokens
    return min(max_position_embeddings, prompt + args.max_tokens_limit), prompt


def size_cache(engine: Engine, args: argparse.Namespace, session: InferenceSession) -> CachePlan:
    """The rows of the engine's cache that fit its memory budget (agreed by all tensor-parallel ranks); refuses
    when not even one fits. Call after the model is loaded (and prepacked), before allocating the cache."""
    size = parse_size(args.cache_memory) if getattr(args, "cache_memory", None) else None
    # Tensor-parallel ranks on CPU share one host's memory.
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if session.world_size > 1 else 1
    fraction = getattr(args, "cache_memory_fraction", None)
    budget = memory_budget(engine.device, size=size,
                           fraction=DEFAULT_MEMORY_FRACTION if fraction is None else fraction,
                           processes=processes if engine.device.type == "cpu" else 1)
    plan = plan_cache(engine.kv_bytes_per_token, rows=args.max_batch, max_context=engine.max_length, budget=budget)
    return agree_across_ranks(plan, engine.device).check()


def run_serve(args: argparse.Namespace) -> int:
    api_key = args.api_key if args.api_key is not None else (os.environ.get("QWENLINK_API_KEY") or None)
    check_api_key_setting(api_key)  # before the model loads: a key no client can send is a mistake to report now
    prefill_chunk = check_prefill_chunk(getattr(args, "prefill_chunk", DEFAULT_PREFILL_CHUNK))
    session = open_session(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                           lora=getattr(args, "lora", None))
    context, max_prompt_tokens = serving_context(args, session.model.config.max_position_embeddings)
    if args.max_batch < 1:
        raise QwenlinkError(f"--max-batch must be at least 1, got {args.max_batch}")
    engine = Engine(session.model, max_batch=args.max_batch, max_length=context,
                    prepack=getattr(args, "prepack", True), compile=getattr(args, "compile", False),
                    prefill_chunk=prefill_chunk)
    plan = size_cache(engine, args, session)
    if plan.lowered and session.rank == 0:
        print(f"qwenlink serve: {plan.notice()}", file=sys.stderr, flush=True)
    try:
        engine.allocate(plan.rows)
    except torch.OutOfMemoryError:
        raise QwenlinkError(f"allocating the KV cache ({plan.rows} rows of {context} tokens, "
                            f"{format_bytes(plan.cache_bytes)}) ran out of memory; lower --cache-memory, "
                            f"--cache-memory-fraction or --max-context") from None
    if session.rank != 0:
        follow(engine, response_decoder(session.tokenizer))
        return 0
    limits = ServerLimits(max_tokens=args.max_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                          max_concurrent=args.max_concurrent, max_body_bytes=args.max_body_bytes, context=context)
    name = args.served_model_name or session.name
    try:
        server = make_server(engine, session.tokenizer, name, host=args.host, port=args.port, limits=limits,
                             api_key=api_key,
                             lockstep=session.world_size > 1)
    except OSError as exc:
        raise QwenlinkError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    host, port = server.server_address[:2]
    print(f"qwenlink serve: model {name!r} on http://{host}:{port}/v1 (max batch {engine.max_batch}, "
          f"context {context}, KV cache {format_bytes(engine.cache_bytes)}); Ctrl-C to stop",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop_gracefully(server)  # queued connections get 503, running requests a few seconds to finish
    return 0

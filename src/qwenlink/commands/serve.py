"""`qwenlink serve`: load a model and run the OpenAI-compatible server until interrupted.

Under torchrun the model is tensor-parallel: rank 0 serves HTTP and the other ranks follow its engine in lockstep.
"""

from __future__ import annotations

import argparse
import os
import sys

from qwenlink.errors import QwenlinkError
from qwenlink.inference.engine import Engine
from qwenlink.inference.lockstep import follow
from qwenlink.inference.server import ServerLimits, make_server, response_decoder
from qwenlink.inference.session import open_session


def run_serve(args: argparse.Namespace) -> int:
    session = open_session(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                           lora=getattr(args, "lora", None))
    context = args.max_context or session.model.config.max_position_embeddings
    if context > session.model.config.max_position_embeddings:
        raise QwenlinkError(f"--max-context {context} exceeds the model's max_position_embeddings "
                            f"{session.model.config.max_position_embeddings}")
    engine = Engine(session.model, max_batch=args.max_batch, max_length=context,
                    prepack=getattr(args, "prepack", True), compile=getattr(args, "compile", False))
    if session.rank != 0:
        follow(engine, response_decoder(session.tokenizer))
        return 0
    limits = ServerLimits(max_tokens=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                          max_concurrent=args.max_concurrent, max_body_bytes=args.max_body_bytes)
    name = args.served_model_name or session.name
    try:
        server = make_server(engine, session.tokenizer, name, host=args.host, port=args.port, limits=limits,
                             api_key=args.api_key or os.environ.get("QWENLINK_API_KEY"),
                             lockstep=session.world_size > 1)
    except OSError as exc:
        raise QwenlinkError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    host, port = server.server_address[:2]
    print(f"qwenlink serve: model {name!r} on http://{host}:{port}/v1 (max batch {args.max_batch}, "
          f"context {context}); Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.state.worker.stop()
    return 0

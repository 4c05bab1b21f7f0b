"""Interactive ChatML chat in the terminal, streaming the reply token by token.

The conversation is kept as token ids, one list per turn: a new user message is tokenised once and appended, and the
assistant's reply is kept as exactly the tokens the model produced (never re-tokenised). When the conversation
outgrows `max_history_tokens`, the oldest user/assistant turns are dropped (the system turn stays).

Under torchrun the model is tensor-parallel: rank 0 reads the input and shares each line, every rank runs the same
conversation, and rank 0 prints it.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import replace
from typing import Callable, Optional, TextIO

from qwenlink.inference.engine import Engine, Request
from qwenlink.inference.prefill import DEFAULT_PREFILL_CHUNK
from qwenlink.inference.lockstep import SharedLines
from qwenlink.inference.sampling import SamplingParams
from qwenlink.models.qwen2 import Qwen2Model
from qwenlink.tokenizer import IM_END, IM_START, Tokenizer


class ChatSession:
    def __init__(self, model: Qwen2Model, tokenizer: Tokenizer, params: SamplingParams, *,
                 system: str = "You are a helpful assistant.", max_history_tokens: int = 4096,
                 prepack: bool = True, compile: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.max_history_tokens = max_history_tokens
        max_length = min(model.config.max_position_embeddings, max_history_tokens + params.max_new_tokens + 64)
        self.engine = Engine(model, max_batch=1, max_length=max_length, prepack=prepack, compile=compile,
                             prefill_chunk=prefill_chunk)
        self.set_system(system)

    def set_system(self, system: str) -> None:
        self.system_tokens = self.tokenizer.encode(f"{IM_START}system\n{system}{IM_END}\n")
        self.turns: list[list[int]] = []  # alternating user / assistant turns, each as token ids

    def clear(self) -> None:
        self.turns = []

    def history_tokens(self) -> list[int]:
        return self.system_tokens + [t for turn in self.turns for t in turn]

    def _trim(self, incoming: int) -> None:
        while self.turns and len(self.history_tokens()) + incoming > self.max_history_tokens:
            del self.turns[:2]  # the oldest user turn and its reply

    def reply(self, message: str, on_text: Optional[Callable[[str], None]] = None) -> str:
        """Add a user message, generate the assistant's reply (streamed to on_text), and keep both as tokens."""
        user = self.tokenizer.encode(f"{IM_START}user\n{message}{IM_END}\n{IM_START}assistant\n")
        self._trim(len(user))
        prompt = self.history_tokens() + user
        budget = self.engine.max_length - len(prompt)
        params = replace(self.params, max_new_tokens=max(1, min(self.params.max_new_tokens, budget)))
        shown = [0]

        def stream(request: Request) -> None:
            visible = request.stream_text()
            if on_text is not None and len(visible) > shown[0]:
                on_text(visible[shown[0]:])
                shown[0] = len(visible)

        request = Request(prompt, params, decode=self.tokenizer.decode, on_update=stream)
        self.engine.run([request])
        produced = request.tokens[:-1] if request.finish_reason == "stop" and request.tokens and \
            request.tokens[-1] in params.stop_ids else request.tokens
        if request.finish_reason == "stop" and request.text != self.tokenizer.decode(produced):
            produced = self.tokenizer.encode(request.text)  # a stop string cut the reply mid-token
        self.turns += [user, produced + self.tokenizer.encode(f"{IM_END}\n")]
        return request.text


class _Discard(io.TextIOBase):
    """A text sink for the ranks that compute but do not print."""

    def write(self, text: str) -> int:
        return len(text)


def run_chat(args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    from qwenlink.inference.session import open_session, sampling_from_args

    session = open_session(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                           seed=args.seed, lora=getattr(args, "lora", None))
    params = sampling_from_args(args, session.tokenizer)
    chat = ChatSession(session.model, session.tokenizer, params, system=args.system,
                       max_history_tokens=args.max_history_tokens, prepack=getattr(args, "prepack", True),
                       compile=getattr(args, "compile", False),
                       prefill_chunk=getattr(args, "prefill_chunk", DEFAULT_PREFILL_CHUNK))
    interactive = stdin.isatty() and session.rank == 0
    lines: TextIO | SharedLines = stdin
    if session.world_size > 1:
        lines = SharedLines(stdin)
        if session.rank != 0:
            stdout = _Discard()  # the other ranks compute the same replies; rank 0 shows them
    if interactive:
        print("qwenlink chat: /clear resets the conversation, /system TEXT sets the system prompt, /quit exits",
              file=stdout)
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = lines.readline()
        if not line:
            break
        message = line.rstrip("\n")
        if not message.strip():
            continue
        if message.strip() in ("/quit", "/exit"):
            break
        if message.strip() == "/clear":
            chat.clear()
            print("[conversation cleared]", file=stdout)
            continue
        if message.startswith("/system "):
            chat.set_system(message[len("/system "):])
            print("[system prompt set; conversation cleared]", file=stdout)
            continue
        stdout.write("assistant> ")
        chat.reply(message, on_text=lambda text: (stdout.write(text), stdout.flush()))
        stdout.write("\n")
        stdout.flush()
    return 0

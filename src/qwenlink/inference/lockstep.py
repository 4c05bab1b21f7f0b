"""Keeping the engines of tensor-parallel ranks in step for interactive use (serve, chat).

Under tensor parallelism every rank runs the same engine on its shard of the model, and each decode step's
collectives only line up if all ranks admit, abort and step the same requests at the same time. `generate` gets this
for free (every rank reads the same prompts); a server or a chat does not, because requests arrive on rank 0 only.
So rank 0 decides and announces: before each of its engine steps it broadcasts what changed (requests submitted,
requests aborted, or stop), and the other ranks replay exactly that, then step too. Logits are identical on every rank
(the head's output is gathered), so greedy and seeded sampling choose the same tokens everywhere; an unseeded sampled
request gets a seed drawn on rank 0 so that the ranks' generators agree.
"""

from __future__ import annotations

import dataclasses
import queue
import secrets
import signal
import threading
from typing import Any, Callable, Optional, TextIO

import torch.distributed as dist

from qwenlink.inference.engine import Engine, Request

# Rank 0 announces an empty step at least this often while idle, so the other ranks' broadcast never times out.
HEARTBEAT_SECONDS = 30.0


def share(value: Any) -> Any:
    """Broadcast rank 0's value (a list of operations, a line of input) to every rank; returns it on all ranks."""
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def announced_submit(request: Request) -> tuple:
    """The operation that makes the other ranks submit a twin of `request` (seeding unseeded sampling first)."""
    if not request.params.greedy and request.params.seed is None:
        request.params = dataclasses.replace(request.params, seed=secrets.randbits(63))
    return ("submit", request.id, request.prompt, request.params, request.decode is not None)


def follow(engine: Engine, decode: Callable[[list[int]], str]) -> None:
    """Ranks other than 0: replay rank 0's announced operations and step with it until it announces stop.

    A SIGINT reaching a follower (a terminal's Ctrl-C, or torchrun forwarding its own) is ignored: only rank 0 acts on
    it, by announcing stop, so a follower never leaves rank 0 waiting on a collective mid-step. A step that fails on
    a follower ends it with an error, and torchrun then stops the whole group (rank 0 included): a rank that missed a
    step cannot rejoin.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    twins: dict[int, Request] = {}
    while True:
        for op in share(None):
            if op[0] == "stop":
                return
            if op[0] == "submit":
                _, request_id, prompt, params, has_decode = op
                twins[request_id] = engine.submit(Request(prompt, params, decode=decode if has_decode else None))
            elif op[0] == "abort" and op[1] in twins:
                engine.abort(twins[op[1]])
        if engine.busy:
            engine.step()
        twins = {k: v for k, v in twins.items() if not v.done}


class SharedLines:
    """Rank 0's input lines delivered to every rank (chat under tensor parallelism), with heartbeats while idle.

    A thread on rank 0 reads the stream, so waiting for a slow typist never blocks a broadcast longer than a heartbeat.
    """

    def __init__(self, stream: TextIO) -> None:
        self.rank = dist.get_rank()
        self.lines: "queue.Queue[str]" = queue.Queue()
        if self.rank == 0:
            threading.Thread(target=self._read, args=(stream,), name="qwenlink-stdin", daemon=True).start()

    def _read(self, stream: TextIO) -> None:
        while True:
            line = stream.readline()
            self.lines.put(line)
            if not line:  # end of input
                return

    def readline(self) -> str:
        while True:
            line = None
            if self.rank == 0:
                try:
                    line = self.lines.get(timeout=HEARTBEAT_SECONDS)
                except queue.Empty:
                    pass  # nothing typed yet: broadcast a heartbeat
            line = share(line)
            if line is not None:
                return line

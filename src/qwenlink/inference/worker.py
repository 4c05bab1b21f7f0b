"""A background thread that owns the engine: requests arrive from any thread, tokens flow back per request.

The model and KV cache are touched by this thread only, so HTTP handler threads never race on them; each request
gets its own queue of events (new text, end) that its handler reads. Under tensor parallelism (`lockstep=True`, on
rank 0) every admission, abort and step is announced to the other ranks first (inference/lockstep.py).
"""

from __future__ import annotations

import queue
import threading
from typing import Optional

from qwenlink.inference import lockstep as lockstep_ops
from qwenlink.inference.engine import Engine, Request

_STOP = object()


class EngineWorker:
    """Runs `engine.step()` whenever there is work, admitting new requests between steps (continuous batching)."""

    def __init__(self, engine: Engine, *, lockstep: bool = False) -> None:
        self.engine = engine
        self.lockstep = lockstep
        self.inbox: "queue.Queue[object]" = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="qwenlink-engine", daemon=True)
        self.error: Optional[BaseException] = None
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        """False once the loop has ended (stopped, or under lockstep after a failure that ended the group)."""
        return self.thread.is_alive()

    def start(self) -> "EngineWorker":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.inbox.put(_STOP)
        self.thread.join(timeout=10)

    @property
    def load(self) -> int:
        """Requests submitted and not yet finished (for admission control)."""
        with self._lock:
            return self._pending

    def submit(self, request: Request) -> "queue.Queue[Request]":
        """Queue a request (already validated with `engine.check`); returns the queue its updates arrive on."""
        events: "queue.Queue[Request]" = queue.Queue()
        user_callback = request.on_update

        def on_update(r: Request) -> None:
            if user_callback is not None:
                user_callback(r)
            if r.done:
                with self._lock:
                    self._pending -= 1
            events.put(r)

        request.on_update = on_update
        with self._lock:
            self._pending += 1
        self.inbox.put(("submit", request))
        return events

    def abort(self, request: Request) -> None:
        self.inbox.put(("abort", request))

    def _handle(self, item: object, ops: list) -> bool:
        """Apply one inbox item to the engine, noting in `ops` what the other ranks must replay."""
        if item is _STOP:
            ops.append(("stop",))
            return False
        kind, request = item  # type: ignore[misc]
        if kind == "submit":
            try:
                op = lockstep_ops.announced_submit(request) if self.lockstep else ("submit", request.id)
                self.engine.submit(request)
                ops.append(op)
            except Exception as exc:  # validated before, so this is unexpected; end the request, keep serving
                request.finish_reason = "error"
                request.text = str(exc)
                request.on_update(request)
        elif kind == "abort" and not request.done:
            self.engine.abort(request)
            ops.append(("abort", request.id))
            request.on_update(request)
        return True

    def _next_items(self) -> list:
        """Everything in the inbox; blocks while the engine is idle (under lockstep at most a heartbeat long)."""
        items = []
        try:
            if self.engine.busy:
                items.append(self.inbox.get_nowait())
            else:
                items.append(self.inbox.get(timeout=lockstep_ops.HEARTBEAT_SECONDS if self.lockstep else None))
            while True:  # drain everything that is already waiting
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return items

    def _loop(self) -> None:
        while True:
            ops: list = []
            running = all([self._handle(item, ops) for item in self._next_items()])
            if self.lockstep:
                try:
                    lockstep_ops.share(ops)  # also when empty: the other ranks step (or wait) with this one
                except Exception as exc:  # another rank is gone: nothing can be computed any more
                    self._fail_all(exc)
                    return
            if not running:
                return
            if self.engine.busy:
                try:
                    self.engine.step()
                except Exception as exc:  # a bug: fail the running requests loudly but keep the server alive
                    self._fail_all(exc)
                    if self.lockstep:
                        # This rank's engine no longer matches the others': end the group instead of diverging.
                        self._announce_stop()
                        return

    def _announce_stop(self) -> None:
        try:
            lockstep_ops.share([("stop",)])
        except Exception:  # the others are gone already
            pass

    def _fail_all(self, exc: BaseException) -> None:
        """End every running and waiting request with an error naming `exc`."""
        self.error = exc
        for r in list(self.engine.running.values()) + list(self.engine.waiting):
            self.engine.abort(r)
            r.finish_reason = "error"
            r.text = f"internal error: {type(exc).__name__}: {exc}"
            r.on_update(r)

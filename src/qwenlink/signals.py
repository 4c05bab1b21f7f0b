"""SIGTERM and SIGHUP end a command the way Ctrl-C does: cleanup runs, one line, exit 128 + the signal.

Why: Python's default SIGTERM/SIGHUP action kills the process on the spot, so `kill`, `timeout`, SLURM's pre-emption
or a closed terminal left `.bin.tmp-*` files behind, worker processes and leaked-semaphore warnings, where Ctrl-C
(KeyboardInterrupt) unwinds through every `finally`: atomic writers remove their temporaries, worker pools are
terminated and joined. `Terminated` is raised in the main thread like KeyboardInterrupt (a BaseException, so no
`except Exception` swallows it); further SIGTERM/SIGHUP are ignored while the cleanup runs (SIGKILL still ends it).
The trainer installs its own handlers (finish the step, save); this is for every other command.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """A termination signal arrived; unwinding like KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: object) -> None:
    for s in HANDLED:  # one unwinding at a time: a second signal must not interrupt the cleanup of the first
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise `Terminated` in the main thread (no-op off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    for s in HANDLED:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def quiet_worker_signals() -> None:
    """In a worker process: leave Ctrl-C and hang-ups to the parent (which terminates the pool); SIGTERM keeps its
    default action, so the parent's `pool.terminate()` ends the worker silently, without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

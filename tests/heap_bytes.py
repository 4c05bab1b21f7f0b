"""Host memory a process holds, counted in bytes: glibc's mallinfo2 (what malloc has handed out and not taken back),
and the peak of its growth over a block of code.

Why not RSS: memory malloc keeps after a free, and file-backed mappings (safetensors files, memory-mapped
checkpoints) count in RSS but are not held by the code; mallinfo2 counts exactly the live allocations, including
every CPU tensor's storage (PyTorch's CPU allocator is malloc). The peak is taken at the points a test names (e.g.
each time a safetensors file is written, when an exporter holds the most) and by a poller in between, so a
transient allocation is seen where it matters even on a busy machine.
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import ExitStack
from typing import Any, Callable, Optional
from unittest import mock


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> Optional[Callable[[], _MallInfo2]]:
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()
AVAILABLE = _MALLINFO2 is not None  # glibc >= 2.33


def live_bytes() -> int:
    """Bytes currently allocated through malloc: the arenas' used space plus mmap'ed chunks (big tensors)."""
    assert _MALLINFO2 is not None, "needs glibc's mallinfo2"
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class HeapPeak:
    """`with HeapPeak(patch=[...]) as peak:` ... `peak.growth`: the most the live bytes rose above their value at
    entry. `patch` names callables ("module.attr") to sample at on each call, before they run."""

    def __init__(self, patch: tuple[str, ...] = (), interval: float = 0.002) -> None:
        self.patch, self.interval = patch, interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._stack = ExitStack()

    def sample(self) -> None:
        self.peak = max(self.peak, live_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.base

    def _wrap(self, target: str) -> None:
        module, _, attr = target.rpartition(".")
        original = getattr(__import__(module, fromlist=[attr]), attr)

        def sampled(*args: Any, **kwargs: Any) -> Any:
            self.sample()
            return original(*args, **kwargs)

        self._stack.enter_context(mock.patch(target, sampled))

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "HeapPeak":
        for target in self.patch:
            self._wrap(target)
        self.base = self.peak = live_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self._stack.close()

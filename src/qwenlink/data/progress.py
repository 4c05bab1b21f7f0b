"""Progress reporting for long preprocessing runs.

On a terminal a single self-rewriting line (a progress bar when the total is known); otherwise (CI logs, nohup files)
plain periodic lines, because carriage returns turn log files into one unreadable line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts records / documents / tokens and reports rates; `total_records` enables a bar and an ETA."""

    def __init__(self, total_records: int | None = None, log_interval: int = 10000,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = total_records
        self.log_interval = max(1, log_interval)
        self.start = time.perf_counter()
        self.records = self.documents = self.tokens = 0
        self._next_log = self.log_interval
        self._last_draw = 0.0

    def update(self, records: int, documents: int, tokens: int) -> None:
        self.records += records
        self.documents += documents
        self.tokens += tokens
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= 0.2:
                self._last_draw = now
                self.stream.write("\r" + self._line(now))
                self.stream.flush()
        elif self.records >= self._next_log:
            self._next_log = (self.records // self.log_interval + 1) * self.log_interval
            self.stream.write(self._line(now) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self._line(time.perf_counter()) + "\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _line(self, now: float) -> str:
        dt = max(now - self.start, 1e-9)
        rates = f"{self.documents / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tokens/s"
        if self.total:
            frac = min(self.records / self.total, 1.0)
            bar = "#" * int(frac * 30)
            eta = (dt / frac - dt) if frac > 0 else 0.0
            return f"[{bar:<30}] {frac:6.1%} {self.records:,}/{self.total:,} records, {rates}, eta {eta:,.0f}s"
        return f"processed {self.records:,} records ({self.documents:,} documents, {self.tokens:,} tokens), {rates}"

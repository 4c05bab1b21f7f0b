"""How large the serving KV cache may be: its bytes a token, the memory it may take, and how many rows fit.

The engine's cache is static: `rows` rows of `max_context` slots each, allocated once, so it takes
rows x max_context x (bytes a token) whatever the requests' lengths. `qwenlink serve` therefore sizes it before
allocating: the budget is an explicit size (`--cache-memory`) or a fraction (`--cache-memory-fraction`, 0.9 by
default) of the memory still free once the model is loaded (the accelerator's free memory; on CPU the host's available
memory, within the container's limit when there is one). When the requested rows do not fit, fewer rows are served
(fewer requests at a time, each still up to `max_context` tokens); when not even one row fits, serving is refused.

Everything here but `free_memory` is arithmetic (no allocation), so it is tested on the real model shapes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from qwenlink.errors import QwenlinkError
from qwenlink.models.config import ModelConfig

DEFAULT_MEMORY_FRACTION = 0.9
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, *, kv_heads: Optional[int] = None,
                       layers: Optional[int] = None) -> int:
    """Bytes one token's keys and values take in the cache: layers x 2 (key, value) x kv heads x head dim x dtype size.

    kv_heads: the heads this process holds (under tensor parallelism its share); layers: the layers it runs."""
    layers = config.num_hidden_layers if layers is None else layers
    kv_heads = config.num_key_value_heads if kv_heads is None else kv_heads
    return layers * 2 * kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


def format_bytes(n: float) -> str:
    """A size for messages: 24.0 GiB, 192.0 KiB, 512 B."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def parse_size(text: str, *, option: str = "--cache-memory") -> int:
    """Bytes from `8589934592`, `8G`, `8GiB`, `8GB`, `1.5g`, `512M`: K/M/G/T are powers of 1024 (8G = 8GiB)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", str(text), flags=re.IGNORECASE)
    if not found:
        raise QwenlinkError(f"{option} {text!r}: expected a size such as 24G, 512M or a number of bytes")
    value = int(float(found.group(1)) * _UNITS[found.group(2).upper()])
    if value <= 0:
        raise QwenlinkError(f"{option} {text!r}: the size must be positive")
    return value


# ---- the budget -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryBudget:
    """The bytes the KV cache may take, and where that figure comes from (for messages)."""

    bytes: int
    source: str  # e.g. "--cache-memory 8.0 GiB", "0.9 x 70.3 GiB free on cuda:0"


def free_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free now, where) on `device`: an accelerator's free memory (its allocator's cached blocks released
    first), or on CPU the host's available memory, within the container's (cgroup's) limit when that is lower."""
    if device.type == "cpu":
        return available_host_memory()
    backend = getattr(torch, device.type, None)
    mem_get_info = getattr(backend, "mem_get_info", None)
    if mem_get_info is None:
        raise QwenlinkError(f"cannot tell how much memory is free on {device}; give the KV cache a size with "
                            f"--cache-memory")
    empty_cache = getattr(backend, "empty_cache", None)
    if empty_cache is not None:
        empty_cache()
    free, _total = mem_get_info(device)
    index = device.index if device.index is not None else backend.current_device()
    return int(free), f"{device.type}:{index}"


def available_host_memory(*, meminfo: Path = Path("/proc/meminfo"),
                          cgroup: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """(bytes, where): MemAvailable, or what the cgroup's memory limit leaves when that is less."""
    try:
        text = meminfo.read_text()
        found = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, flags=re.MULTILINE)
        host = int(found.group(1)) * 1024 if found else None
    except OSError:
        host = None
    if host is None:
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            raise QwenlinkError("cannot tell how much memory is available on this host; give the KV cache a size "
                                "with --cache-memory") from None
    limited = _cgroup_headroom(cgroup)
    if limited is not None and limited < host:
        return limited, "cpu (the container's memory limit)"
    return host, "cpu"


def _cgroup_headroom(root: Path) -> Optional[int]:
    """Bytes the cgroup's memory limit still allows (limit - (usage - inactive file cache)); None without a limit."""
    for limit_file, usage_file, stat_key in (("memory.max", "memory.current", "inactive_file"),  # cgroup v2
                                              ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                               "total_inactive_file")):  # cgroup v1
        try:
            limit_text = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 1 << 60:
            return None  # no limit
        stat_dir = (root / usage_file).parent
        reclaimable = 0
        try:
            for line in (stat_dir / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == stat_key:
                    reclaimable = int(value)
        except (OSError, ValueError):
            pass
        return max(0, int(limit_text) - max(0, usage - reclaimable))
    return None


def memory_budget(device: torch.device, *, fraction: float = DEFAULT_MEMORY_FRACTION, size: Optional[int] = None,
                  processes: int = 1) -> MemoryBudget:
    """The KV cache's budget on `device`: `size` bytes when given, else `fraction` of the memory free now (call this
    after the model is loaded). processes: how many processes share this memory (tensor-parallel ranks on one host's
    CPU), each getting an equal part."""
    if size is not None:
        return MemoryBudget(size, f"--cache-memory {format_bytes(size)}")
    if not 0 < fraction <= 1:
        raise QwenlinkError(f"--cache-memory-fraction must be in (0, 1], got {fraction}")
    free, where = free_memory(device)
    shared = f" shared by {processes} processes" if processes > 1 else ""
    return MemoryBudget(int(free * fraction / processes),
                        f"{fraction:g} x {format_bytes(free)} free on {where}{shared}")


# ---- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachePlan:
    """How many cache rows of `max_context` tokens to allocate within a budget (0 when not even one fits)."""

    requested_rows: int
    rows: int
    max_context: int
    bytes_per_token: int
    budget: MemoryBudget
    limited_elsewhere: bool = False  # another tensor-parallel rank fits fewer rows

    @property
    def row_bytes(self) -> int:
        return self.max_context * self.bytes_per_token

    @property
    def cache_bytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def lowered(self) -> bool:
        return self.rows < self.requested_rows

    def notice(self) -> Optional[str]:
        """One line for start-up when fewer rows than requested are served; None otherwise."""
        if not self.lowered or self.rows == 0:
            return None
        why = ("another rank's memory holds fewer" if self.limited_elsewhere else
               f"the cache may use {format_bytes(self.budget.bytes)} ({self.budget.source})")
        return (f"KV cache: --max-batch {self.requested_rows} rows of {self.max_context} tokens would take "
                f"{format_bytes(self.requested_rows * self.row_bytes)} but {why}; serving {self.rows} requests "
                f"at a time ({format_bytes(self.cache_bytes)}); lower --max-context for more")

    def refusal(self) -> str:
        """One line: why not even one request of max_context tokens fits, and what would."""
        if self.limited_elsewhere:
            return (f"the KV cache cannot hold one request of --max-context {self.max_context} tokens on another "
                    f"tensor-parallel rank (see its message); lower --max-context or give the cache more memory "
                    f"(--cache-memory-fraction, --cache-memory)")
        fits = self.budget.bytes // self.bytes_per_token
        advice = f"use --max-context {fits} or less" if fits >= 2 else "free memory"
        return (f"the KV cache cannot hold one request of --max-context {self.max_context} tokens: that takes "
                f"{format_bytes(self.row_bytes)} ({format_bytes(self.bytes_per_token)} a token) and the cache may use "
                f"{format_bytes(self.budget.bytes)} ({self.budget.source}); {advice}, or give the cache more memory "
                f"(--cache-memory-fraction, --cache-memory)")

    def check(self) -> "CachePlan":
        if self.rows < 1:
            raise QwenlinkError(self.refusal())
        return self


def plan_cache(bytes_per_token: int, *, rows: int, max_context: int, budget: MemoryBudget) -> CachePlan:
    """The most rows, up to `rows`, of `max_context` tokens whose keys and values fit `budget` (arithmetic only;
    `.check()` refuses a plan of zero rows)."""
    if rows < 1:
        raise QwenlinkError(f"--max-batch must be at least 1, got {rows}")
    if max_context < 2:
        raise QwenlinkError(f"--max-context must be at least 2 (a prompt token and a generated one), got {max_context}")
    fit = budget.bytes // (max_context * bytes_per_token)
    return CachePlan(rows, min(rows, fit), max_context, bytes_per_token, budget)


def agree_across_ranks(plan: CachePlan, device: torch.device) -> CachePlan:
    """Under tensor parallelism, the fewest rows any rank fits: every rank must run the same rows (they admit the
    same requests in lockstep), and all refuse together. Without a process group, the plan as it is."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return plan
    rows = torch.tensor([plan.rows], dtype=torch.long, device=device)
    dist.all_reduce(rows, op=dist.ReduceOp.MIN)
    agreed = int(rows.item())
    return replace(plan, rows=agreed, limited_elsewhere=True) if agreed < plan.rows else plan


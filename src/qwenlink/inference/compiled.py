"""An optional compiled decode step (`Engine(compile=True)`, `--compile`), compiled once.

Eager decoding launches ~40 small kernels per layer, each with Python and dispatch overhead; compiling fuses them.
To compile once and never recompile, the step always runs all `max_batch` cache rows. Rows without a request feed
token 0 at the cache's last slot, which no request ever writes or reads (the engine ends a request before its next
slot reaches it).

On CUDA every shape is fixed: the step attends over the whole cache (slots past each row's position are masked) and
is captured as a CUDA graph (mode "reduce-overhead").

On CPU the one dynamic size is the attention span (the slots up to the furthest running row), so attention reads
only the part of the cache in use. Inductor's freezing folds the weights in as constants and prepacks them (without
freezing the compiled step is no faster than eager here), so the compiled step assumes the weights no longer change.
Three more inductor options pay on CPU (Qwen1.5-0.5B shape, bf16, batch 8: a 50 ms step became ~41 ms in isolation; see
BENCHMARKS.md):
- `cpp_wrapper`: the step's ~10 kernel calls per layer are made from generated C++, not a Python wrapper;
- `cpp.enable_concat_linear`: q/k/v and gate/up, which read the same input, become one GEMM each (fewer, larger
  weight streams);
- in bf16 only, `max_autotune` with inductor's own C++ GEMM template (AMX or AVX-512 micro-kernels) as a choice next
  to oneDNN: at decode row counts it streams the weights ~10-20% faster. In fp32 oneDNN/MKL was faster at 1 and 8
  rows, so fp32 skips the tuning (and its compile time).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch

from qwenlink.models.qwen2 import KVCache, Qwen2Model

Tensor = torch.Tensor


def compile_decode_step(model: Qwen2Model, cache: KVCache) -> Callable[[Tensor, Tensor, int], Tensor]:
    """A function (tokens [B, 1], positions [B, 1], span) -> final hidden states [B, H] over all B = cache.batch_size
    rows, attending over cache slots [0, span) (span > every running row's position).

    The step stops before the head: the engine applies it, or for greedy rows only screens it (greedy_head.py)."""
    import torch._inductor.config as inductor_config

    sample = next(iter(cache.keys.values()))  # a cache tensor: the step's device and dtype
    if sample.device.type == "cuda":
        # The cache is written in place by every step; marking it static lets the CUDA graph keep it as is (mutated
        # non-static inputs make inductor skip graph capture).
        for tensor in [*cache.keys.values(), *cache.values.values()]:
            torch._dynamo.mark_static_address(tensor)

        # One shape, one graph: always the whole cache (a size-carrying input on another device would keep the
        # step out of CUDA graphs).
        def whole_cache_step(tokens: Tensor, positions: Tensor) -> Tensor:
            return model(tokens, kv_cache=cache, cache_positions=positions, cache_span=cache.max_length,
                         apply_head=False)[:, -1]

        graphed = torch.compile(whole_cache_step, fullgraph=True, dynamic=False, mode="reduce-overhead")
        return lambda tokens, positions, span: graphed(tokens, positions)

    def decode_step(tokens: Tensor, positions: Tensor, span_carrier: Tensor) -> Tensor:
        return model(tokens, kv_cache=cache, cache_positions=positions, cache_span=span_carrier.shape[0],
                     apply_head=False)[:, -1]

    compiled = torch.compile(decode_step, fullgraph=True, dynamic=False)
    options = cpu_inductor_options(sample.dtype)
    compiled_once = [False]

    def run(tokens: Tensor, positions: Tensor, span: int) -> Tensor:
        # The span's length is the one dynamic size of the graph, so attention reads only the slots in use. It stays
        # at most the last slot's index (idle rows write the last slot; no running row reaches it) and at least 2
        # (sizes 0 and 1 would be specialised; slots past a row's position are masked).
        carrier = torch.empty(max(min(span, cache.max_length - 1), 2), device="meta")
        if cache.max_length > 3:
            torch._dynamo.mark_dynamic(carrier, 0, min=2, max=cache.max_length - 1)
        # The options are read when the step compiles (its first call); `torch.compile(options=...)` does not honour
        # freezing, so they are patched around every call. Only the compiling call is kept quiet: the warning filters
        # it changes are process-wide, and the server's HTTP threads run alongside later steps.
        quiet = contextlib.nullcontext() if compiled_once[0] else _quiet_autotuning()
        with inductor_config.patch(options), quiet:
            hidden = compiled(tokens, positions, carrier)
        compiled_once[0] = True
        return hidden

    return run


def cpu_inductor_options(dtype: torch.dtype) -> dict:
    """Inductor options for the CPU decode step (see the module docstring), those this PyTorch version has."""
    options = {"freezing": True, "cpp_wrapper": True, "cpp.enable_concat_linear": True}
    if dtype == torch.bfloat16:
        options.update({"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                        "max_autotune_report_choices_stats": False})
    return {name: value for name, value in options.items() if _has_option(name)}


def _has_option(name: str) -> bool:
    import torch._inductor.config as inductor_config

    owner = inductor_config
    *parents, leaf = name.split(".")
    for parent in parents:
        owner = getattr(owner, parent, None)
    return owner is not None and hasattr(owner, leaf)


@contextlib.contextmanager
def _quiet_autotuning():
    """Keep GEMM autotuning's tables of timings (printed to stderr while the step compiles) out of the terminal."""
    from torch._inductor import select_algorithm

    previous = getattr(select_algorithm, "PRINT_AUTOTUNE", None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        if previous is not None:
            select_algorithm.PRINT_AUTOTUNE = False
        try:
            yield
        finally:
            if previous is not None:
                select_algorithm.PRINT_AUTOTUNE = previous

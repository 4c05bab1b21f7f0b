"""Linear-layer kernels at decoding row counts: plain `F.linear` vs oneDNN-prepacked weights (inference/prepack.py).

Each shape is timed over enough copies of the weight (~100 MB) that every call reads it from memory, as in a real
decode step where the other layers evict it from cache. Prints microseconds per call and the faster kernel; these are
the measurements behind `prepack.FP32_MIN_ELEMENTS` and the head figures in the module docstring.

    python benchmarks/bench_prepack.py
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

SHAPES = [(128, 512), (512, 512), (1408, 512), (512, 1408), (1024, 1024), (2816, 1024), (1024, 2816),
          (151936, 512), (151936, 1024)]


def _per_call(fn, calls: int, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--bytes", type=float, default=100e6, help="weight bytes cycled through per shape")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.machine()} torch {torch.__version__} "
          f"threads {torch.get_num_threads()}")
    print(f"{'dtype':8s} {'out x in':>14s} {'rows':>4s} {'F.linear us':>12s} {'prepacked us':>13s}  faster")
    for dtype in (torch.float32, torch.bfloat16):
        for out_features, in_features in SHAPES:
            size = out_features * in_features * torch.finfo(dtype).bits // 8
            copies = max(2, int(args.bytes // size))
            weights = [torch.randn(out_features, in_features).to(dtype) for _ in range(copies)]
            for rows in args.rows:
                packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
                x = torch.randn(rows, in_features).to(dtype)
                plain_us = _per_call(lambda: [F.linear(x, w) for w in weights], copies)
                packed_us = _per_call(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                               for p in packed], copies)
                faster = "prepacked" if packed_us < plain_us else "plain"
                print(f"{str(dtype)[6:]:8s} {out_features:>6d} x {in_features:<5d} {rows:>4d} {plain_us:12.1f} "
                      f"{packed_us:13.1f}  {faster}", flush=True)
            del weights


if __name__ == "__main__":
    main()

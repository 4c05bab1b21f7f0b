"""MMLU 5-shot scoring throughput on CPU: questions/s of `qwenlink eval` for the small model (qwen-tiny, real Qwen
vocabulary, random weights) on the real MMLU files in tests/fixtures/mmlu.

    python benchmarks/bench_eval.py                 # all 57 subjects, 14042 questions (about 10 minutes here)
    python benchmarks/bench_eval.py --limit 8       # the first 8 questions of every subject (456), a quick check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "mmlu" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-tiny")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        cmd = [sys.executable, "-m", "qwenlink.cli", "eval", "--model", args.model, "--task", "mmlu", "--data",
               args.data, "--shots", "5", "--threads", str(args.threads), "--output", str(out)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(result.stderr)
        report = json.loads(out.read_text())
    timing = report["timing"]
    questions = timing["questions"]
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {args.model} MMLU 5-shot, threads {args.threads}: {questions} questions; "
          f"{elapsed:.1f} s wall incl. start-up = {questions / elapsed:.1f} questions/s; tokenizing "
          f"{timing['tokenize_seconds']:.1f} s + scoring {timing['score_seconds']:.1f} s = "
          f"{timing['questions_per_second']:.1f} questions/s; accuracy {report['results']['overall']['acc']:.4f}")


if __name__ == "__main__":
    main()

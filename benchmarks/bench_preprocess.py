"""Benchmark: `qwenlink preprocess` vs the obvious baseline (HF `datasets.map` + megatron-core's builder).

What is measured: end-to-end wall time to turn a generated ~50 MB alpaca-style parquet file into the three
`PREFIX_packed_*_document` .bin/.idx pairs with the embedded Qwen1.5 tokenizer and ModelLink's alpaca template,
at 1 and 2 worker processes, for both tools in the same run. Reported as tokens/s (tokens written / wall seconds).

The baseline does what ModelLink's preprocess_data.py does, with the faster batched form of `map`: `load_dataset`
of the parquet, `Dataset.map(batched=True, num_proc=N)` calling a `transformers` fast tokenizer (the same vocabulary)
on the prompt and the response separately, then megatron-core's `IndexedDatasetBuilder` writing each sample. Both
tools tokenize single-threaded per process (TOKENIZERS_PARALLELISM=false), so N workers means N cores. The outputs
of the two tools are compared byte for byte, so the comparison is between equal work.

Run: python benchmarks/bench_preprocess.py [--size-mb 50] [--workers 1 2] [--keep DIR]
Not a test: timings on a shared machine are noisy; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import re
import resource

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported anywhere

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from qwenlink.data.templates import AlpacaTemplate  # noqa: E402
from qwenlink.tokenizer import load_tokenizer  # noqa: E402

KEYS = ("input_ids", "attention_mask", "labels")


def generate_alpaca_parquet(path: Path, size_mb: float, seed: int = 0) -> int:
    """Alpaca records with English-like text from a fixed pseudo-vocabulary; returns the number of records."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ren", "sto", "a", "e", "in", "qu", "tor", "ly", "ment", "ing", "the", "and",
                 "pro", "com", "ver", "al", "is", "un", "der", "for", "ex", "ter", "ous", "ble", "tion", "o", "ra"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(3000)]
    words += ["the", "a", "of", "to", "and", "in", "is", "that", "for", "it", "with", "as", "was", "on"] * 40
    words = np.array(words)
    punct = np.array([" ", " ", " ", " ", " ", " ", ", ", ". ", "\n"])

    def text(n: int) -> str:
        w = rng.choice(words, size=n)
        sep = rng.choice(punct, size=n)
        return "".join(np.char.add(w, sep).tolist()).strip()

    rows, total = [], 0
    target = size_mb * 1e6
    while total < target:
        rec = {"instruction": text(int(rng.integers(8, 30))),
               "input": text(int(rng.integers(5, 60))) if rng.random() < 0.4 else "",
               "output": text(int(rng.integers(40, 300)))}
        total += sum(len(v.encode()) for v in rec.values())
        rows.append(rec)
    # Uncompressed, so "a 50 MB parquet" means 50 MB of text on disk as well.
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4096, compression="none")
    return len(rows)


def _child_cpu() -> float:
    """User + system CPU seconds of all finished child processes and their waited-for descendants."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_qwenlink(src: Path, prefix: Path, workers: int) -> tuple[float, float, float]:
    """The real command line, in a fresh interpreter: (wall s incl. start-up, job s, CPU s of all its processes)."""
    cmd = [sys.executable, "-m", "qwenlink.cli", "preprocess", "--input", str(src), "--output-prefix", str(prefix),
           "--handler", "alpaca", "--template", "alpaca", "--append-eod", "--workers", str(workers)]
    t0, c0 = time.perf_counter(), _child_cpu()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    wall, cpu = time.perf_counter() - t0, _child_cpu() - c0
    # Summary line: "... tokens in 12.3s (...)": timed from the first read (workers already spawning) to the end.
    job = float(re.search(r" in ([0-9.]+)s ", out).group(1))
    return wall, job, cpu


def _baseline_job(src: str, prefix: str, workers: int, cache: str) -> None:
    """What ModelLink does: datasets.load_dataset -> Dataset.map(tokenize) -> IndexedDatasetBuilder per sample."""
    import datasets
    import torch
    from transformers import PreTrainedTokenizerFast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    datasets.disable_progress_bars()
    tok = load_tokenizer("default")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.hf)
    eos = tok.eos_id
    template = AlpacaTemplate()

    def tokenize(batch: dict) -> dict:
        prompts, responses = [], []
        for ins, inp, out in zip(batch["instruction"], batch["input"], batch["output"]):
            segs = template.render_alpaca(ins, inp, out)  # [system, user prompt, response]
            prompts.extend(s.text for s in segs[:-1])
            responses.append(segs[-1].text)
        p_ids = hf_tok(prompts, add_special_tokens=False)["input_ids"]
        r_ids = hf_tok(responses, add_special_tokens=False)["input_ids"]
        input_ids, labels = [], []
        for i, r in enumerate(r_ids):
            prompt = p_ids[2 * i] + p_ids[2 * i + 1]
            input_ids.append(prompt + r + [eos])
            labels.append([-100] * len(prompt) + r + [eos])
        return {"input_ids": input_ids, "attention_mask": [[1] * len(x) for x in input_ids], "labels": labels}

    t0 = time.perf_counter()
    ds = datasets.load_dataset("parquet", data_files=src, split="train", cache_dir=cache)
    ds = ds.map(tokenize, batched=True, batch_size=1000, num_proc=workers if workers > 1 else None,
                remove_columns=ds.column_names, load_from_cache_file=False)
    dtype = DType.optimal_dtype(tok.vocab_size)
    builders = {k: IndexedDatasetBuilder(f"{prefix}_packed_{k}_document.bin", dtype=dtype) for k in KEYS}
    for row in ds.with_format("numpy").iter(batch_size=1000):
        for k in KEYS:
            for arr in row[k]:
                builders[k].add_item(torch.from_numpy(np.asarray(arr)))
                builders[k].end_document()
    for k in KEYS:
        builders[k].finalize(f"{prefix}_packed_{k}_document.idx")
    print(f"job seconds: {time.perf_counter() - t0:.3f}")


def run_baseline(src: Path, prefix: Path, workers: int, cache: Path) -> tuple[float, float, float]:
    """(wall s incl. interpreter start-up and imports, s from load_dataset to the last finalize, CPU s)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_preprocess as b; "
            f"b._baseline_job({str(src)!r}, {str(prefix)!r}, {workers}, {str(cache)!r})")
    t0, c0 = time.perf_counter(), _child_cpu()
    out = subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True).stdout
    wall, cpu = time.perf_counter() - t0, _child_cpu() - c0
    return wall, float(re.search(r"job seconds: ([0-9.]+)", out).group(1)), cpu


def count_tokens(prefix: Path) -> int:
    from qwenlink.data.indexed import IndexedDataset
    return IndexedDataset(f"{prefix}_packed_input_ids_document").num_tokens


def same_files(a: Path, b: Path) -> bool:
    return all(Path(f"{a}_packed_{k}_document{ext}").read_bytes() == Path(f"{b}_packed_{k}_document{ext}").read_bytes()
               for k in KEYS for ext in (".bin", ".idx"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=50.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--keep", default=None, help="work in this directory and keep it")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "alpaca.parquet"
        load_tokenizer("default")  # builds the cached tokenizer.json once, outside the timings
        n = generate_alpaca_parquet(src, args.size_mb)
        print(f"input: {src.stat().st_size / 1e6:.1f} MB parquet, {n:,} alpaca records "
              f"({args.size_mb:.0f} MB of text); cpus: {os.cpu_count()}")
        print("| tool | workers | wall s (incl. start-up) | job s | tokens/s (job) | speed-up (job) "
              "| CPU s (all processes) | tokens per CPU s | load avg before | identical output |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for w in args.workers:
            q, b = work / f"q{w}", work / f"b{w}"
            load_b = os.getloadavg()[0]
            wb, jb, cb = run_baseline(src, b, w, work / "hf-cache")
            load_q = os.getloadavg()[0]
            wq, jq, cq = run_qwenlink(src, q, w)
            tokens = count_tokens(q)
            same = same_files(q, b)
            print(f"| HF datasets.map + megatron-core builder | {w} | {wb:.1f} | {jb:.1f} | {tokens / jb:,.0f} "
                  f"| 1.00x | {cb:.1f} | {tokens / cb:,.0f} | {load_b:.1f} | |")
            print(f"| qwenlink preprocess | {w} | {wq:.1f} | {jq:.1f} | {tokens / jq:,.0f} | {jb / jq:.2f}x "
                  f"| {cq:.1f} | {tokens / cq:,.0f} | {load_q:.1f} | {same} |")
            sys.stdout.flush()
        print(f"tokens written per run: {tokens:,}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

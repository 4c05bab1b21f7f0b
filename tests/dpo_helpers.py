"""Preference-pair datasets for the DPO tests, written as `preprocess --handler pairwise` writes them (the four
`PREFIX_packed_{chosen,rejected}_{input_ids,labels}_document` files) over the test-tiny vocabulary (320 ids)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwenlink.data.indexed import IndexedDatasetWriter
from qwenlink.data.pairwise import PAIR_KEYS


def write_pairs(root: Path, pairs: int = 24, seed: int = 0) -> str:
    """Random prompts (2-5 ids, labels -100) with a chosen and a rejected reply (1-7 ids each); returns the prefix."""
    rng = np.random.default_rng(seed)
    prefix = str(Path(root) / "pairs")
    writers = {k: IndexedDatasetWriter(f"{prefix}_packed_{k}_document", np.int32) for k in PAIR_KEYS}
    for w in writers.values():
        w.__enter__()
    for _ in range(pairs):
        prompt = rng.integers(2, 300, int(rng.integers(2, 6))).tolist()
        for side in ("chosen", "rejected"):
            reply = rng.integers(2, 300, int(rng.integers(1, 8))).tolist()
            writers[f"{side}_input_ids"].add_document(prompt + reply)
            writers[f"{side}_labels"].add_document([-100] * len(prompt) + reply)
    for w in writers.values():
        w.__exit__(None, None, None)
    return prefix


def dpo_args(prefix: str, out: Path, init: str = "", *extra: str) -> list[str]:
    """`qwenlink train` arguments of a 4-step DPO job on the tiny model (2 micro batches of 1 pair per rank)."""
    model = [f"--model.init_from={init}"] if init else ["--model.preset=test-tiny"]
    return [*model, "--job.mode=dpo", f"--data.path={prefix}", "--data.seq_length=16", "--data.pad_id=0",
            "--train.micro_batch_size=1", "--train.global_batch_size=4", "--train.train_iters=4",
            "--train.device=cpu", "--optim.lr=1e-2", "--optim.warmup_iters=1", "--optim.implementation=foreach",
            f"--job.output_dir={out}", "--metrics.tensorboard=false", "--metrics.progress=lines", *extra]

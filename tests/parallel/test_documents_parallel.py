"""Documents (data.reset_attention_mask / reset_position_ids) under tensor + sequence parallelism with activation
checkpointing: the attention sees the whole sequence after sequence parallelism's all-gather, so the documents and
positions of the whole sequence apply; losses equal one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common import write_counting_corpus


def _train(corpus: str, out: Path, *extra: str, nproc: int | None = None) -> dict[int, float]:
    args = ["train", "--model.preset=test-tiny", f"--data.path={corpus}", "--data.seq_length=48",
            "--data.reset_attention_mask=true", "--data.reset_position_ids=true", "--data.eod_id=10",
            "--train.micro_batch_size=2", "--train.global_batch_size=4", "--train.train_iters=3",
            "--train.device=cpu", "--optim.lr=1e-3", "--optim.implementation=foreach", "--job.seed=3",
            f"--job.output_dir={out}", "--metrics.tensorboard=false", "--metrics.progress=lines",
            "--metrics.log_interval=1", "--checkpoint.save_final=false", *extra]
    cmd = [sys.executable, "-m", "qwenlink.cli", *args] + ([f"--nproc={nproc}"] if nproc else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_documents_at_tp2_sequence_parallel_with_checkpointing_equal_one_process(tmp_path) -> None:
    corpus = write_counting_corpus(tmp_path / "corpus", 80)
    single = _train(corpus, tmp_path / "single")
    parallel = _train(corpus, tmp_path / "tp2", "--parallel.tp=2", "--parallel.sequence_parallel=true",
                      "--train.activation_checkpoint=full", nproc=2)
    assert sorted(single) == sorted(parallel) == [1, 2, 3]
    for step in single:
        assert abs(parallel[step] - single[step]) <= 1e-5 * abs(single[step]), (step, parallel, single)

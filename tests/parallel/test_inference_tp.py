"""Tensor-parallel generation under torchrun: every rank holds a shard, rank 0 prints exactly what one process does."""

from __future__ import annotations

import os
import subprocess
import sys


def test_tp2_generate_equals_single_process(tiny_fixture_hf):
    args = ["generate", "--model", str(tiny_fixture_hf), "--prompt", "hello world", "--prompt", "The capital of",
            "--max-new-tokens", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for sampling in (["--greedy"], ["--temperature", "0.9", "--top-p", "0.95", "--seed", "3"]):
        single = subprocess.run([sys.executable, "-m", "qwenlink.cli", *args, *sampling], capture_output=True,
                                text=True, env=env, timeout=120)
        assert single.returncode == 0, single.stderr
        tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "qwenlink.cli", *args, *sampling], capture_output=True, text=True, env=env,
                            timeout=180)
        assert tp.returncode == 0, tp.stderr[-3000:]
        assert tp.stdout == single.stdout


def test_tp2_eval_equals_single_process(tiny_fixture_hf, tmp_path):
    """MMLU scoring with the model sharded over two processes gives the same log-likelihoods and predictions."""
    import json

    from common import fixture_dir

    data = fixture_dir("mmlu", "data")
    args = ["eval", "--model", str(tiny_fixture_hf), "--data", str(data), "--subjects", "anatomy,virology",
            "--limit", "4", "--shots", "2", "--log-samples"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    single = subprocess.run([sys.executable, "-m", "qwenlink.cli", *args, "--output", str(tmp_path / "one.json")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert single.returncode == 0, single.stderr
    tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                         "-m", "qwenlink.cli", *args, "--output", str(tmp_path / "tp.json")], capture_output=True,
                        text=True, env=env, timeout=180)
    assert tp.returncode == 0, tp.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "tp.json"))
    assert len(one["samples"]) == len(two["samples"]) == 8
    for a, b in zip(one["samples"], two["samples"]):
        assert a["prediction"] == b["prediction"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4

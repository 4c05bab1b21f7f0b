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

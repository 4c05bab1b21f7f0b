"""`qwenlink train --nproc 2` where one rank hits a data error: the last line names that rank and its own message,
exit 2 (a user error, as in one process), not rank 0's gloo "Connection closed by peer" with exit 1.

The error is planted on rank 1 alone by a sitecustomize module on the ranks' PYTHONPATH (no hook in qwenlink): its
batch reader raises the QwenlinkError a corrupt document raises, at the first step, while rank 0 waits in that step's
collectives and so fails a moment later with the peer's connection reset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from reliability_helpers import job_overrides

PLANTED = "count_text_document.bin: document 7 is corrupt (planted on rank 1)"

SITECUSTOMIZE = f'''
import os
if os.environ.get("RANK") == "1":
    from qwenlink.errors import QwenlinkError
    from qwenlink.train import data

    def next(self):
        raise QwenlinkError({PLANTED!r})

    data.MicroBatchStream.next = next
'''


def test_the_rank_that_failed_first_is_named_with_its_message(corpus: str, tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "qwenlink.cli", "train", *job_overrides(corpus, tmp_path / "run"), "--nproc=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last.startswith("qwenlink train: error: rank 1 (pid "), proc.stderr[-3000:]
    assert f"failed first: {PLANTED} (torchrun stopped the other ranks)" in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]

"""examples/slurm/train.sbatch builds the documented multi-node torchrun command from SLURM's environment (run with
stand-ins for srun / scontrol that record what they were asked; the command itself runs for real, on two "nodes" of
this machine, in test_trainer_parallel.py::test_two_nodes_tp2_dp2_equal_single_process)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from common import REPO

SCRIPT = REPO / "examples" / "slurm" / "train.sbatch"


def _stand_ins(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 9\n"
                                      "printf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > {log}\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)


def _run(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "srun.args"
    _stand_ins(tmp_path / "bin", log)
    environ = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
               "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8", **env}
    for knob in ("PYTHON", "NPROC_PER_NODE", "RDZV_PORT"):
        if knob not in env:
            environ.pop(knob, None)
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, timeout=30)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_sbatch_launches_torchrun_on_every_node_with_c10d_rendezvous_on_the_first(tmp_path):
    proc, argv = _run(tmp_path, "configs/qwen1.5-32b-pretrain.toml", "--train.train_iters=10")
    assert proc.returncode == 0, proc.stderr
    assert argv == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "python3", "-m", "torch.distributed.run",
                    "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "gpu-node-07:29500", "--rdzv-id", "4242", "-m", "qwenlink.cli", "train",
                    "--config", "configs/qwen1.5-32b-pretrain.toml", "--train.train_iters=10"]
    assert "2 node(s) x 8 process(es), rendezvous gpu-node-07:29500, job 4242" in proc.stdout


def test_sbatch_knobs_and_usage(tmp_path):
    proc, argv = _run(tmp_path, "job.toml", PYTHON="/opt/venv/bin/python", NPROC_PER_NODE="4", RDZV_PORT="29600")
    assert proc.returncode == 0, proc.stderr
    assert argv[2] == "/opt/venv/bin/python" and argv[argv.index("--nproc-per-node") + 1] == "4"
    assert argv[argv.index("--rdzv-endpoint") + 1] == "gpu-node-07:29600"
    (tmp_path / "no-args").mkdir()
    proc, argv = _run(tmp_path / "no-args")
    assert proc.returncode == 2 and "usage: sbatch" in proc.stderr and argv == []

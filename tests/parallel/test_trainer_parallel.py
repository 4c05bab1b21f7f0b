"""`qwenlink train` under torchrun: layouts equal one process, checkpoints resume under another layout, bad layouts
are refused before any process starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import write_counting_corpus

LAYERS = 4


@pytest.fixture(scope="module")
def corpus(data_prefix, init_dir) -> tuple[str, str]:
    return data_prefix, init_dir


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory) -> str:
    return write_counting_corpus(tmp_path_factory.mktemp("corpus"), 80)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> str:
    """Initial weights shared by every run (random init differs between layouts; training must not)."""
    import dataclasses

    from qwenlink.checkpoint.hf import save_hf_model
    from qwenlink.models.presets import get_preset
    from qwenlink.models.qwen2 import build_model

    config = dataclasses.replace(get_preset("test-tiny"), num_hidden_layers=LAYERS)
    path = tmp_path_factory.mktemp("init") / "hf"
    save_hf_model(build_model(config, seed=7), path)
    return str(path)


def _args(corpus: tuple[str, str], out: Path, *extra: str) -> list[str]:
    corpus, init = corpus
    return ["train", f"--model.init_from={init}", f"--data.path={corpus}", "--data.seq_length=16", "--train.micro_batch_size=1",
            "--train.global_batch_size=4", "--train.train_iters=4", "--train.device=cpu", "--optim.lr=1e-3",
            "--optim.min_lr=1e-4", "--optim.warmup_iters=1", "--optim.implementation=foreach",
            f"--job.output_dir={out}", "--metrics.tensorboard=false", "--metrics.progress=lines",
            "--metrics.log_interval=1", "--checkpoint.interval=2", *extra]


def _run(args: list[str], nproc: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qwenlink.cli", *args] + ([f"--nproc={nproc}"] if nproc else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def single_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    result = _run(_args(corpus, out, f"--checkpoint.export_hf={out / 'hf'}"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single(single_run) -> dict[int, float]:
    return _losses(single_run)


def _close(a: dict[int, float], b: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(b[step]), f"step {step}: {a[step]} vs {b[step]}"


@pytest.mark.parametrize("layout, nproc", [(["--parallel.tp=2", "--train.activation_checkpoint=full"], 2),
                                           (["--parallel.pp=2"], 2), ([], 2), (["--parallel.tp=2"], 4),
                                           (["--parallel.tp=2", "--parallel.sequence_parallel=false"], 2)],
                         ids=["tp2-activation-checkpointing", "pp2", "dp2-fsdp", "tp2-dp2", "tp2-no-sp"])
def test_train_command_under_layout_equals_single_process(corpus, single, single_run, tmp_path, layout, nproc):
    """Losses per step, the final checkpoint and the HF export (streamed from every stage and shard) match one
    process."""
    from export_helpers import hf_tensors

    out = tmp_path / "run"
    result = _run(_args(corpus, out, *layout, f"--checkpoint.export_hf={out / 'hf'}"), nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    _close(_losses(out), single, range(1, 5))
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    ours, ref = hf_tensors(out / "hf"), hf_tensors(single_run / "hf")  # under pp one file per stage + the index
    assert ours.keys() == ref.keys()
    for name in ref:
        assert (ours[name] - ref[name]).abs().max() <= 1e-5, name


def test_checkpoint_resumes_under_other_layouts(corpus, single, tmp_path):
    """Save at tp2 x pp2 (steps 2 and 4), resume from step 2 at dp4 (FSDP) and at pp4: the losses of steps 3 and 4
    equal the uninterrupted single-process run."""
    import shutil

    first = tmp_path / "first"
    result = _run(_args(corpus, first, "--parallel.tp=2", "--parallel.pp=2"), nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    _close(_losses(first), single, [1, 2, 3, 4])
    for name, layout in (("dp4", []), ("pp4", ["--parallel.pp=4"])):
        out = tmp_path / name
        shutil.copytree(first / "checkpoints", out / "checkpoints")
        shutil.rmtree(out / "checkpoints" / "step_00000004")
        (out / "checkpoints" / "latest").write_text("step_00000002\n")
        result = _run(_args(corpus, out, *layout), nproc=4)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resumed from" in result.stdout and "step 2" in result.stdout
        _close(_losses(out), single, [3, 4])


@pytest.mark.parametrize("override,reason", [
    ("--parallel.tp=3", "tp 3 does not divide num_attention_heads 4"),
    ("--parallel.pp=3", "4 layers are not divisible by pp (3) x vpp (1)"),
    ("--parallel.tp=4", "tp 4 does not divide num_key_value_heads 2"),
])
def test_bad_layouts_are_refused_before_launch(corpus, tmp_path, override, reason):
    nproc = int(override.split("=")[1])
    result = _run(_args(corpus, tmp_path / "run", override), nproc=nproc, timeout=60)
    assert result.returncode == 2
    assert reason in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_world_size_must_match_layout(corpus, tmp_path):
    result = _run(_args(corpus, tmp_path / "run", "--parallel.tp=2", "--parallel.pp=2"), nproc=2, timeout=60)
    assert result.returncode == 2 and "needs 4 processes" in result.stderr


@pytest.mark.parametrize("layout", [["--parallel.tp=2"], ["--parallel.pp=2"]], ids=["tp2", "pp2"])
def test_lora_training_under_layout_equals_single_process(corpus, tmp_path, layout):
    """LoRA (adapters on q/k/v/o/gate/up/down + lm_head saved) trains the same under tp2 / pp2 as on one process,
    and the exported PEFT adapters agree."""
    from safetensors.torch import load_file

    lora = ["--lora.enabled=true", "--lora.r=4", "--lora.alpha=8", "--lora.target_modules=[\"all-linear\"]",
            "--lora.modules_to_save=[\"lm_head\"]", "--optim.lr=1e-2"]
    runs = {}
    for name, nproc, extra in (("single", None, []), ("parallel", 2, layout)):
        out = tmp_path / name
        result = _run(_args(corpus, out, *lora, *extra, f"--lora.export_adapter={out / 'adapter'}"), nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = out
    _close(_losses(runs["parallel"]), _losses(runs["single"]), range(1, 5))
    ours = load_file(runs["parallel"] / "adapter" / "adapter_model.safetensors")
    ref = load_file(runs["single"] / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == ref.keys() and any("lora_B" in k for k in ref)
    for name in ref:
        assert (ours[name] - ref[name]).abs().max() <= 1e-5, name


def test_preset_without_init_from_trains_the_same_at_tp2(corpus, tmp_path):
    """No shared initial weights: the layout-independent initialisation alone makes tp2 equal one process."""
    data, _ = corpus
    runs = {}
    for name, nproc, extra in (("single", None, []), ("tp2", 2, ["--parallel.tp=2"])):
        out = tmp_path / name
        args = [a for a in _args((data, ""), out, *extra) if not a.startswith("--model.init_from")]
        result = _run([*args, "--model.preset=test-tiny"], nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = _losses(out)
    _close(runs["tp2"], runs["single"], range(1, 5))


def test_pp2_sft_with_varying_lengths_equals_single_process(corpus, tmp_path):
    """SFT pads each step to its own longest sample; pipeline stages fix their shapes at the first step, so under
    pp every step is padded to data.seq_length (steps whose lengths differ used to kill a rank)."""
    import numpy as np

    from qwenlink.data.indexed import IndexedDatasetWriter

    _, init = corpus
    prefix = tmp_path / "sft"
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(f"{prefix}_packed_input_ids_document", np.int32) as ids, \
            IndexedDatasetWriter(f"{prefix}_packed_labels_document", np.int32) as labels, \
            IndexedDatasetWriter(f"{prefix}_packed_attention_mask_document", np.int32) as mask:
        for n in rng.integers(2, 16, 32):
            sample = rng.integers(2, 300, int(n)).tolist()
            ids.add_document(sample)
            labels.add_document([-100] * (len(sample) // 2) + sample[len(sample) // 2:])
            mask.add_document([1] * len(sample))
    runs = {}
    for name, nproc, extra in (("single", None, []), ("pp2", 2, ["--parallel.pp=2"])):
        out = tmp_path / name
        args = [a for a in _args((str(prefix), init), out, *extra) if not a.startswith("--checkpoint.interval")]
        result = _run([*args, "--job.mode=sft", "--data.pad_id=0", "--data.shuffle=false"], nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = _losses(out)
    _close(runs["pp2"], runs["single"], range(1, 5))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_tp2_dp2_equal_single_process(corpus, single, tmp_path):
    """The documented multi-node launch (docs/parallel.md, examples/slurm/train.sbatch), two "nodes" on this machine:
    torchrun --nnodes 2 --node-rank 0|1 with c10d rendezvous, 2 processes each, tp2 x dp2 across them. Losses per
    step equal one process; both nodes write the one (shared) run directory."""
    out = tmp_path / "run"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
               "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "two-nodes", "-m", "qwenlink.cli", *_args(corpus, out, "--parallel.tp=2")]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    assert "2 data-parallel rank(s)" in outputs[0][0]  # rank 0 (node 0) logs; tp2 x dp2 over the 4 processes
    _close(_losses(out), single, range(1, 5))
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").is_file()

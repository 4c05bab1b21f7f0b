"""HF and adapter export under torchrun (gloo, 2 processes): every layout writes bitwise what one process writes, each
rank holds its own stage of the model while exporting and its own shards while loading, and a failed write on one
rank leaves nothing behind. One launch runs every case (train/export.py streams; nothing is gathered to rank 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import heap_bytes
from common import write_counting_corpus
from export_helpers import (assert_same_adapter, assert_same_hf, hf_tensors, lora_args, lora_config, reference_adapter,
                            reference_hf, tokenizer_dir, write_init)

WORKER = Path(__file__).with_name("export_worker.py")
# (name, tied, layout args, LoRA modules_to_save or None)
CASES = [
    ("tp2-activation-checkpointing", False, ["--parallel.tp=2", "--train.activation_checkpoint=full"], None),
    ("pp2-tied", True, ["--parallel.pp=2"], None),
    ("pp2", False, ["--parallel.pp=2"], None),
    ("pp2-vpp2-tied", True, ["--parallel.pp=2", "--parallel.vpp=2", "--parallel.schedule=interleaved-1f1b"], None),
    ("dp2-fsdp", False, [], None),
    ("lora-tp2", False, ["--parallel.tp=2"], "lm_head"),
    ("lora-pp2-tied", True, ["--parallel.pp=2"], "embed_tokens"),
]
FAIL = ("pp2-write-fails-on-rank-1", False, ["--parallel.pp=2"], None)
# Held beyond the tensors themselves: Python objects, safetensors' header, a gathered parameter (<= 1 MB here).
SLACK = 3 * 2**20

pytestmark = pytest.mark.skipif(not heap_bytes.AVAILABLE, reason="host bytes are counted with glibc's mallinfo2")


@pytest.fixture(scope="module")
def inits(tmp_path_factory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("init")
    return {tied: write_init(root / ("tied" if tied else "untied"), tied) for tied in (False, True)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, inits) -> Path:
    out = tmp_path_factory.mktemp("export")
    corpus = write_counting_corpus(tmp_path_factory.mktemp("corpus"), 40)
    base = [f"--data.path={corpus}", f"--data.tokenizer={tokenizer_dir()}", "--data.seq_length=16",
            "--train.micro_batch_size=1", "--train.global_batch_size=4", "--train.train_iters=1", "--train.device=cpu",
            "--metrics.tensorboard=false", "--metrics.progress=lines"]
    cases = [{"name": name, "args": [f"--model.init_from={inits[tied]}", *layout,
                                     *(lora_args(saved) if saved else [])],
              "lora": saved is not None, "fail_rank": 1 if name == FAIL[0] else None}
             for name, tied, layout, saved in [*CASES, FAIL]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), str(out),
           json.dumps({"base": base, "cases": cases})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    (out / "stderr.txt").write_text(result.stderr)  # the whole log of a failed launch (the assertion shows its tail)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _records(runs: Path, name: str) -> list[dict]:
    return [json.loads((runs / name / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def references(tmp_path_factory, inits) -> dict[tuple[bool, str | None], Path]:
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for _, tied, _, saved in CASES:
        key = (tied, saved)
        if key not in out:
            out[key] = reference_hf(inits[tied], root / f"{tied}-{saved}", lora_config(saved) if saved else None)
    return out


@pytest.mark.parametrize("name, tied, layout, saved", CASES, ids=[c[0] for c in CASES])
def test_export_under_layout_is_what_one_process_writes(runs, inits, references, tmp_path, name, tied, layout, saved):
    """Same tensors bit for bit, same names, config, generation config and tokenizer; for LoRA the merged model and
    the PEFT adapter (with the tied head saved under both names where the embedding is trained)."""
    assert_same_hf(runs / name / "hf", references[(tied, saved)])
    if saved:
        assert_same_adapter(runs / name / "adapter", reference_adapter(inits[tied], tmp_path / "a", lora_config(saved)))
    leftovers = [p.name for p in (runs / name).iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_stage_shards_load_in_transformers(runs, references):
    """pp2 writes one file per stage plus the index; transformers loads the directory to the same weights (the tied
    head from the embedding)."""
    transformers = pytest.importorskip("transformers")
    directory = runs / "pp2-tied" / "hf"
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    model = transformers.Qwen2ForCausalLM.from_pretrained(directory)
    want = hf_tensors(references[(True, None)])
    got = model.state_dict()
    assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()
    for name, tensor in want.items():
        assert got[name].equal(tensor), name


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_export_holds_one_stage_not_the_model(runs, name):
    """Counted in bytes held (mallinfo2, sampled at each safetensors write and in between): every rank's host memory
    grows by at most its own pipeline stage's share of the model while exporting; gathering every rank's state
    dict to rank 0 held world_size x the model there (and a full CPU copy on top)."""
    for record in _records(runs, name):
        bound = 1.25 * record["stage_bytes"] + SLACK
        assert record["export_growth"] <= bound, \
            f"rank {record['rank']}: export grew host memory by {record['export_growth'] / 2**20:.1f} MiB; its stage " \
            f"holds {record['stage_bytes'] / 2**20:.1f} MiB"


@pytest.mark.parametrize("name", ["pp2-tied", "pp2-vpp2-tied", "lora-tp2", "lora-pp2-tied", "dp2-fsdp"])
def test_loading_init_from_holds_own_shards(runs, name):
    """Building the trainer (meta -> shard -> materialise -> load_into from the HF directory) grows each rank's host
    memory by its own shards, not by a full fp32 model as LoRA and tied-across-stage runs once built on every rank."""
    for record in _records(runs, name):
        bound = 1.25 * record["local_bytes"] + SLACK
        assert record["load_growth"] <= bound, \
            f"rank {record['rank']}: loading grew host memory by {record['load_growth'] / 2**20:.1f} MiB; its " \
            f"shards hold {record['local_bytes'] / 2**20:.1f} MiB"


def test_a_failed_write_on_one_rank_leaves_nothing(runs):
    """Rank 1 (the second stage's writer) cannot write: every rank stops with the same one-line error, and neither
    the directory nor the staging directory is left."""
    name = FAIL[0]
    errors = [record["error"] for record in _records(runs, name)]
    assert all(e and "nothing was written" in e and "\n" not in e for e in errors), errors
    assert "No space left on device" in errors[1]
    assert sorted(p.name for p in (runs / name).iterdir() if p.name != "run") == ["rank0.json", "rank1.json"]

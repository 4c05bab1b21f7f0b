"""Expert parallelism (parallel/experts.py): a Qwen1.5-MoE's routed experts split over ep ranks, tokens exchanged by
all-to-all, trains exactly like one process.

- ep2 x dp2 (dp_shard 4: the experts FSDP2-sharded over the 2 dp ranks ep leaves), ep4 (every dp rank an ep rank:
  the experts' FSDP2 mesh has one rank), ep2 under HSDP (dp_replicate 2 x dp_shard 2 = ep) and ep2 x dp2 with
  activation checkpointing (the all-to-all recomputed in backward), with the experts' loop instead of the grouped
  GEMM, and with a router that sends every token to one ep rank's experts give one process's LM and aux losses,
  tokens per expert, gradient norms and final weights (1e-5), in one 4-process launch; so do ep2 x tp2 and tp2 x dp2
  (attention and the shared expert split by tp with sequence parallelism, routed experts by ep or replicated). Without the experts' 1 / ep gradient scale
  the weights are 1.7e-4 off, so the comparison decides the scaling; so do pp2 x dp2 and ep2 x pp2 (1F1B, the aux
  loss from routing totals carried through the pipeline, train/moe.py RoutingCarry), the latter on right-padded rows,
  pp2 x vpp2 interleaved, and ep2 x dp2 with LoRA adapters on the experts (sharded with them);
- the step on fake CUDA tensors (bf16 grouped GEMM, all-to-all on the device, no other host synchronisation), also
  under pp;
- `qwenlink train` at ep2 and at ep2 x pp2 gives one process's losses and HF export, and the ep2 step-2 checkpoint
  resumes at ep1 with the uninterrupted run's losses (DCP reshards the experts' Shard(0));
- bad layouts are refused before launch, in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import write_counting_corpus
from expert_reference import make_moe_config, reference_run

from qwenlink.errors import QwenlinkError
from qwenlink.models.presets import get_preset
from qwenlink.parallel.mesh import ParallelPlan, validate_plan
from qwenlink.train.config import load_config, parallel_plan

WORKER = Path(__file__).resolve().parent / "expert_layout_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

RUNS = {
    "ep2-dp2": dict(layout=dict(dp_shard=4, ep=2)),
    "ep4": dict(layout=dict(dp_shard=4, ep=4)),
    "ep2-hsdp-replicate2": dict(layout=dict(dp_shard=2, dp_replicate=2, ep=2)),
    "ep2-dp2-checkpointing": dict(layout=dict(dp_shard=4, ep=2), ac=True, micro_batch=2),
    "ep2-dp2-loop": dict(layout=dict(dp_shard=4, ep=2), impl="loop"),  # the experts' loop over host counts
    # every token on experts 5 and 6 at first: ep rank 0 receives no row (empty all-to-all parts, empty GEMMs).
    # Seed 5: a router that starts at zeros routes by near-ties after its first updates, so at seeds 3 and 7 the
    # layouts' summation orders (~1e-7) send one token to another expert at step 3 (seeds 4-6 route identically).
    "ep2-dp2-one-rank-busy": dict(layout=dict(dp_shard=4, ep=2), router="zeros", seed=5),
    # MoE under tensor (+ sequence) parallelism: attention and the shared expert split over tp, the routed experts
    # by ep (or replicated), the router's and experts' FSDP2-only gradients counted once in the norm (without that,
    # the norm is 1.7e-3 off). Seed 5: at seed 3 tp's other summation order, amplified by AdamW's g / (|g| + eps)
    # for the experts' smallest gradients, leaves 8.9e-6 of the 1e-5 (4.4e-6 at seed 5).
    "ep2-tp2": dict(layout=dict(dp_shard=2, ep=2, tp=2), seed=5),
    "tp2-dp2": dict(layout=dict(dp_shard=2, tp=2), seed=5),
    # MoE under pipeline parallelism: a stage per sparse layer, aux from routing totals carried from stage to stage
    # (train/moe.py RoutingCarry; without its gradient back to stage 0's router the weights are 5.6e-3 off). ep2 x pp2
    # also on right-padded SFT rows narrower than the pipeline's seq_length: the pads it adds stay out of aux.
    "pp2-dp2": dict(layout=dict(dp_shard=2, pp=2)),
    "ep2-pp2-padded": dict(layout=dict(dp_shard=2, pp=2, ep=2), padded=True),
    # two chunks per pipeline rank (4 layers), the carry crossing ranks three times
    "pp2-vpp2-interleaved": dict(layout=dict(dp_shard=2, pp=2, vpp=2, schedule="interleaved-1f1b"), layers=4),
    # LoRA on attention and on the routed (and shared) experts: A and B sharded with their experts (1e-4 off without
    # the adapters' 1 / ep gradient scale)
    "ep2-dp2-lora-experts": dict(layout=dict(dp_shard=4, ep=2), lora=dict(
        r=4, alpha=8, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])),
}


def _spec(run: dict) -> dict:
    return {"seed": 3, "global_batch": 8, "micro_batch": 1, "seq": 16, **run}


@pytest.fixture(scope="module")
def four_process_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ep_layouts")
    runs = {name: _spec(run) for name, run in RUNS.items()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(WORKER), str(out),
           json.dumps(runs)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_expert_parallel_layout_equals_one_process(four_process_runs, name) -> None:
    got = torch.load(four_process_runs / name / "result.pt", weights_only=True)
    ref_losses, ref_state = reference_run(_spec(RUNS[name]))
    for step, ((loss, aux, load, norm), (ref_loss, ref_aux, ref_load, ref_norm)) in enumerate(
            zip(got["losses"], ref_losses)):
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm, f"step {step}: gradient norm {norm} vs one process {ref_norm}"
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), f"step {step}: loss {loss} vs one process {ref_loss}"
        assert abs(aux - ref_aux) <= 1e-5 * abs(ref_aux), f"step {step}: aux {aux} vs one process {ref_aux}"
        assert load == ref_load, f"step {step}: tokens per expert {load} vs one process {ref_load}"
    assert got["state"].keys() == ref_state.keys()
    for key, tensor in got["state"].items():
        assert tensor.shape == ref_state[key].shape, key  # the experts come back whole: [E, out, in]
        assert (tensor - ref_state[key]).abs().max().item() <= 1e-5, key


# ---- the GPU path, on fake CUDA tensors ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [["--parallel.ep=2"], ["--parallel.ep=2", "--parallel.pp=2"]],
                         ids=["ep2-dp2", "ep2-pp2"])
def test_expert_parallel_step_on_fake_cuda(layout) -> None:
    """ep2 x dp2 and ep2 x pp2 in bf16 on fake CUDA devices (qwenlink.train.simulate; rank 3: under pp the last
    stage, whose loss reads the routing totals carried from stage 0): the grouped GEMM, rows exchanged with
    all-to-all on device tensors, and no host synchronisation besides the counts' copy, which a fake tensor cannot
    make (it has no values: the simulation assumes a balanced router there, parallel/experts.py)."""
    from qwenlink.parallel.simulate import SimulationError, stand_in_library
    from qwenlink.train.simulate import simulate_training

    if torch.version.cuda is not None and not torch.cuda.is_available():
        pytest.skip("a CUDA build of torch without a visible GPU has no room for the fake CUDA runtime")
    try:
        stand_in_library("cuda")
    except SimulationError as exc:
        pytest.skip(str(exc))
    cfg = load_config(None, [*MODEL, "--data.path=unused", "--data.seq_length=16", "--train.micro_batch_size=1",
                             "--train.global_batch_size=8", "--train.device=cuda", "--optim.lr=1e-3",
                             "--train.dtype=bf16", *layout])
    [summary] = simulate_training(cfg, world_size=4, ranks=[3])
    assert summary["loss"] == ["cuda:0", "torch.float32", []]
    assert summary["parameter_devices"] == ["cuda:0"]
    assert "_c10d_functional.all_to_all_single.default" in set(summary["collectives"]), summary["collectives"]
    if "--parallel.pp=2" in layout:  # the hidden states and the routing totals came from stage 0
        assert summary["stages"] == [1] and "c10d.recv_.default" in summary["collectives"], summary


# ---- bad layouts ----------------------------------------------------------------------------------------------------
def test_ep_must_divide_the_experts_and_the_sharding_ranks() -> None:
    moe = get_preset("qwen1.5-moe-a2.7b")
    with pytest.raises(QwenlinkError, match=r"^parallel.ep = 8 does not divide the model's 60 experts$"):
        validate_plan(ParallelPlan(dp_shard=8, ep=8), moe)
    with pytest.raises(QwenlinkError, match=r"^parallel.ep = 4 does not divide parallel.dp_shard = 2 "):
        validate_plan(ParallelPlan(dp_shard=2, dp_replicate=2, ep=4), moe)
    with pytest.raises(QwenlinkError, match=r"^parallel.ep = 2: expert parallelism needs a mixture-of-experts"):
        validate_plan(ParallelPlan(dp_shard=2, ep=2), get_preset("test-tiny"))
    validate_plan(ParallelPlan(dp_shard=4, ep=4), moe)  # 60 / 4 = 15 experts per rank
    with pytest.raises(QwenlinkError, match="^config: parallel.ep must be at least 1$"):
        load_config(None, ["--train.global_batch_size=8", "--parallel.ep=0"])
    cfg = load_config(None, ["--train.global_batch_size=8", "--parallel.ep=2"])
    assert parallel_plan(cfg, 4, make_moe_config({})).ep == 2  # the config key reaches the plan
    # adapters on the experts shard with them (the ep2-dp2-lora-experts run above): accepted with the layout
    cfg = load_config(None, ["--train.global_batch_size=8", "--parallel.ep=2", "--model.init_from=/base",
                             "--lora.enabled=true", "--lora.target_modules=[\"q_proj\", \"dense_h_to_4h\"]"])
    assert parallel_plan(cfg, 4, make_moe_config({})).ep == 2


# ---- the train command ----------------------------------------------------------------------------------------------
MODEL = ["--model.preset=qwen-moe-tiny", "--model.arch.vocab_size=320", "--model.arch.hidden_size=64",
         "--model.arch.intermediate_size=96", "--model.arch.moe_intermediate_size=32",
         "--model.arch.shared_expert_intermediate_size=48", "--model.arch.router_aux_loss_coef=0.02"]


def _train(corpus: str, out: Path, *extra: str, nproc: int | None = None) -> subprocess.CompletedProcess:
    args = ["train", *MODEL, f"--data.path={corpus}", "--data.seq_length=32", "--train.micro_batch_size=2",
            "--train.global_batch_size=4", "--train.train_iters=4", "--train.device=cpu", "--optim.lr=1e-3",
            "--optim.implementation=foreach", "--job.seed=3", f"--job.output_dir={out}",
            "--metrics.tensorboard=false", "--metrics.progress=lines", "--metrics.log_interval=1",
            "--checkpoint.interval=2", *extra]
    cmd = [sys.executable, "-m", "qwenlink.cli", *args] + ([f"--nproc={nproc}"] if nproc else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def _rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def _close(got: dict[int, dict], ref: dict[int, dict], steps) -> None:
    for step in steps:
        keys = [k for k in ref[step] if k in ("loss", "aux_loss") or k.startswith("moe/load_max_over_mean")]
        assert len(keys) == 5, keys  # loss, aux, the worst layer's expert load and both layers'
        for key in keys:
            a, b = got[step][key], ref[step][key]
            assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: {key} {a} vs one process {b}"


def test_train_command_at_ep2_and_ep2_pp2_equals_one_process_and_resumes_at_ep1(tmp_path) -> None:
    """`qwenlink train` from a random init (layout-independent) at ep2, at ep2 x pp2 and in one process: the same LM
    and aux losses and expert load for 4 steps and the same exported weights; the ep2 checkpoint of step 2 resumes
    in one process with the uninterrupted run's steps 3 and 4."""
    from export_helpers import hf_tensors

    corpus = write_counting_corpus(tmp_path / "corpus", 80)
    single = tmp_path / "single"
    result = _train(corpus, single, "--checkpoint.interval=0", f"--checkpoint.export_hf={single / 'hf'}")
    assert result.returncode == 0, result.stderr[-3000:]
    first = tmp_path / "ep2"
    result = _train(corpus, first, "--parallel.ep=2", f"--checkpoint.export_hf={first / 'hf'}", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    # ep2 x pp2 x dp2 (2 rows per dp rank: one micro batch of the single run's size, so GPipe; the worker test above
    # runs 1F1B over 4 micro batches)
    piped = tmp_path / "ep2-pp2"
    result = _train(corpus, piped, "--parallel.ep=2", "--parallel.pp=2", "--parallel.schedule=gpipe",
                    "--checkpoint.interval=0", f"--checkpoint.export_hf={piped / 'hf'}", nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    ref = hf_tensors(single / "hf")
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in ref
    for run in (first, piped):
        _close(_rows(run), _rows(single), [1, 2, 3, 4])
        # the HF export gathers every expert (HF's per-expert names) from both ep ranks (and both stages)
        ours = hf_tensors(run / "hf")
        assert ours.keys() == ref.keys(), run.name
        for name in ref:
            assert (ours[name] - ref[name]).abs().max() <= 1e-5, (run.name, name)
    resumed = tmp_path / "ep1"
    shutil.copytree(first / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    result = _train(corpus, resumed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step 2" in result.stdout
    _close(_rows(resumed), _rows(single), [3, 4])


def test_bad_expert_layout_is_refused_before_launch(tmp_path) -> None:
    corpus = write_counting_corpus(tmp_path / "corpus", 10)
    result = _train(corpus, tmp_path / "run", "--parallel.ep=3", "--train.global_batch_size=6", nproc=3)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == "qwenlink train: error: parallel.ep = 3 does not divide the model's 8 experts"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_moe_generate_at_tp2_equals_one_process(tmp_path) -> None:
    """Inference takes the same tensor-parallel plan (parallel/tensor.py): a transformers Qwen2-MoE checkpoint
    generates the same greedy tokens at tp2 as in one process."""
    from common import fixture_dir
    from moe_helpers import make_hf_moe_model

    _, path = make_hf_moe_model(tmp_path / "moe", tokenizer_from=fixture_dir("megatron-core-tiny-qwen2", "hf"))
    args = ["-m", "qwenlink.cli", "generate", "--model", str(path), "--prompt", "hello world", "--prompt", "The",
            "--max-new-tokens", "12", "--greedy"]
    single = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args],
                        capture_output=True, text=True, env=ENV, timeout=180)
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert tp.stdout == single.stdout and single.stdout.count("### prompt") == 2

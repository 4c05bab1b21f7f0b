"""The trainer's step on fake CUDA devices, without a GPU: GPU correctness of what the CPU runs cannot show.

Each rank runs in a fresh process (qwenlink.train.simulate): its model is built as the Trainer builds it, two optimizer
steps run on FakeTensors of device "cuda" under torch's fake process group, every collective's tensors are checked
to be on the device (NCCL has no CPU path) and any host synchronisation (.item(), float(t), .cpu(), a blocking copy,
boolean indexing of a device tensor...) fails the step. The last test proves the guard by planting each of these.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pytest
import torch

from qwenlink.parallel.simulate import SimulationError, run_simulation, stand_in_library
from qwenlink.train.config import JobConfig, load_config
from qwenlink.train.simulate import simulate_training

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def fake_cuda_runtime() -> None:
    """The stand-in for the CUDA runtime (built once with the C++ compiler on a CPU-only build)."""
    if torch.version.cuda is not None and not torch.cuda.is_available():
        pytest.skip("a CUDA build of torch without a visible GPU has neither a GPU nor room for the stand-in")
    try:
        stand_in_library("cuda")
    except SimulationError as exc:
        pytest.skip(str(exc))


def job(*overrides: str) -> JobConfig:
    base = ["--model.preset=test-tiny", "--data.path=unused", "--data.seq_length=16", "--train.micro_batch_size=2",
            "--train.global_batch_size=8", "--train.device=cuda", "--optim.lr=1e-3", "--optim.clip_grad=1.0"]
    return load_config(None, base + [f"--{o}" for o in overrides])


def check_rank(summary: dict) -> None:
    assert summary["loss"] == ["cuda:0", "torch.float32", []]
    assert summary["grad_norm"] == ["cuda:0", "torch.float32"]
    assert summary["finite"] == ["cuda:0", "torch.bool"]
    assert summary["parameter_devices"] == ["cuda:0"]
    assert summary["parameter_dtypes"] == ["torch.float32"]  # bf16 computes in bf16; master weights stay fp32
    assert summary["optimizer_state_devices"] == ["cuda:0"]
    assert summary["local_parameters"] > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_process_step_on_fake_cuda(dtype: str) -> None:
    [summary] = simulate_training(job(f"train.dtype={dtype}"), world_size=1, ranks=[0])
    check_rank(summary)
    assert summary["collectives"] == {}  # the plan whose sizes are all 1 switches every dimension off


def test_lora_steps_on_fake_cuda() -> None:
    """LoRA (frozen base in bf16, fp32 adapters) in one process and under dp2: FSDP2 must not leave an unshard of a
    frozen unit pending at the end of backward (it waits for it on the device's stream there)."""
    lora = ("train.dtype=bf16", "lora.enabled=true", "lora.base_dtype=bf16", "model.init_from=unused-base")
    [alone] = simulate_training(job(*lora), world_size=1, ranks=[0])
    [sharded] = simulate_training(job(*lora, "parallel.dp_shard=2"), world_size=2, ranks=[1])
    for summary in (alone, sharded):
        assert summary["loss"] == ["cuda:0", "torch.float32", []]
        assert summary["parameter_devices"] == ["cuda:0"]
        assert summary["parameter_dtypes"] == ["torch.bfloat16", "torch.float32"]  # frozen base, adapters


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tp2_dp2_pp2_step_on_fake_cuda(dtype: str) -> None:
    """Rank 0 (first stage) and rank 5 (pp 1, dp 0, tp 1: the last stage, with the head and the loss)."""
    cfg = job(f"train.dtype={dtype}", "parallel.tp=2", "parallel.pp=2")
    first, last = simulate_training(cfg, world_size=8, ranks=[0, 5])
    for summary in (first, last):
        check_rank(summary)
        seen = set(summary["collectives"])
        assert {"c10d.send.default", "c10d.recv_.default"} <= seen  # pipeline activations and gradients
        assert seen & {"_c10d_functional.all_gather_into_tensor.default", "c10d._allgather_base_.default"}  # FSDP2
        assert seen & {"_c10d_functional.reduce_scatter_tensor.default", "c10d._reduce_scatter_base_.default"}
        assert "_c10d_functional.all_reduce.default" in seen  # tensor parallel
    assert (first["coordinate"], first["stages"]) == ({"pp": 0, "dp": 0, "tp": 0}, [0])
    assert (last["coordinate"], last["stages"]) == ({"pp": 1, "dp": 0, "tp": 1}, [1])


# ---- the guard catches what it is there for --------------------------------------------------------------------------
@contextlib.contextmanager
def planted(fault: str) -> Iterator[None]:
    """One thing a GPU run would stall or fail on, planted in the step (runs in the simulation's process)."""
    import torch.distributed as dist

    from qwenlink.train import step as step_mod
    from qwenlink.train.step import TrainStep

    forward_backward, count_valid, model_loss = TrainStep.forward_backward, TrainStep.count_valid, step_mod.model_loss

    def reading(read):
        def patched(self, batches, total_valid):
            loss = forward_backward(self, batches, total_valid)
            read(loss)
            return loss
        return patched

    def counting(extra):
        def patched(self, batches):
            total = count_valid(self, batches)
            extra(self)
            return total
        return patched

    def device_labels(module, input_ids, labels, **kwargs):  # the loss finding valid labels on the device
        return model_loss(module, input_ids, labels.to(input_ids.device, non_blocking=True), **kwargs)

    patches = {
        "item": ("forward_backward", reading(lambda loss: loss.item())),
        "float": ("forward_backward", reading(lambda loss: float(loss))),
        "cpu": ("forward_backward", reading(lambda loss: loss.cpu())),
        "cpu_all_reduce": ("count_valid", counting(lambda self: dist.all_reduce(torch.zeros(1)))),
        "blocking_copy": ("count_valid", counting(lambda self: torch.tensor(1.0, device=self.device))),
    }
    if fault == "device_labels":
        step_mod.model_loss = device_labels
        try:
            yield
        finally:
            step_mod.model_loss = model_loss
        return
    name, replacement = patches[fault]
    original = getattr(TrainStep, name)
    setattr(TrainStep, name, replacement)
    try:
        yield
    finally:
        setattr(TrainStep, name, original)


def plant_and_run(job_toml: str, faults: list[str]) -> list[list[str]]:
    """In the simulation's process: one-process steps, each with one planted fault; (fault, error class, message)."""
    import tempfile

    from qwenlink.train.simulate import simulate_step

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "job.toml").write_text(job_toml)
        cfg = load_config(Path(tmp) / "job.toml")
    caught = []
    for fault in faults:
        try:
            with planted(fault):
                simulate_step(cfg, 1, 0)
            caught.append([fault, "none", ""])
        except SimulationError as exc:
            caught.append([fault, type(exc).__name__, str(exc).splitlines()[0]])
    return caught


def test_planted_host_syncs_and_host_collectives_fail_the_step() -> None:
    expected = {"item": "HostSyncError", "float": "HostSyncError", "cpu": "HostSyncError",
                "blocking_copy": "HostSyncError", "device_labels": "HostSyncError",
                "cpu_all_reduce": "CollectiveDeviceError"}
    caught = run_simulation("test_fake_cuda_step:plant_and_run", job().to_toml(), list(expected),
                            path=[HERE, HERE.parent])
    assert {fault: error for fault, error, _ in caught} == expected, caught
    messages = {fault: message for fault, _, message in caught}
    assert "reads a cuda tensor's value on the host" in messages["item"]
    assert "copying a cuda tensor to the host" in messages["cpu"]
    assert "blocking host-to-cuda copy" in messages["blocking_copy"]
    assert "output shape depends on the values" in messages["device_labels"]
    assert "received a tensor on cpu" in messages["cpu_all_reduce"]

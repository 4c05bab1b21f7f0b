"""Process-group setup: the backend follows the configured device's type, whatever its spelling."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from qwenlink.train import distributed


@pytest.mark.parametrize("device, backend, pinned", [("cuda:0", "nccl", 3), ("cuda", "nccl", 3), ("cpu", "gloo", None)])
def test_backend_follows_the_device_type(monkeypatch, device, backend, pinned) -> None:
    calls: dict = {}
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.__setitem__("device", index))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda name, **kw: calls.__setitem__("backend", name))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    info = distributed.init_distributed(device)
    assert calls["backend"] == backend and calls.get("device") == pinned
    assert (info.rank, info.world_size, info.local_rank) == (3, 8, 3)
    expected = torch.device("cuda", 3) if backend == "nccl" else torch.device("cpu")
    assert distributed.device_for(info, torch.device(device)) == expected


def test_resume_restores_only_this_rank_s_cuda_generator(monkeypatch) -> None:
    """A checkpoint holds each rank's own CUDA generator (not every visible device's), and restores it on the
    current device even where fewer GPUs are visible than at save time (older all-device lists included)."""
    from qwenlink.checkpoint import dcp

    calls: dict = {}
    state = torch.arange(4, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: state)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: calls.setdefault("set", []).append(s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("restores every device's state"))
    saved = dcp.rng_state()
    assert saved["cuda"] is state
    dcp.set_rng_state(saved)
    dcp.set_rng_state({**saved, "cuda": [state + 1, state + 2, state + 3]})  # written with 3 visible GPUs
    assert [s.tolist() for s in calls["set"]] == [[0, 1, 2, 3], [1, 2, 3, 4]]


def _failure(tmp_path, rank: int, exitcode: int, error: Exception | None = None, at: float = 0.0):
    """A torchrun ProcessFailure as the launcher builds it: from the error file the rank wrote (or none)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    path = tmp_path / f"error_{rank}_{len(list(tmp_path.iterdir()))}.json"  # a fresh file for every failure
    if error is not None:
        import time

        real_time = time.time
        time.time = lambda: at  # record_failure stamps the error with time.time()
        try:
            import os

            os.environ["TORCHELASTIC_ERROR_FILE"] = str(path)
            distributed.record_failure(error)
        finally:
            time.time = real_time
            del os.environ["TORCHELASTIC_ERROR_FILE"]
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))


def _first(tmp_path, *failures) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    return distributed.first_failure(ChildFailedError("qwenlink", {f.local_rank: f for f in failures}))[0]


def test_first_failure_names_the_rank_that_caused_the_others(tmp_path) -> None:
    """torchrun gives whole-second ties to rank 0, and lists the ranks it stopped with SIGTERM as failures too;
    the rank named first must be the cause (a CI run once blamed rank 0's "Connection reset by peer", recorded the
    same second rank 1 was SIGKILLed, and SIGTERMed by torchrun while it was exiting)."""
    from qwenlink.errors import QwenlinkError

    reset = RuntimeError("Connection reset by peer")
    # rank 1 killed (no record); rank 0 recorded losing it, then was stopped by torchrun
    assert _first(tmp_path, _failure(tmp_path, 0, -15, reset, at=100.5), _failure(tmp_path, 1, -9)) == 1
    # rank 1 had a data error; rank 0's reset came a moment later within the same second
    assert _first(tmp_path, _failure(tmp_path, 0, 1, reset, at=100.7),
                  _failure(tmp_path, 1, 2, QwenlinkError("bad row"), at=100.2)) == 1
    # the real error's rank was still exiting when torchrun stopped it: its record still counts first
    assert _first(tmp_path, _failure(tmp_path, 0, -15, QwenlinkError("bad row"), at=100.2),
                  _failure(tmp_path, 1, 1, reset, at=100.7)) == 0
    # a rank stopped by torchrun before it recorded anything is never the cause
    assert _first(tmp_path, _failure(tmp_path, 0, -15), _failure(tmp_path, 1, 1, reset, at=100.7)) == 1

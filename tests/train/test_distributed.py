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

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

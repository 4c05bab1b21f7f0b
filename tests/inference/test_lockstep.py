"""Rank 0's side of lockstep serving, in one process (a one-rank gloo group): announcements and a failed step."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
import torch.distributed as dist

from qwenlink.inference import lockstep
from qwenlink.inference.engine import Engine
from qwenlink.inference.server import make_server, serve_in_thread
from qwenlink.models.presets import get_preset
from qwenlink.models.qwen2 import build_model
from qwenlink.tokenizer import Tokenizer


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _post(base: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_announcements_and_a_failed_step_end_the_group(one_rank_group, monkeypatch):
    announced: list = []
    share = lockstep.share
    monkeypatch.setattr(lockstep, "share", lambda value: announced.append(share(value)) or announced[-1])
    model = build_model(get_preset("qwen-tiny"), seed=0).eval()
    engine = Engine(model, max_batch=2, max_length=64)
    server = make_server(engine, Tokenizer.default(), "tiny", port=0, lockstep=True)
    serve_in_thread(server)
    base = "http://%s:%d" % server.server_address[:2]
    try:
        status, body = _post(base, {"prompt": "hello", "max_tokens": 3, "temperature": 0.7})
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        submits = [op for ops in announced for op in ops if op[0] == "submit"]
        assert len(submits) == 1 and submits[0][3].seed is not None  # unseeded sampling got a seed to share

        def broken_step():
            raise RuntimeError("device lost")

        monkeypatch.setattr(engine, "step", broken_step)
        status, body = _post(base, {"prompt": "hello", "max_tokens": 3})
        assert status == 500 and "device lost" in body["error"]["message"]
        server.state.worker.thread.join(timeout=10)
        assert announced[-1] == [("stop",)]  # the other ranks are told to leave rather than diverge
        status, body = _post(base, {"prompt": "hello", "max_tokens": 3})
        assert status == 503 and "engine has stopped" in body["error"]["message"]
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(base + "/health", timeout=10)
        assert health.value.code == 503
    finally:
        server.shutdown()

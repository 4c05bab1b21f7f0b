"""Server hardening: random request bodies never crash the server (4xx with a JSON error, or 200), a stalled client
does not block others, and the server stays healthy afterwards."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test dependency (pip install -e .[test])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qwenlink.inference.engine import Engine  # noqa: E402
from qwenlink.inference.server import ServerLimits, make_server, serve_in_thread  # noqa: E402
from qwenlink.models.presets import get_preset  # noqa: E402
from qwenlink.models.qwen2 import build_model  # noqa: E402


@pytest.fixture(scope="module")
def base_url(tiny_fixture_hf_module):
    from qwenlink.tokenizer import Tokenizer

    model = build_model(get_preset("test-tiny"), seed=0).eval()
    tok = Tokenizer.from_dir(tiny_fixture_hf_module)
    server = make_server(Engine(model, max_batch=4, max_length=128), tok, "fuzz", port=0,
                         limits=ServerLimits(max_tokens=8, max_prompt_tokens=64, max_body_bytes=4096))
    serve_in_thread(server)
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.state.worker.stop()


@pytest.fixture(scope="module")
def tiny_fixture_hf_module():
    from common import fixture_dir

    return fixture_dir("megatron-core-tiny-qwen2", "hf")


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
fields = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["fuzz", "other"]) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                "content": st.text(max_size=30) | json_values}), max_size=3)
    | json_values,
    "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 400), max_size=10) | json_values,
    "max_tokens": st.integers(-3, 20) | json_values,
    "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
    "top_p": st.floats(-0.5, 1.5, allow_nan=False) | json_values,
    "top_k": st.integers(-2, 50) | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6) | json_values,
    "seed": st.integers(-5, 2**40) | json_values,
    "stream": st.booleans() | json_values,
    "logprobs": st.booleans() | st.integers(-1, 5) | json_values,
    "n": st.integers(0, 3),
})


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=fields, chat=st.booleans())
def test_random_requests_get_json_answers(base_url, body, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, raw = _post(base_url + path, json.dumps(body).encode())
    assert status == 200 or 400 <= status < 500, (status, raw[:300])
    if status != 200:
        assert "error" in json.loads(raw)
    elif not body.get("stream") is True:
        assert "choices" in json.loads(raw)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200))
def test_random_bytes_get_400(base_url, raw):
    status, body = _post(base_url + "/v1/completions", raw)
    assert 400 <= status < 500 or status == 200
    json.loads(body)


def test_stalled_client_does_not_block_others(base_url, capfd):
    host, port = base_url.removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)))
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"prompt\": ")  # the rest never comes
    try:
        start = time.monotonic()
        status, raw = _post(base_url + "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
        assert status == 200 and json.loads(raw)["choices"]
        assert time.monotonic() - start < 30  # not queued behind the stalled request
    finally:
        stalled.close()
    with urllib.request.urlopen(base_url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    time.sleep(1.0)  # the stalled request's handler sees the half body and answers 400 to a closed socket
    assert "Traceback" not in capfd.readouterr().err  # a client that left is no server error

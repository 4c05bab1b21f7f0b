"""Server hardening: random request bodies never crash the server (4xx with a JSON error, or 200), requests generated
from the OpenAI request schema with hostile values (NaN, 1e400, 2**64, lone surrogates, nulls where parts belong) get
200 or a 4xx naming a field, a stalled body gets a 408 and a closed connection, chunked bodies are read, and the
server stays healthy afterwards."""

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
                         limits=ServerLimits(max_tokens=8, max_prompt_tokens=64, max_body_bytes=4096, read_timeout=2))
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


# ---- requests generated from the schema (openai_schema.py), each field valid or hostile -----------------------------
def _hostile_numbers(valid):
    return valid | st.sampled_from([float("nan"), float("inf"), float("-inf"), 2**64, -2**63 - 1, 10**30, 1e-45,
                                    -0.0, True, "1", None, [], {}])


# Lone surrogates travel as JSON escapes (json.dumps writes them as \udXXX); no tokenizer can encode them.
hostile_text = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=12)
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", None]),
                                        "text": hostile_text | _hostile_numbers(st.none())}), max_size=3)
schema_fields = st.fixed_dictionaries({}, optional={
    "model": st.just("fuzz") | hostile_text | _hostile_numbers(st.none()),
    "max_tokens": _hostile_numbers(st.integers(1, 8)),
    "max_completion_tokens": _hostile_numbers(st.integers(1, 8)),
    "temperature": _hostile_numbers(st.floats(0, 2)),
    "top_p": _hostile_numbers(st.floats(0, 1)),
    "top_k": _hostile_numbers(st.integers(0, 2**31)),
    "repetition_penalty": _hostile_numbers(st.floats(0, 3)),
    "seed": _hostile_numbers(st.integers(0, 2**64 + 5)),
    "presence_penalty": _hostile_numbers(st.just(0)),
    "n": _hostile_numbers(st.integers(0, 2)),
    "stop": hostile_text | st.lists(hostile_text, max_size=5) | _hostile_numbers(st.none()),
    "stream": st.booleans() | _hostile_numbers(st.none()),
    "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | hostile_text})
    | hostile_text | st.lists(st.booleans(), max_size=2),
    "logprobs": st.booleans() | _hostile_numbers(st.integers(-1, 6)),
})
chat_bodies = st.tuples(schema_fields, st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant", "tool"]),
    "content": hostile_text | parts | _hostile_numbers(st.none())}), min_size=1, max_size=3)).map(
    lambda fm: {**fm[0], "messages": fm[1]})
completion_bodies = st.tuples(schema_fields, hostile_text | st.lists(st.integers(-2, 2**33), min_size=1, max_size=6)
                              | st.lists(hostile_text, min_size=1, max_size=2) | _hostile_numbers(st.none())).map(
    lambda fp: {**fp[0], "prompt": fp[1]})


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=chat_bodies | completion_bodies)
def test_schema_requests_get_200_or_a_4xx_naming_the_field(base_url, body):
    chat = "messages" in body
    status, raw = _post(base_url + ("/v1/chat/completions" if chat else "/v1/completions"),
                        json.dumps(body).encode())
    assert status == 200 or 400 <= status < 500, (status, raw[:300])
    if status != 200:
        error = json.loads(raw)["error"]
        if error["param"] is not None:  # a field error names the field in its message
            assert error["param"].split("[")[0].split(".")[0] in error["message"], error
    elif body.get("stream") is True:
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events[:-1]), events
    else:
        assert "choices" in json.loads(raw)


def test_health_after_fuzzing(base_url):
    with urllib.request.urlopen(base_url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok", "in_flight": 0}


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200))
def test_random_bytes_get_400(base_url, raw):
    status, body = _post(base_url + "/v1/completions", raw)
    assert 400 <= status < 500 or status == 200
    json.loads(body)


def _raw_exchange(base_url: str, data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes and read the reply until the server closes the connection."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_chunked_bodies_are_read(base_url):
    body = json.dumps({"prompt": "hi", "max_tokens": 2, "temperature": 0}).encode()
    chunked = b"".join(f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n" for part in (body[:5], body[5:]))
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply = _raw_exchange(base_url, head + chunked + b"0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    plain = _post(base_url + "/v1/completions", body)[1]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["choices"][0]["text"] == json.loads(plain)["choices"][0]["text"]
    # Over the body limit (4096) while it streams in: 413; bad framing: 400.
    big = b"1000\r\n" + b"x" * 4096 + b"\r\n" + b"1000\r\n" + b"x" * 4096 + b"\r\n0\r\n\r\n"
    assert _raw_exchange(base_url, head + big).startswith(b"HTTP/1.1 413")
    assert _raw_exchange(base_url, head + b"zz\r\n{}\r\n0\r\n\r\n").startswith(b"HTTP/1.1 400")


def test_stalled_client_gets_408_and_does_not_block_others(base_url, capfd):
    host, port = base_url.removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)), timeout=60)
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"prompt\": ")  # the rest never comes
    try:
        status, raw = _post(base_url + "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
        assert status == 200 and json.loads(raw)["choices"]  # served while the other one stalls
        reply = b""
        while chunk := stalled.recv(65536):  # the server answers after its read timeout (2 s) and closes
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    finally:
        stalled.close()
    with urllib.request.urlopen(base_url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    assert "Traceback" not in capfd.readouterr().err  # a stalled client is no server error

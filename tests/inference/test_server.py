"""The OpenAI-compatible server, driven by the official `openai` client and by raw HTTP for bad requests."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request

import pytest

from common import default_sigint

from qwenlink.checkpoint.hf import load_hf_model
from qwenlink.inference.engine import Engine
from qwenlink.inference.generate import generate
from qwenlink.inference.sampling import SamplingParams
from qwenlink.inference.server import ServerLimits, make_server, serve_in_thread
from qwenlink.tokenizer import Tokenizer

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e .[test])")


@pytest.fixture(scope="module")
def served(request):
    from common import fixture_dir

    path = fixture_dir("megatron-core-tiny-qwen2", "hf")
    model = load_hf_model(path).eval()
    tok = Tokenizer.from_dir(path)
    engine = Engine(model, max_batch=4, max_length=256)
    server = make_server(engine, tok, "tiny", port=0, limits=ServerLimits(max_tokens=64, max_prompt_tokens=200,
                                                                          max_body_bytes=20_000))
    serve_in_thread(server)
    host, port = server.server_address[:2]
    yield {"model": model, "tok": tok, "base": f"http://{host}:{port}", "server": server}
    server.shutdown()
    server.state.worker.stop()


def _client(served, **kw):
    return openai.OpenAI(base_url=served["base"] + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def _alone(served, text: str, max_new: int, *, chat: bool) -> str:
    tok = served["tok"]
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}])
    results, _ = generate(served["model"], [tok.encode(text)],
                          SamplingParams(max_new_tokens=max_new, stop_ids=frozenset(tok.stop_ids())), decode=tok.decode)
    return results[0].text


def test_models_and_health(served):
    client = _client(served)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(served["base"] + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


def test_chat_completion_greedy_equals_engine_alone(served):
    client = _client(served)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}],
                                         max_tokens=12, temperature=0)
    assert out.choices[0].message.content == _alone(served, "Say hi", 12, chat=True)
    assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens > 5
    assert out.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_non_streaming(served):
    client = _client(served)
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "count"}], max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="abc", max_tokens=15, temperature=0, stream=True))
    assert streamed == client.completions.create(model="tiny", prompt="abc", max_tokens=15, temperature=0).choices[0].text


def test_completions_greedy_seeded_sampling_and_stop(served):
    client = _client(served)
    out = client.completions.create(model="tiny", prompt="hello world", max_tokens=10, temperature=0)
    assert out.choices[0].text == _alone(served, "hello world", 10, chat=False)
    a = client.completions.create(model="tiny", prompt="x", max_tokens=10, temperature=1.0, seed=7).choices[0].text
    b = client.completions.create(model="tiny", prompt="x", max_tokens=10, temperature=1.0, seed=7).choices[0].text
    assert a == b
    full = client.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched_and_correct(served):
    client = _client(served)
    prompts = [f"prompt number {i} " * (1 + i % 3) for i in range(8)]
    expected = [_alone(served, p, 16, chat=False) for p in prompts]

    def call(p):
        return client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(call, prompts))
    assert got == expected


def _post(served, path: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(served["base"] + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "must be an object"),
    (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "gpt-4"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(), 422, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}).encode(), 422, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 300}]}).encode(), 413, "prompt"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 422, "role"),
    (json.dumps({"messages": "hello"}).encode(), 422, "messages"),
    (b"{" + b'"a": "' + b"x" * 30_000 + b'"}', 413, "exceeds"),
])
def test_bad_requests_get_clear_errors_and_server_keeps_serving(served, body, status, needle):
    code, payload = _post(served, "/v1/chat/completions", body)
    assert code == status
    assert needle in payload["error"]["message"]
    # ... and the next request is answered exactly as the engine alone answers it (no state left over).
    after = _client(served).completions.create(model="tiny", prompt="ok", max_tokens=2, temperature=0)
    assert after.choices[0].text == _alone(served, "ok", 2, chat=False)


def test_prompt_plus_max_tokens_beyond_context(served):
    code, payload = _post(served, "/v1/completions", json.dumps({"prompt": [5] * 195, "max_tokens": 64}).encode())
    assert code == 413 and "context length" in payload["error"]["message"]


def test_unknown_route(served):
    code, payload = _post(served, "/v1/embeddings", b"{}")
    assert code == 404 and "unknown route" in payload["error"]["message"]


def test_api_key_required_when_configured(served):
    from qwenlink.inference.server import make_server as make

    server = make(served["server"].state.engine, served["tok"], "tiny", port=0, api_key="s3cret")
    serve_in_thread(server)
    host, port = server.server_address[:2]
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == "tiny"
    finally:
        server.shutdown()
        server.state.worker.stop()


def test_serve_with_a_small_max_context_refuses_longer_requests(tiny_fixture_hf):
    """`qwenlink serve --max-context 64` end to end: the cache is sized to its budget at start-up (16 requested rows
    do not fit --cache-memory 100K, so 3 are served and it says so in one line), a prompt or a request longer than the
    context gets the 413, a short one is answered as the engine alone answers it, and one that omits max_tokens gets
    the room its prompt leaves."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading

    command = [sys.executable, "-m", "qwenlink.cli", "serve", "--model", str(tiny_fixture_hf), "--device", "cpu",
               "--port", "0", "--max-context", "64", "--cache-memory", "100K", "--max-tokens-limit", "32"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
                               preexec_fn=default_sigint)  # stopped with Ctrl-C's signal below
    log: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in process.stderr:
            log.append(line)
            if re.search(r"on http://[\d.]+:\d+/v1", line):
                started.set()
        started.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    try:
        started.wait(timeout=120)
        base = re.search(r"on (http://[\d.]+:\d+)/v1", "".join(log))
        assert base, "server did not start:\n" + "".join(log)[-3000:]
        assert log[0] == ("qwenlink serve: KV cache: --max-batch 16 rows of 64 tokens would take 512.0 KiB but the "
                          "cache may use 100.0 KiB (--cache-memory 100.0 KiB); serving 3 requests at a time "
                          "(96.0 KiB); lower --max-context for more\n")
        assert "(max batch 3, context 64, KV cache 96.0 KiB)" in log[1]
        served = {"base": base.group(1), "model": load_hf_model(tiny_fixture_hf).eval(),
                  "tok": Tokenizer.from_dir(tiny_fixture_hf)}
        code, payload = _post(served, "/v1/completions", json.dumps({"prompt": [5] * 80, "max_tokens": 4}).encode())
        assert code == 413 and payload["error"]["code"] == "context_length_exceeded"
        assert "prompt has 80 tokens, above this server's limit of 64" in payload["error"]["message"]
        code, payload = _post(served, "/v1/completions", json.dumps({"prompt": [5] * 40, "max_tokens": 30}).encode())
        assert code == 413 and payload["error"]["code"] == "context_length_exceeded"
        assert "= 70 exceeds the context length 64" in payload["error"]["message"]
        code, payload = _post(served, "/v1/completions",
                              json.dumps({"prompt": "hello world", "max_tokens": 10, "temperature": 0}).encode())
        assert code == 200 and payload["choices"][0]["text"] == _alone(served, "hello world", 10, chat=False)
        code, payload = _post(served, "/v1/completions", json.dumps({"prompt": [5] * 60, "temperature": 0}).encode())
        assert code == 200 and 1 <= payload["usage"]["completion_tokens"] <= 4  # 64 - 60 left for the completion
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    assert code == 0, "".join(log)[-3000:]

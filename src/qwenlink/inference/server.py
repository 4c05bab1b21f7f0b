"""An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health.

Built on the standard library's threading HTTP server (no web framework dependency): one handler thread per
connection parses and validates the request, hands it to the engine worker (continuous batching across all
connections) and writes the reply, as one JSON body or as server-sent events when `stream` is true.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with these statuses:
400 malformed JSON or a body that is not an object; 401 missing/wrong API key; 404 unknown route or model;
413 body too large, or prompt + max_tokens beyond the context; 422 invalid parameter values; 429 too many requests
in flight.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

from qwenlink.errors import QwenlinkError
from qwenlink.inference.engine import Engine, Request
from qwenlink.inference.sampling import SamplingParams
from qwenlink.inference.worker import EngineWorker
from qwenlink.tokenizer import Tokenizer


@dataclass
class ServerLimits:
    max_tokens: int = 2048  # largest max_tokens a request may ask for
    max_prompt_tokens: int = 8192
    max_concurrent: int = 64  # requests in flight (running + queued) before 429
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: Optional[str] = None, kind: str = "invalid_request_error",
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ServerState:
    """Everything handlers share: model name, tokenizer, worker, limits, API key."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, *, limits: ServerLimits,
                 api_key: Optional[str] = None, lockstep: bool = False) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.limits = limits
        self.api_key = api_key
        self.worker = EngineWorker(engine, lockstep=lockstep).start()
        self.created = int(time.time())


# ---- request parsing ---------------------------------------------------------------------------------------------
def _number(body: dict, name: str, default: float, *, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(422, f"'{name}' must be a number, got {type(value).__name__}", param=name)
    if low is not None and (value < low or (low_open and value == low)):
        raise ApiError(422, f"'{name}' must be {'>' if low_open else '>='} {low}, got {value}", param=name)
    if high is not None and value > high:
        raise ApiError(422, f"'{name}' must be <= {high}, got {value}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: Optional[int], *, low: int = 0) -> Optional[int]:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"'{name}' must be an integer, got {type(value).__name__}", param=name)
    if value < low:
        raise ApiError(422, f"'{name}' must be >= {low}, got {value}", param=name)
    return value


def sampling_from_body(body: dict, state: ServerState, *, chat: bool) -> SamplingParams:
    """OpenAI request fields -> SamplingParams (plus qwenlink's top_k and repetition_penalty extensions)."""
    limits = state.limits
    max_tokens = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
        else body.get("max_tokens")
    default = min(limits.default_max_tokens, limits.max_tokens)
    max_tokens = _integer({"max_tokens": max_tokens}, "max_tokens", default, low=1)
    if max_tokens > limits.max_tokens:
        raise ApiError(422, f"'max_tokens' is {max_tokens}, above this server's limit of {limits.max_tokens}",
                       param="max_tokens")
    n = _integer(body, "n", 1, low=1)
    if n != 1:
        raise ApiError(422, "only n=1 is supported", param="n")
    for unsupported in ("presence_penalty", "frequency_penalty"):
        if body.get(unsupported) not in (None, 0, 0.0):
            raise ApiError(422, f"'{unsupported}' is not supported (use 'repetition_penalty')", param=unsupported)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(stop)
    else:
        raise ApiError(422, "'stop' must be a string or a list of at most 4 strings", param="stop")
    if any(not s for s in stops):
        raise ApiError(422, "'stop' strings must not be empty", param="stop")
    if chat:
        want_logprobs = body.get("logprobs") is True
    else:
        want_logprobs = _integer(body, "logprobs", None, low=0) is not None
    seed = _integer(body, "seed", None, low=0)
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, low=0.0, high=2.0),
        top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        top_k=int(_number(body, "top_k", 0, low=0)),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, low=0.0, low_open=True),
        seed=seed,
        stop_ids=frozenset(state.tokenizer.stop_ids()),
        stop_strings=stops,
        logprobs=want_logprobs,
    )


def prompt_from_body(body: dict, state: ServerState, *, chat: bool) -> list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(422, "'messages' must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ApiError(422, f"messages[{i}] must have a role of system, user or assistant", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(422, f"messages[{i}].content: only text parts are supported", param="messages")
                content = "".join(p.get("text", "") for p in content)
            if not isinstance(content, str):
                raise ApiError(422, f"messages[{i}].content must be a string", param="messages")
            clean.append({"role": m["role"], "content": content})
        ids = state.tokenizer.encode(state.tokenizer.apply_chat_template(clean))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = state.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt):
            ids = list(prompt)
        else:
            raise ApiError(422, "'prompt' must be a string or a list of token ids (one prompt per request)",
                           param="prompt")
        if not ids:
            raise ApiError(422, "'prompt' is empty", param="prompt")
    if len(ids) > state.limits.max_prompt_tokens:
        raise ApiError(413, f"prompt has {len(ids)} tokens, above this server's limit of "
                            f"{state.limits.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
    return ids


# ---- HTTP handler ------------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    server_version = "qwenlink"
    # A client that stalls mid-request (slowloris) loses its connection after this many seconds; it only ever holds
    # its own handler thread, so other clients are not blocked meanwhile.
    timeout = 30
    protocol_version = "HTTP/1.1"
    state: ServerState  # set on the subclass made by `make_server`

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet by default; errors are returned to clients
        pass

    # -- plumbing
    def _send_json(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _authorise(self) -> None:
        key = self.state.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "invalid or missing API key", kind="authentication_error", code="invalid_api_key")

    def _read_body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(400, "invalid Content-Length") from None
        if length > self.state.limits.max_body_bytes:
            self.close_connection = True
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of "
                                f"{self.state.limits.max_body_bytes}")
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"malformed JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object")
        return body

    def _guard(self, fn) -> None:
        try:
            self._authorise()
            fn()
        except ApiError as exc:
            self.close_connection = True  # the body may be unread; never reuse such a connection
            try:
                self._send_json(exc.status, exc.body())
            except OSError:  # the client left before its error reply (e.g. a half-sent request): nothing to tell
                pass
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # keep serving; tell the client what broke
            try:
                self._send_json(500, ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                              kind="server_error").body())
            except OSError:
                self.close_connection = True

    # -- routes
    def do_GET(self) -> None:
        def route() -> None:
            if self.path == "/v1/models":
                self._send_json(200, {"object": "list", "data": [self._model_card()]})
            elif self.path == f"/v1/models/{self.state.model_name}":
                self._send_json(200, self._model_card())
            else:
                raise ApiError(404, f"unknown route GET {self.path}", code="not_found")

        if self.path == "/health":  # health checks need no key
            worker = self.state.worker
            try:
                if worker.alive:
                    self._send_json(200, {"status": "ok", "in_flight": worker.load})
                else:
                    self._send_json(503, {"status": "engine stopped", "error": str(worker.error or "")})
            except OSError:
                pass
            return
        self._guard(route)

    def do_POST(self) -> None:
        def route() -> None:
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                self.close_connection = True
                raise ApiError(404, f"unknown route POST {self.path}", code="not_found")
            body = self._read_body()
            self._complete(body, chat=self.path == "/v1/chat/completions")

        self._guard(route)

    def _model_card(self) -> dict:
        return {"id": self.state.model_name, "object": "model", "created": self.state.created, "owned_by": "qwenlink"}

    # -- completions
    def _complete(self, body: dict, *, chat: bool) -> None:
        state = self.state
        model = body.get("model")
        if model is not None and model != state.model_name:
            raise ApiError(404, f"model {model!r} not found (this server serves {state.model_name!r})",
                           param="model", code="model_not_found")
        params = sampling_from_body(body, state, chat=chat)
        prompt = prompt_from_body(body, state, chat=chat)
        request = Request(prompt, params, decode=response_decoder(state.tokenizer))
        try:
            state.engine.check(request)
        except QwenlinkError as exc:
            if "context length" in str(exc):
                raise ApiError(413, str(exc), param="max_tokens", code="context_length_exceeded") from None
            raise ApiError(422, str(exc)) from None
        if not state.worker.alive:
            raise ApiError(503, f"the engine has stopped ({state.worker.error or 'shut down'}); restart the server",
                           kind="server_error")
        if state.worker.load >= state.limits.max_concurrent:
            raise ApiError(429, f"too many requests in flight ({state.limits.max_concurrent}); retry later",
                           kind="rate_limit_error")
        events = state.worker.submit(request)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{request.id}-{secrets.token_hex(6)}"
        created = int(time.time())
        if body.get("stream") is True:
            self._stream(request, events, rid, created, chat=chat, include_usage=bool(
                (body.get("stream_options") or {}).get("include_usage")))
            return
        while not request.done:
            events.get()
        if request.finish_reason == "error":
            raise ApiError(500, request.text, kind="server_error")
        self._send_json(200, self._final_body(request, rid, created, chat=chat))

    def _usage(self, request: Request) -> dict:
        return {"prompt_tokens": len(request.prompt), "completion_tokens": len(request.tokens),
                "total_tokens": len(request.prompt) + len(request.tokens)}

    def _logprobs(self, request: Request, *, chat: bool) -> Optional[dict]:
        if not request.params.logprobs:
            return None
        tok = self.state.tokenizer
        pairs = list(zip(request.tokens, request.logprobs))
        if chat:
            return {"content": [{"token": tok.decode([t]), "logprob": lp, "bytes": list(tok.decode([t]).encode()),
                                 "top_logprobs": []} for t, lp in pairs]}
        return {"tokens": [tok.decode([t]) for t, _ in pairs], "token_logprobs": [lp for _, lp in pairs],
                "top_logprobs": None, "text_offset": None}

    def _final_body(self, request: Request, rid: str, created: int, *, chat: bool) -> dict:
        finish = "length" if request.finish_reason == "length" else "stop"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": request.text},
                      "logprobs": self._logprobs(request, chat=True), "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": request.text, "logprobs": self._logprobs(request, chat=False),
                      "finish_reason": finish}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": self.state.model_name, "choices": [choice],
                "usage": self._usage(request)}

    def _stream(self, request: Request, events: "queue.Queue[Request]", rid: str, created: int, *, chat: bool,
                include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        obj = "chat.completion.chunk" if chat else "text_completion"

        def send(choice: dict, usage: Optional[dict] = None) -> None:
            chunk = {"id": rid, "object": obj, "created": created, "model": self.state.model_name,
                     "choices": [choice] if choice else []}
            if usage is not None:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        sent = 0
        try:
            if chat:
                send({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None})
            while True:
                events.get()
                while not events.empty():  # coalesce bursts into one chunk
                    events.get_nowait()
                visible = request.stream_text()
                delta = visible[sent:]
                if delta:
                    sent = len(visible)
                    if chat:
                        send({"index": 0, "delta": {"content": delta}, "logprobs": None, "finish_reason": None})
                    else:
                        send({"index": 0, "text": delta, "logprobs": None, "finish_reason": None})
                if request.done:
                    break
            finish = "length" if request.finish_reason == "length" else "stop"
            if chat:
                send({"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish})
            else:
                send({"index": 0, "text": "", "logprobs": None, "finish_reason": finish})
            if include_usage:
                send({}, usage=self._usage(request))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.state.worker.abort(request)  # the client left: free its cache row


class QwenlinkHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def response_decoder(tokenizer: Tokenizer) -> Callable[[list[int]], str]:
    """How generated ids become response text (special tokens kept: stop strings may name them)."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def make_server(engine: Engine, tokenizer: Tokenizer, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
                limits: Optional[ServerLimits] = None, api_key: Optional[str] = None,
                lockstep: bool = False) -> QwenlinkHTTPServer:
    """Create (not start) the server; `serve_forever()` runs it, `port 0` picks a free port.

    lockstep: this is rank 0 of a tensor-parallel group whose other ranks run `lockstep.follow`."""
    state = ServerState(engine, tokenizer, model_name, limits=limits or ServerLimits(), api_key=api_key,
                        lockstep=lockstep)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = QwenlinkHTTPServer((host, port), handler)
    server.state = state  # type: ignore[attr-defined]
    return server


def serve_in_thread(server: QwenlinkHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="qwenlink-http", daemon=True)
    thread.start()
    return thread

"""An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health.

Built on the standard library's threading HTTP server (no web framework dependency): one handler thread per
connection reads the request, hands the body to the OpenAI API layer (openai_api.py: validation, response objects,
errors), submits the request to the engine worker (continuous batching across all connections) and writes the reply,
as one JSON body or as server-sent events when `stream` is true. This module only moves bytes; what a valid request
or a response is lives in openai_api.py.

Statuses added here, beyond the API layer's: 404 unknown route; 413 body larger than --max-body-bytes; 429 too many
requests in flight; 503 the engine has stopped.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Optional

from qwenlink.inference import openai_api as api
from qwenlink.inference.engine import Engine, Request
from qwenlink.inference.openai_api import ApiError, ServerLimits, response_decoder
from qwenlink.inference.worker import EngineWorker
from qwenlink.tokenizer import Tokenizer

__all__ = ["ApiError", "ServerLimits", "ServerState", "make_server", "response_decoder", "serve_in_thread"]

_SSE_DONE = b"data: [DONE]\n\n"


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

    def submit(self, request: Request) -> "queue.Queue[Request]":
        """Hand a checked request to the worker, unless the engine has stopped (503) or is full (429)."""
        if not self.worker.alive:
            raise ApiError(503, f"the engine has stopped ({self.worker.error or 'shut down'}); restart the server",
                           kind="server_error")
        if self.worker.load >= self.limits.max_concurrent:
            raise ApiError(429, f"too many requests in flight ({self.limits.max_concurrent}); retry later",
                           kind="rate_limit_error")
        return self.worker.submit(request)


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

    def _read_body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(400, "invalid Content-Length") from None
        if length > self.state.limits.max_body_bytes:
            self.close_connection = True
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of "
                                f"{self.state.limits.max_body_bytes}")
        return api.parse_json_body(self.rfile.read(length) if length > 0 else b"")

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            api.check_api_key(self.headers.get("Authorization", ""), self.state.api_key)
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
                self._send_json(500, api.internal_error(exc).body())
            except OSError:
                self.close_connection = True

    # -- routes
    def do_GET(self) -> None:
        state = self.state

        def route() -> None:
            if self.path == "/v1/models":
                self._send_json(200, api.model_list(state.model_name, state.created))
            elif self.path == f"/v1/models/{state.model_name}":
                self._send_json(200, api.model_card(state.model_name, state.created))
            else:
                raise ApiError(404, f"unknown route GET {self.path}", code="not_found")

        if self.path == "/health":  # health checks need no key
            worker = state.worker
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

    # -- completions
    def _complete(self, body: dict, *, chat: bool) -> None:
        state = self.state
        call = api.parse_completion(body, chat=chat, tokenizer=state.tokenizer, limits=state.limits,
                                    model_name=state.model_name)
        request = api.engine_request(call, state.tokenizer)
        api.check_fits(state.engine, request)
        events = state.submit(request)
        rid, created = api.response_id(request, chat=chat), int(time.time())
        if call.stream:
            self._stream(request, api.stream_chunks(request, events, rid=rid, created=created,
                                                    model_name=state.model_name, chat=chat,
                                                    include_usage=call.include_usage))
            return
        while not request.done:
            events.get()
        self._send_json(200, api.completion_response(request, rid=rid, created=created, model_name=state.model_name,
                                                     tokenizer=state.tokenizer, chat=chat))

    def _stream(self, request: Request, chunks: Iterable[dict]) -> None:
        """Write each chunk as a server-sent event as soon as it exists; a client that leaves frees its cache row."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in chunks:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(_SSE_DONE)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.state.worker.abort(request)  # the client left: free its cache row


class QwenlinkHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


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

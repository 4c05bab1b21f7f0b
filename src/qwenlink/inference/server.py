"""An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health.

Built on the standard library's threading HTTP server (no web framework dependency): one handler thread per
connection reads the request, hands the body to the OpenAI API layer (openai_api.py: validation, response objects,
errors), submits the request to the engine worker (continuous batching across all connections) and writes the reply,
as one JSON body or as server-sent events when `stream` is true. This module only moves bytes; what a valid request
or a response is lives in openai_api.py.

Statuses added here, beyond the API layer's: 404 unknown route; 408 a body that stalls past the read timeout; 413
body larger than --max-body-bytes (Content-Length or chunked, http_body.py); 429 too many requests in flight; 503 the
engine has stopped or the server is stopping.

Under load: the listen backlog is sized to the server's limits (`listen_backlog`), so a burst of connections waits to
be accepted and answered (200 or 429) instead of being reset by the kernel; an error reply closes the connection
gracefully (its unread body is drained first, since closing a socket with unread input sends a reset). A client that
disconnects while its request runs or waits is noticed within `WATCH_SECONDS` and its request aborted, freeing its KV
cache row, so abandoned clients cannot hold the server at --max-concurrent.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Optional

from qwenlink.inference import openai_api as api
from qwenlink.inference.http_body import read_body
from qwenlink.inference.engine import Engine, Request
from qwenlink.inference.openai_api import ApiError, ServerLimits, response_decoder
from qwenlink.inference.worker import EngineWorker
from qwenlink.tokenizer import Tokenizer

__all__ = ["ApiError", "ServerLimits", "ServerState", "listen_backlog", "make_server", "response_decoder",
           "serve_in_thread", "stop_gracefully"]

_SSE_DONE = b"data: [DONE]\n\n"
WATCH_SECONDS = 0.25  # how often a handler waiting on the engine checks that its client is still connected
_DRAIN_SECONDS = 1.0  # how long a closing connection may keep sending the rest of an unread body
_DRAIN_BYTES = 1 << 22


def listen_backlog(limits: ServerLimits) -> int:
    """Connections the kernel may queue before accept: four times --max-concurrent, at least 1024 (the kernel caps it
    at net.core.somaxconn). The standard library's 5 made bursts of ~80 clients see connection resets: the kernel
    drops connections beyond the backlog while the one accepting thread starts handler threads."""
    return max(1024, 4 * limits.max_concurrent)


class ClientGone(Exception):
    """The client closed its connection while its request was waiting or running."""


def client_gone(sock: socket.socket) -> bool:
    """True once the peer has closed (EOF or reset); pending pipelined bytes do not count as gone."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed on our side
        return True


class WatchedEvents:
    """A request's event queue read while watching its client: `get` raises ClientGone once the client has left."""

    def __init__(self, events: "queue.Queue[Request]", sock: socket.socket) -> None:
        self.events, self.sock = events, sock
        self._checked = time.monotonic()

    def get(self) -> Request:
        """The next update; the client is checked every WATCH_SECONDS, also while updates keep arriving."""
        while True:
            if time.monotonic() - self._checked >= WATCH_SECONDS:
                self._checked = time.monotonic()
                if client_gone(self.sock):
                    raise ClientGone()
            try:
                return self.events.get(timeout=WATCH_SECONDS)
            except queue.Empty:
                pass

    def get_nowait(self) -> Request:
        return self.events.get_nowait()

    def empty(self) -> bool:
        return self.events.empty()


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
        self.stopping = False  # set by stop_gracefully: new requests get 503 while in-flight ones finish

    def submit(self, request: Request) -> "queue.Queue[Request]":
        """Hand a checked request to the worker, unless the server is stopping or the engine has stopped (503) or
        it is full (429)."""
        if self.stopping:
            raise ApiError(503, "the server is stopping; retry on another instance or after the restart",
                           kind="server_error")
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
        return api.parse_json_body(read_body(self.rfile, self.headers, self.state.limits.max_body_bytes))

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
        except (OSError, ClientGone):  # the client left (reset, broken pipe) or stalled while we wrote: drop it
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
                if state.stopping:
                    self._send_json(503, {"status": "stopping", "in_flight": worker.load})
                elif worker.alive:
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
        events = WatchedEvents(state.submit(request), self.connection)
        try:
            rid, created = api.response_id(request, chat=chat), int(time.time())
            if call.stream:
                self._stream(api.stream_chunks(request, events, rid=rid, created=created,
                                               model_name=state.model_name, chat=chat,
                                               include_usage=call.include_usage))
                return
            while not request.done:
                events.get()
            self._send_json(200, api.completion_response(request, rid=rid, created=created,
                                                         model_name=state.model_name, tokenizer=state.tokenizer,
                                                         chat=chat))
        finally:
            if not request.done:  # the client left (or writing to it failed): free its cache row now
                self.close_connection = True
                state.worker.abort(request)

    def _stream(self, chunks: Iterable[dict]) -> None:
        """Write each chunk as a server-sent event as soon as it exists (the caller aborts what is left unsent)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for chunk in chunks:
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(_SSE_DONE)
        self.wfile.flush()


class QwenlinkHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # replaced per server by `listen_backlog(limits)` before it listens

    def shutdown_request(self, request: Any) -> None:
        """Close gracefully: stop sending, then drain what the client still sends (an unread body) for a moment.

        Closing a socket that holds unread input makes the kernel send a reset, which can destroy the reply the
        client has not read yet (a 413 or 404 sent before the body)."""
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(_DRAIN_SECONDS)
            deadline, drained = time.monotonic() + _DRAIN_SECONDS, 0
            while drained < _DRAIN_BYTES and time.monotonic() < deadline:
                data = request.recv(65536)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass
        self.close_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line instead of socketserver's traceback; a client that vanished or stalled is not an error."""
        error = sys.exc_info()[1]
        if isinstance(error, (OSError, ClientGone)):
            return
        print(f"qwenlink serve: error while handling {client_address}: {type(error).__name__}: {error}",
              file=sys.stderr, flush=True)


def make_server(engine: Engine, tokenizer: Tokenizer, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
                limits: Optional[ServerLimits] = None, api_key: Optional[str] = None,
                lockstep: bool = False) -> QwenlinkHTTPServer:
    """Create (not start) the server; `serve_forever()` runs it, `port 0` picks a free port.

    lockstep: this is rank 0 of a tensor-parallel group whose other ranks run `lockstep.follow`."""
    limits = limits or ServerLimits()
    api.check_api_key_setting(api_key)
    state = ServerState(engine, tokenizer, model_name, limits=limits, api_key=api_key, lockstep=lockstep)
    handler = type("BoundHandler", (Handler,), {"state": state, "timeout": limits.read_timeout})
    server_class = type("BoundHTTPServer", (QwenlinkHTTPServer,), {"request_queue_size": listen_backlog(limits)})
    try:
        server = server_class((host, port), handler)
    except BaseException:
        state.worker.stop()
        raise
    server.state = state  # type: ignore[attr-defined]
    return server


def serve_in_thread(server: QwenlinkHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="qwenlink-http", daemon=True)
    thread.start()
    return thread


def stop_gracefully(server: QwenlinkHTTPServer, grace: float = 5.0) -> None:
    """Stop a server whose `serve_forever` has returned: connections already queued get a 503 (not a reset when
    the socket closes), requests in flight may finish for up to `grace` seconds, then the socket and engine stop."""
    state: ServerState = server.state  # type: ignore[attr-defined]
    state.stopping = True
    server.timeout = 0.05  # handle_request waits at most this long for one more queued connection
    deadline = time.monotonic() + grace
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([server.socket], [], [], 0.05)
            if readable:
                server.handle_request()
            elif state.worker.load == 0:
                break
    finally:
        server.server_close()
        state.worker.stop()

"""Reading an HTTP/1.1 request body safely: Content-Length or chunked, a size limit, and a deadline.

Why a module of its own: the body is where a hostile or broken client can hurt a server without sending a single
invalid field: a Content-Length that never arrives (a stalled client: 408 after the read timeout, not a traceback), a
length beyond the limit (413 before reading it), a chunked body of unbounded size (counted as it arrives), or chunk
framing that is not hexadecimal (400). Everything here raises `ApiError`; the transport (server.py) only maps it to a
reply and closes the connection.
"""

from __future__ import annotations

import socket
from typing import BinaryIO, Mapping

from qwenlink.inference.api_error import ApiError

_MAX_LINE = 1024  # a chunk-size line or trailer line longer than this is not HTTP


def _timed_out() -> ApiError:
    return ApiError(408, "the request body did not arrive in time; the connection is closed", code="request_timeout")


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"request body of {size} bytes exceeds the limit of {limit}")


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:  # the client closed mid-body
        raise ApiError(400, f"the request body ended after {len(data)} of {size} bytes")
    return data


def _read_line(stream: BinaryIO) -> bytes:
    line = stream.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE:
        raise ApiError(400, "malformed chunked body: a chunk line is too long")
    if not line:
        raise ApiError(400, "malformed chunked body: it ended before the last chunk")
    return line


def _read_chunked(stream: BinaryIO, limit: int) -> bytes:
    """A `Transfer-Encoding: chunked` body (RFC 9112 section 7.1), its total held to `limit` as it arrives."""
    parts: list[bytes] = []
    total = 0
    while True:
        line = _read_line(stream).split(b";", 1)[0].strip()  # chunk extensions are ignored
        try:
            size = int(line, 16)
        except ValueError:
            raise ApiError(400, f"malformed chunked body: chunk size {line[:20]!r} is not hexadecimal") from None
        if size < 0:
            raise ApiError(400, "malformed chunked body: negative chunk size")
        if size == 0:
            while _read_line(stream) not in (b"\r\n", b"\n"):  # trailers, up to the empty line
                pass
            return b"".join(parts)
        total += size
        if total > limit:
            raise _too_large(total, limit)
        parts.append(_read_exact(stream, size))
        if _read_line(stream) not in (b"\r\n", b"\n"):
            raise ApiError(400, "malformed chunked body: a chunk is longer than its size says")


def read_body(stream: BinaryIO, headers: Mapping[str, str], limit: int) -> bytes:
    """The request body named by the headers: chunked, or Content-Length bytes (none: empty); 408 / 413 / 400."""
    encoding = (headers.get("Transfer-Encoding") or "").strip().lower()
    try:
        if encoding:
            if encoding != "chunked":
                raise ApiError(400, f"Transfer-Encoding {encoding!r} is not supported (only chunked)")
            return _read_chunked(stream, limit)
        try:
            length = int(headers.get("Content-Length") or "0")
        except ValueError:
            raise ApiError(400, "invalid Content-Length") from None
        if length < 0:
            raise ApiError(400, "invalid Content-Length")
        if length > limit:
            raise _too_large(length, limit)
        return _read_exact(stream, length) if length else b""
    except (socket.timeout, TimeoutError):
        raise _timed_out() from None

"""png_chart: qwenlink's dependency-free PNG line charts (what `qwenlink plot` draws without matplotlib) decode as
PNG, and a falling series is drawn falling: from the panel's top left to its bottom right."""

from __future__ import annotations

import zlib

from qwenlink.png_chart import COLORS, Panel, render


def _decode(data: bytes) -> tuple[int, int, list[bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    pos, idat = 8, b""
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + body) == int.from_bytes(data[pos + 8 + length:pos + 12 + length], "big")
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 3 * width + 1
    rows = [raw[y * stride + 1:(y + 1) * stride] for y in range(height)]
    assert all(raw[y * stride] == 0 for y in range(height)) and len(raw) == stride * height
    return width, height, rows


def test_a_falling_series_is_drawn_from_top_left_to_bottom_right():
    xs = list(range(0, 100, 5))
    width, height, rows = _decode(render([Panel("loss", [("loss", xs, [10.0 - 0.1 * x for x in xs])]),
                                          Panel("empty")], panel_size=(400, 300)))
    assert (width, height) == (800, 300)
    color = bytes(COLORS[0])
    ink = [(x, y) for y, row in enumerate(rows) for x in range(width) if row[3 * x:3 * x + 3] == color]
    assert ink and all(x < 400 for x, _ in ink)  # only in the first panel
    first, last = min(ink), max(ink)
    assert first[1] < last[1] - 150  # starts high, ends low

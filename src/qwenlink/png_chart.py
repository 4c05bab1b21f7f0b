"""Line charts as PNG files with nothing but the standard library (zlib): what `qwenlink plot` draws when matplotlib
is not installed, so a fresh `pip install qwenlink` (the quickstart's install) can still show its loss curve.

Why not require matplotlib: it is a large dependency with compiled parts, and a run's curves need only lines, a frame,
a grid and a few labels. The chart is a grid of panels; each panel has a title, its y range at the corners and the
step range under it, written in a 3x5 pixel font scaled up. Series are drawn as 2-pixel polylines.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

Color = tuple[int, int, int]
COLORS: tuple[Color, ...] = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))

# 3x5 glyphs, rows top to bottom, "#" = ink. Letters render upper case.
_GLYPHS = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", ".##", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
    "A": (".#.", "#.#", "###", "#.#", "#.#"), "B": ("##.", "#.#", "##.", "#.#", "##."),
    "C": ("###", "#..", "#..", "#..", "###"), "D": ("##.", "#.#", "#.#", "#.#", "##."),
    "E": ("###", "#..", "##.", "#..", "###"), "F": ("###", "#..", "##.", "#..", "#.."),
    "G": ("###", "#..", "#.#", "#.#", "###"), "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"), "J": ("..#", "..#", "..#", "#.#", "###"),
    "K": ("#.#", "#.#", "##.", "#.#", "#.#"), "L": ("#..", "#..", "#..", "#..", "###"),
    "M": ("#.#", "###", "###", "#.#", "#.#"), "N": ("##.", "#.#", "#.#", "#.#", "#.#"),
    "O": ("###", "#.#", "#.#", "#.#", "###"), "P": ("###", "#.#", "###", "#..", "#.."),
    "Q": ("###", "#.#", "#.#", "###", "..#"), "R": ("##.", "#.#", "##.", "#.#", "#.#"),
    "S": ("###", "#..", "###", "..#", "###"), "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"), "V": ("#.#", "#.#", "#.#", "#.#", ".#."),
    "W": ("#.#", "#.#", "###", "###", "#.#"), "X": ("#.#", "#.#", ".#.", "#.#", "#.#"),
    "Y": ("#.#", "#.#", ".#.", ".#.", ".#."), "Z": ("###", "..#", ".#.", "#..", "###"),
    ".": ("...", "...", "...", "...", ".#."), "-": ("...", "...", "###", "...", "..."),
    "+": ("...", ".#.", "###", ".#.", "..."), "/": ("..#", "..#", ".#.", "#..", "#.."),
    ":": ("...", ".#.", "...", ".#.", "..."), "_": ("...", "...", "...", "...", "###"),
    "(": (".#.", "#..", "#..", "#..", ".#."), ")": (".#.", "..#", "..#", "..#", ".#."),
    " ": ("...", "...", "...", "...", "..."),
}


@dataclass
class Panel:
    """One chart: a title and named series of (x, y) points (non-finite points are skipped)."""

    title: str
    series: list[tuple[str, Sequence[float], Sequence[float]]] = field(default_factory=list)


class Canvas:
    """An RGB pixel buffer with the few drawing operations the charts need."""

    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)) -> None:
        self.width, self.height = width, height
        self.rows = [bytearray(bytes(background) * width) for _ in range(height)]

    def pixel(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            self.rows[y][3 * x:3 * x + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        for x in range(x0, x1 + 1):
            self.pixel(x, y0, color)
            self.pixel(x, y1, color)
        for y in range(y0, y1 + 1):
            self.pixel(x0, y, color)
            self.pixel(x1, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, width: int = 2) -> None:
        """Bresenham's line, thickened to `width` pixels."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(width):
                for oy in range(width):
                    self.pixel(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color: Color = (0, 0, 0), scale: int = 2) -> None:
        for i, char in enumerate(text.upper()):
            glyph = _GLYPHS.get(char, _GLYPHS[" "])
            for row, bits in enumerate(glyph):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        for ox in range(scale):
                            for oy in range(scale):
                                self.pixel(x + (4 * i + col) * scale + ox, y + row * scale + oy, color)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(row) for row in self.rows)  # filter type 0 on every row

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + \
            chunk(b"IEND", b"")


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:.3g}"


def _draw_panel(canvas: Canvas, panel: Panel, x0: int, y0: int, width: int, height: int) -> None:
    left, top, right, bottom = x0 + 70, y0 + 30, x0 + width - 15, y0 + height - 30
    canvas.text(x0 + 70, y0 + 8, panel.title)
    canvas.rect(left, top, right, bottom, (0, 0, 0))
    points = [[(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
              for _, xs, ys in panel.series]
    flat = [p for pts in points for p in pts]
    if not flat:
        canvas.text(left + 10, top + 10, "no data", (120, 120, 120))
        return
    xmin, xmax = min(p[0] for p in flat), max(p[0] for p in flat)
    ymin, ymax = min(p[1] for p in flat), max(p[1] for p in flat)
    xspan, yspan = (xmax - xmin) or 1.0, (ymax - ymin) or (abs(ymax) or 1.0)
    for i in range(1, 4):  # light grid at quarters
        gy = top + (bottom - top) * i // 4
        gx = left + (right - left) * i // 4
        for x in range(left + 1, right, 3):
            canvas.pixel(x, gy, (220, 220, 220))
        for y in range(top + 1, bottom, 3):
            canvas.pixel(gx, y, (220, 220, 220))
    canvas.text(x0 + 4, top, _label(ymax))
    canvas.text(x0 + 4, bottom - 10, _label(ymin))
    canvas.text(left, bottom + 8, _label(xmin))
    end = _label(xmax)
    canvas.text(right - 8 * len(end), bottom + 8, end)
    canvas.text((left + right) // 2 - 16, bottom + 8, "step")

    def place(p: tuple[float, float]) -> tuple[int, int]:
        return (left + 1 + round((p[0] - xmin) / xspan * (right - left - 3)),
                bottom - 2 - round((p[1] - ymin) / yspan * (bottom - top - 3)))

    for n, ((name, _, _), pts) in enumerate(zip(panel.series, points)):
        color = COLORS[n % len(COLORS)]
        pixels = [place(p) for p in pts]
        for a, b in zip(pixels, pixels[1:]):
            canvas.line(*a, *b, color)
        if len(pixels) == 1:
            canvas.line(*pixels[0], *pixels[0], color, width=4)
        if len(panel.series) > 1:
            canvas.text(right - 8 * len(name) - 6, top + 6 + 14 * n, name, color)


def render(panels: Sequence[Panel], *, columns: int = 2, panel_size: tuple[int, int] = (520, 320)) -> bytes:
    """PNG bytes of `panels` laid out in a grid of `columns`."""
    rows = max(1, math.ceil(len(panels) / columns))
    width, height = panel_size
    canvas = Canvas(width * min(columns, max(len(panels), 1)), height * rows)
    for i, panel in enumerate(panels):
        _draw_panel(canvas, panel, (i % columns) * width, (i // columns) * height, width, height)
    return canvas.png()


def write_png(path: str | Path, panels: Sequence[Panel], **kwargs) -> Path:
    from qwenlink.fileio import atomic_path

    out = Path(path)
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(render(panels, **kwargs))
    return out

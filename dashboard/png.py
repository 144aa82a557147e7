"""Tiny PNG plots without a plotting library: a line chart and a heat map as RGB pixels, written with zlib.

``megascope report`` draws its figures with it, so the default install needs no matplotlib. The plots carry no
text (there is no font here): the Markdown page beside them names the axes and the ranges.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
GREY: RGB = (200, 200, 200)
BLACK: RGB = (40, 40, 40)
LINE_COLOURS: tuple[RGB, ...] = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


class Canvas:
    def __init__(self, width: int, height: int, background: RGB = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, colour: RGB) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(colour)

    def line(self, x0: int, y0: int, x1: int, y1: int, colour: RGB) -> None:
        """Bresenham's line."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        error = dx + dy
        while True:
            self.set(x0, y0, colour)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * error
            if e2 >= dy:
                error += dy
                x0 += sx
            if e2 <= dx:
                error += dx
                y0 += sy

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: RGB) -> None:
        row = bytes(colour) * max(0, min(x1, self.width) - max(x0, 0))
        for y in range(max(y0, 0), min(y1, self.height)):
            i = 3 * (y * self.width + max(x0, 0))
            self.pixels[i : i + len(row)] = row

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width]) for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        return b"\x89PNG\r\n\x1a\n" + body

    def save(self, path: Path) -> None:
        path.write_bytes(self.png())


MARGIN = 10


def line_chart(
    series: Sequence[Sequence[tuple[float, float]]], width: int = 800, height: int = 300
) -> tuple[Canvas, tuple[float, float, float, float] | None]:
    """Each series of (x, y) points as a line, on shared axes; the canvas and the ranges (x0, x1, y0, y1) drawn."""
    canvas = Canvas(width, height)
    points = [p for s in series for p in s]
    canvas.line(MARGIN, height - MARGIN, width - MARGIN, height - MARGIN, BLACK)
    canvas.line(MARGIN, MARGIN, MARGIN, height - MARGIN, BLACK)
    if not points:
        return canvas, None
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    for quarter in range(1, 4):
        y = MARGIN + quarter * (height - 2 * MARGIN) // 4
        canvas.line(MARGIN + 1, y, width - MARGIN, y, GREY)

    def at(point: tuple[float, float]) -> tuple[int, int]:
        x = MARGIN + round((point[0] - x0) / (x1 - x0) * (width - 2 * MARGIN))
        y = height - MARGIN - round((point[1] - y0) / (y1 - y0) * (height - 2 * MARGIN))
        return x, y

    for n, points_of in enumerate(series):
        colour = LINE_COLOURS[n % len(LINE_COLOURS)]
        previous = None
        for point in points_of:
            here = at(point)
            if previous is not None:
                canvas.line(*previous, *here, colour)
            previous = here
    return canvas, (x0, x1, y0, y1)


def heat_colour(value: float, low: float = 1.0, high: float = 2.0) -> RGB:
    """Green at ``low`` (or below) through yellow to red at ``high`` (or above)."""
    t = min(1.0, max(0.0, (value - low) / (high - low)))
    if t < 0.5:
        return (round(60 + 390 * t), 180, 60)
    return (255, round(180 - 300 * (t - 0.5)), 60)


def heat_map(rows: Sequence[Sequence[float | None]], cell_width: int = 4, cell_height: int = 16) -> Canvas:
    """A row per rank, a column per step bucket; None (no report) is grey."""
    columns = max((len(r) for r in rows), default=0)
    canvas = Canvas(max(1, columns * cell_width), max(1, len(rows) * cell_height))
    for y, row in enumerate(rows):
        for x, value in enumerate(row):
            colour = GREY if value is None else heat_colour(value)
            canvas.rect(x * cell_width, y * cell_height, (x + 1) * cell_width, (y + 1) * cell_height - 1, colour)
    return canvas

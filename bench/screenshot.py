"""Make ``dashboard/screenshot.png``, the picture in README: the real dashboard drawing a scripted cluster.

    python bench/screenshot.py [--size 160x42] [--out dashboard/screenshot.png] [--svg screenshot.svg]

The dashboard (``DashboardApp``, headless through Textual's ``run_test``) draws the scripted cluster the layout
tests draw (``tests/support/tui.py: fault_model``: four ranks on two nodes, rank 3 a straggler; rank 3 crashed at
step 120, the job restarted from the checkpoint of step 100, then rank 1 died and the job is down), so the picture
is the same on every machine. Textual's ``export_screenshot`` gives an SVG; librsvg renders it to PNG through
cairo, both called with ctypes (the shared libraries of most Linux desktops and of this project's CI image), so
nothing has to be installed. A monospace font (DejaVu Sans Mono here) stands in for the SVG's Fira Code.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.tui import drawn, fault_model  # noqa: E402  (the tests' helpers, on the path just above)

from megascope.dashboard.app import DashboardApp  # noqa: E402


async def screenshot_svg(size: tuple[int, int]) -> str:
    app = DashboardApp(model=fault_model())
    async with app.run_test(size=size) as pilot:
        await drawn(app, pilot)
        await pilot.pause(0.3)
        return app.export_screenshot(title="megascope")


def _library(name: str, fallback: str) -> ctypes.CDLL:
    found = ctypes.util.find_library(name) or fallback
    try:
        return ctypes.CDLL(found)
    except OSError as error:
        raise SystemExit(f"{found} is missing ({error}): install librsvg2 (e.g. apt-get install librsvg2-2)") from error


def svg_to_png(svg: str, out: Path, scale: float) -> None:
    """Render ``svg`` into ``out`` with librsvg and cairo (``scale`` times the SVG's own pixel size)."""
    rsvg = _library("rsvg-2", "librsvg-2.so.2")
    cairo = _library("cairo", "libcairo.so.2")

    class Dimensions(ctypes.Structure):
        _fields_ = [("width", ctypes.c_int), ("height", ctypes.c_int), ("em", ctypes.c_double), ("ex", ctypes.c_double)]

    rsvg.rsvg_handle_new_from_data.restype = ctypes.c_void_p
    rsvg.rsvg_handle_new_from_data.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
    rsvg.rsvg_handle_get_dimensions.argtypes = [ctypes.c_void_p, ctypes.POINTER(Dimensions)]
    rsvg.rsvg_handle_render_cairo.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    rsvg.rsvg_handle_render_cairo.restype = ctypes.c_bool
    cairo.cairo_image_surface_create.restype = ctypes.c_void_p
    cairo.cairo_image_surface_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    cairo.cairo_create.restype = ctypes.c_void_p
    cairo.cairo_create.argtypes = [ctypes.c_void_p]
    cairo.cairo_scale.argtypes = [ctypes.c_void_p, ctypes.c_double, ctypes.c_double]
    cairo.cairo_surface_write_to_png.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    cairo.cairo_surface_write_to_png.restype = ctypes.c_int
    cairo.cairo_destroy.argtypes = [ctypes.c_void_p]
    cairo.cairo_surface_destroy.argtypes = [ctypes.c_void_p]

    data = svg.encode()
    handle = rsvg.rsvg_handle_new_from_data(data, len(data), None)
    if not handle:
        raise SystemExit("librsvg could not read the SVG screenshot")
    size = Dimensions()
    rsvg.rsvg_handle_get_dimensions(handle, ctypes.byref(size))
    surface = cairo.cairo_image_surface_create(0, int(size.width * scale), int(size.height * scale))  # ARGB32
    context = cairo.cairo_create(surface)
    cairo.cairo_scale(context, scale, scale)
    try:
        if not rsvg.rsvg_handle_render_cairo(handle, context):
            raise SystemExit("librsvg could not render the SVG screenshot")
        status = cairo.cairo_surface_write_to_png(surface, str(out).encode())
        if status != 0:
            raise SystemExit(f"cairo could not write {out} (cairo status {status})")
    finally:
        cairo.cairo_destroy(context)
        cairo.cairo_surface_destroy(surface)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="160x42", help="terminal columns x lines (default 160x42)")
    parser.add_argument("--out", type=Path, default=REPO / "dashboard" / "screenshot.png")
    parser.add_argument("--svg", type=Path, help="also keep the SVG here")
    parser.add_argument("--scale", type=float, default=1.0, help="PNG pixels per SVG pixel (default 1)")
    args = parser.parse_args(argv)
    columns, _, lines = args.size.partition("x")
    os.environ["TZ"] = "UTC"  # the event log's clock column, as in the snapshots
    time.tzset()
    svg = asyncio.run(screenshot_svg((int(columns), int(lines))))
    if args.svg is not None:
        args.svg.write_text(svg)
    svg_to_png(svg, args.out, args.scale)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes) from a {columns}x{lines} dashboard")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

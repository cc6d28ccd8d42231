"""The HTML report, rendered by a real headless Chromium: its DOM and its pixels.

Skipped where no Chromium is installed (Debian: ``apt-get install chromium``). The screenshot is
decoded here (8-bit RGB/RGBA PNG, as Chromium writes it) to check that every cell was painted in
the colour of its cosine.
"""

from __future__ import annotations

import html
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from safelora_cli.display.heatmap_layout import colour
from safelora_cli.display.html_report import CSP, render_html
from tests.reports import make_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1"]  # fmt: skip
HOSTILE = "model.layers.0.self_attn.<script>document.title='owned'</script>"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)"),
]


def chromium(page: Path, tmp_path: Path, *args: str) -> str:
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    done = subprocess.run(  # noqa: S603 (our own arguments)
        [*command, page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout


class Cells(HTMLParser):
    """The grid cells of a DOM: (class, style, text) of every ``td`` of a ``table.grid``."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, str, str]] = []
        self._open: list[str] | None = None
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.scripts += tag == "script"
        if tag == "td":
            self._open = [found.get("class") or "", found.get("style") or "", ""]

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open[2] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._open is not None:
            self.cells.append((self._open[0], self._open[1], self._open[2]))
            self._open = None


def background(style: str) -> tuple[int, ...] | None:
    found = re.search(r"background:\s*rgb\((\d+),\s*(\d+),\s*(\d+)\)", style)
    return tuple(int(x) for x in found.groups()) if found else None


def png_pixels(data: bytes) -> set[tuple[int, int, int]]:
    """Every distinct RGB colour of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert (depth, interlace) == (8, 0)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    bpp = {2: 3, 6: 4}[ctype]
    raw, stride = zlib.decompress(idat), width * bpp
    prev, colours = bytearray(stride), set()
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):  # PNG's five row filters, undone
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
            else:
                pred = (0, a, b, (a + b) // 2)[kind]
            line[i] = (line[i] + pred) & 0xFF
        colours.update((line[i], line[i + 1], line[i + 2]) for i in range(0, stride, bpp))
        prev = line
    return colours


def test_page_renders_the_grid_in_a_browser(tmp_path: Path) -> None:
    report = make_report(layers=6, num_layers=8, skipped=["model.layers.2.mlp.up_proj"],
                         extra=["lm_head"], seed=4)  # fmt: skip
    report["modules"][0]["module"] = HOSTILE
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    dom = chromium(page, tmp_path, "--dump-dom")
    parser = Cells()
    parser.feed(dom)
    assert parser.scripts == 0  # the hostile name stayed text
    assert "<title>safelora report</title>" in dom  # and did not retitle the page
    assert html.escape("<script>document.title='owned'</script>", quote=False) in dom
    assert f'content="{CSP}"' in dom
    projected = [c for c in parser.cells if c[0] == "projected"]
    assert len(projected) == sum(m["projected"] for m in report["modules"])
    assert sum(c[0] == "skipped" for c in parser.cells) == 1
    for module in report["modules"]:
        if module["cosine"] is None:
            continue
        text = ("*" if module["projected"] else "") + f"{module['cosine']:.2f}"
        rgb = colour(module["cosine"])
        assert any(c[2] == text and background(c[1]) == rgb for c in parser.cells), module["module"]
    assert not re.search(r"(src|href)=", dom)  # self-contained: nothing to fetch


def test_screenshot_shows_every_cell_in_its_colour(tmp_path: Path) -> None:
    report = make_report(layers=4, projs=("q_proj", "v_proj", "down_proj"), num_layers=4, seed=8)
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    shot = tmp_path / "report.png"
    chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=700,700")
    painted = png_pixels(shot.read_bytes())
    for module in report["modules"]:
        assert colour(module["cosine"]) in painted, module["module"]
    assert (0, 0, 0) in painted  # the frames of the projected cells

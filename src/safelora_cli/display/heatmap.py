"""Heat map: a report's cosines at a glance, one row per layer, one column per module type.

CLI side only (it uses rich); the library never imports it. It takes report dicts of every
kind: an adapter's, a batch's list of them, a full fine-tune's (``"kind": "full"``) and a
profile-based one (whose modules carry ``cosine_bound``); ``heatmap_layout`` arranges them.

Each cell is two characters: ``*`` for projected, then the cosine's first decimal (0.37 ->
``3``); ``--`` is skipped, blank is a module the adapter does not have. Profile reports add a
third character, ``~`` where the cosine is within its error bound of the selection cut. The
terminal form colours each cell by its cosine; the text form (``heatmap_text``: no colour, no
escape codes, ASCII only) is for logs and for ``NO_COLOR``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from rich.color import Color
from rich.console import Console, Group
from rich.style import Style
from rich.text import Text

from safelora_cli.display.heatmap_layout import (
    Cell,
    Layout,
    Stack,
    colour,
    column_headers,
    layout,
    title,
)
from safelora_cli.display.sink import plain as printable

MAX_WIDTH = 100
Reports = Mapping[str, Any] | Sequence[Mapping[str, Any]]
Span = tuple[str, Style | None]


def heatmap_lines(reports: Reports, width: int = MAX_WIDTH) -> list[list[Span]]:
    """The heat map as lines of styled spans, every line at most ``width`` characters."""
    width = max(width, 40)
    many = [reports] if isinstance(reports, Mapping) else list(reports)
    lines: list[list[Span]] = []
    for k, report in enumerate(many):
        if k:
            lines.append([])
        if not isinstance(report, Mapping):
            lines.append([("(not a report: ignored)", None)])
            continue
        lines += _render(layout(report), width)
    return lines


def heatmap_text(reports: Reports, width: int = MAX_WIDTH) -> str:
    """The plain-text form: ASCII only, no colour or escape codes, one line per layer."""
    lines = heatmap_lines(reports, width)
    return "\n".join("".join(text for text, _ in line).rstrip() for line in lines)


def heatmap_renderable(reports: Reports, width: int = MAX_WIDTH) -> Group:
    """The terminal form: the same grid, cells coloured by cosine (red low, green high)."""
    texts = []
    for line in heatmap_lines(reports, width):
        text = Text(no_wrap=True, overflow="crop")
        for part, style in line:
            text.append(part, style)  # Text.append never interprets markup
        texts.append(text)
    return Group(*texts)


def print_heatmap(console: Console, reports: Reports) -> None:
    """Show the heat map on ``console``: coloured on a terminal, plain text otherwise or with
    NO_COLOR (rich sets ``console.no_color`` from it)."""
    width = min(console.width, MAX_WIDTH) if console.is_terminal else MAX_WIDTH
    if console.is_terminal and not console.no_color:
        console.print(heatmap_renderable(reports, width), crop=True)
    else:
        console.file.write(heatmap_text(reports, width) + "\n")
        console.file.flush()


def _render(lay: Layout, width: int) -> list[list[Span]]:
    lines: list[list[Span]] = [[(title(lay.report, width), Style(bold=True))]]
    legends: list[str] = []
    for stack in lay.stacks:
        lines.append([(printable(f"{stack.name}.<layer>:", width, ascii_only=True), None)])
        lines += _grid(stack, lay.bounds, width, legends)
    if lay.other:
        items = [f"{printable(n, 40, ascii_only=True)} {c.core(lay.bounds)}" for n, c in
                 lay.other.items()]  # fmt: skip
        lines += [[(line, None)] for line in _wrap("other: " + "   ".join(items), width)]
    legend = (
        "cells: cosine x 10 rounded down (0.37 -> 3); * projected; -- skipped; blank: not adapted"
    )
    if lay.bounds:
        legend += "; ~ selection left open by the profile's error bound"
    if any("*" in column for stack in lay.stacks for column in stack.columns):
        legend += "; a column with * holds several modules per layer and shows the lowest cosine"
    if lay.ignored:
        legend += f"; {lay.ignored} malformed module entries ignored"
    for text in [*legends, legend, lay.summary]:
        lines += [[(line, Style(dim=True))] for line in _wrap(text, width)]
    return lines


def _grid(stack: Stack, bounds: bool, width: int, legends: list[str]) -> list[list[Span]]:
    """The stack's rows; columns split into blocks when they do not fit in ``width``."""
    core = 3 if bounds else 2
    labels = {index: printable(str(index), 8) for index in stack.rows}
    label_width = max(5, *(len(label) for label in labels.values()))
    per_block = min(len(stack.columns), max(1, (width - label_width) // (core + 1)))
    headers = column_headers(stack.columns)
    names = [headers[c] for c in stack.columns]
    cell = max(core, min(max(map(len, names)), (width - label_width) // per_block - 1))
    shown = dict(zip(stack.columns, _abbreviate(names, cell), strict=True))
    keys = [f"{shown[c]}={headers[c]}" for c in stack.columns if shown[c] != headers[c]]
    if keys:
        legends.append("columns: " + ", ".join(keys))
    lines: list[list[Span]] = []
    for start in range(0, len(stack.columns), per_block):
        block = stack.columns[start : start + per_block]
        header = "layer".rjust(label_width) + "".join(f" {shown[c]:>{cell}}" for c in block)
        lines.append([(header, None)])
        for index in sorted(stack.rows):
            line: list[Span] = [(labels[index].rjust(label_width), None)]
            for column in block:
                found = stack.rows[index].get(column)
                text = found.core(bounds) if found else ""
                # the whole cell is coloured, so the grid reads as blocks of colour
                line += [(" ", None), (text.rjust(cell), _style(found) if found else None)]
            lines.append(line)
    return lines


def _abbreviate(names: list[str], width: int) -> list[str]:
    """Names cut to ``width``: as they are if they fit, else without a common "_proj"-like
    suffix, else letters (the legend then says which is which)."""
    if all(len(n) <= width for n in names):
        return names
    common = _common_suffix(names) if len(names) > 1 else ""
    cut = [(n[: len(n) - len(common)] or n)[:width] for n in names]
    if len(set(cut)) == len(cut):
        return cut
    return [_letters(k)[:width] for k in range(len(names))]


def _common_suffix(names: list[str]) -> str:
    reversed_names = [n[::-1] for n in names]
    prefix = reversed_names[0]
    for name in reversed_names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[::-1]


def _letters(k: int) -> str:
    text = ""
    k += 1
    while k:
        k, rest = divmod(k - 1, 26)
        text = chr(ord("a") + rest) + text
    return text


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_on_hyphens=False) or [""]


def _style(cell: Cell) -> Style:
    if cell.cosine is None:
        return Style(dim=True)
    return Style(color="black", bgcolor=Color.from_rgb(*colour(cell.cosine)), bold=cell.projected)

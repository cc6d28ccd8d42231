"""Heat map: a report's cosines at a glance, one row per layer, one column per module type.

CLI side only (it uses rich); the library never imports it. It works on report dicts, of every
kind: an adapter's, a batch's list of them, a full fine-tune's (``"kind": "full"``) and a
profile-based one (whose modules carry ``cosine_bound``). Reports may come from a file
(``safelora show``), so every field is checked and a malformed entry is counted, never fatal.

Layout: a module name is split at its first numeric component into a stack ("model.layers"),
a layer (the number) and a column ("self_attn.q_proj", shown by its shortest unique suffix,
"q_proj"); further numbers become "*" (MoE experts share a column and show their lowest
cosine). Names without a number (lm_head, embed_tokens) go in an "other" line. Each cell is
two characters: ``*`` for projected, then the cosine's first decimal (0.37 -> ``3``); ``--``
is skipped, blank is a module the adapter does not have. Profile reports add a third character,
``~`` where the cosine is within its error bound of the selection cut. The terminal form colours
each cell by its cosine; the text form (``heatmap_text``: no colour, no escape codes, ASCII
only) is for logs and for ``NO_COLOR``.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.color import Color
from rich.console import Console, Group
from rich.style import Style
from rich.text import Text

from safelora_cli.untrusted import printable

MAX_WIDTH = 100
MAX_COLUMNS = 48  # more distinct module types than this share one "(others)" column
_OTHERS = "(others)"
ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj",
         "gate_up_proj", "down_proj", "c_attn", "c_proj", "c_fc", "query_key_value", "W_pack",
         "Wqkv", "dense", "dense_h_to_4h", "dense_4h_to_h", "out_proj", "fc1", "fc2")  # fmt: skip
_LAYER = re.compile(r"(?P<stack>.*?)\.(?P<index>\d+)\.(?P<rest>.+)")
Reports = Mapping[str, Any] | Sequence[Mapping[str, Any]]
Span = tuple[str, Style | None]


@dataclass
class Cell:
    """What a grid cell shows: the lowest cosine of the modules in it, and their states."""

    cosine: float | None = None
    projected: bool = False
    uncertain: bool = False
    skipped: int = 0
    invalid: int = 0
    modules: int = 0

    def add(self, entry: Mapping[str, Any], cut: float | None) -> None:
        self.modules += 1
        cosine, bound = _number(entry.get("cosine")), _number(entry.get("cosine_bound"))
        if cosine is None:
            if entry.get("skipped"):
                self.skipped += 1
            else:
                self.invalid += 1
            return
        self.cosine = cosine if self.cosine is None else min(self.cosine, cosine)
        self.projected |= entry.get("projected") is True
        self.uncertain |= bound is not None and cut is not None and abs(cosine - cut) <= bound

    def core(self, bounds: bool) -> str:
        """Two characters (three with bounds): marker and first decimal, or ``--`` / ``!!``."""
        if self.cosine is None:
            text = "!!" if self.invalid else "--"
            return text + (" " if bounds else "")
        digit = min(9, max(0, math.floor(self.cosine * 10)))
        text = ("*" if self.projected else " ") + str(digit)
        return text + (("~" if self.uncertain else " ") if bounds else "")

    def style(self) -> Style | None:
        if self.cosine is None:
            return Style(dim=True)
        return Style(color="black", bgcolor=_colour(self.cosine), bold=self.projected)


@dataclass
class Stack:
    """The repeated layers under one name ("model.layers"): rows by layer, cells by column."""

    name: str
    rows: dict[int, dict[str, Cell]] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)


@dataclass
class Layout:
    """One report, arranged: its stacks, the modules outside them, and the footer."""

    report: Mapping[str, Any]
    stacks: list[Stack]
    other: dict[str, Cell]
    bounds: bool
    summary: str
    ignored: int


def layout(report: Mapping[str, Any]) -> Layout:
    """Arrange one report's modules into stacks of layers × columns (see the module docstring)."""
    summary = _mapping(report, "summary")
    cut = _number(summary.get("threshold_used"))
    raw = report.get("modules")
    entries = raw if isinstance(raw, list) else []
    stacks: dict[str, Stack] = {}
    other: dict[str, Cell] = {}
    ignored, bounds, counts = 0, False, {"modules": 0, "projected": 0, "skipped": 0}
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("module"), str):
            ignored += 1
            continue
        bounds |= _number(entry.get("cosine_bound")) is not None
        counts["modules"] += 1
        counts["projected"] += entry.get("projected") is True
        counts["skipped"] += entry.get("cosine") is None and bool(entry.get("skipped"))
        match = _LAYER.fullmatch(entry["module"])
        if match is None:
            other.setdefault(entry["module"], Cell()).add(entry, cut)
            continue
        stack = stacks.setdefault(match["stack"], Stack(match["stack"]))
        column = ".".join("*" if p.isdigit() else p for p in match["rest"].split("."))
        row = stack.rows.setdefault(int(match["index"]), {})
        row.setdefault(column, Cell()).add(entry, cut)
    for stack in stacks.values():
        _order_columns(stack)
    return Layout(
        report, list(stacks.values()), other, bounds, _summary(report, counts, cut), ignored
    )


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
    lines: list[list[Span]] = [[(_title(lay.report, width), Style(bold=True))]]
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
        legend += "; ~ within the profile's error bound of the cut"
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
    headers = _headers(stack.columns)
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
                line += [(" ", None), (text.rjust(cell), found.style() if found else None)]
            lines.append(line)
    return lines


def _order_columns(stack: Stack) -> None:
    """Known projections in model order, then the rest by first appearance; at most
    MAX_COLUMNS, the rarest beyond that merged into one column."""
    counts: dict[str, int] = {}
    for row in stack.rows.values():
        for column in row:
            counts[column] = counts.get(column, 0) + 1
    order = list(counts)
    if len(order) > MAX_COLUMNS:
        keep = set(sorted(order, key=lambda c: -counts[c])[: MAX_COLUMNS - 1])
        for row in stack.rows.values():
            for column in [c for c in row if c not in keep]:
                _merge(row.setdefault(_OTHERS, Cell()), row.pop(column))
        order = [c for c in order if c in keep] + [_OTHERS]
    rank = {name: k for k, name in enumerate(ORDER)}
    stack.columns = sorted(order, key=lambda c: (rank.get(c.rsplit(".", 1)[-1], len(ORDER)),
                                                 order.index(c)))  # fmt: skip


def _merge(into: Cell, cell: Cell) -> None:
    if cell.cosine is not None:
        into.cosine = cell.cosine if into.cosine is None else min(into.cosine, cell.cosine)
    into.projected |= cell.projected
    into.uncertain |= cell.uncertain
    into.skipped += cell.skipped
    into.invalid += cell.invalid
    into.modules += cell.modules


def _headers(columns: list[str]) -> dict[str, str]:
    """Each column by the shortest suffix (in dotted parts) that no other column ends with."""
    split = {c: c.split(".") for c in columns}
    headers = {}
    for column, parts in split.items():
        stars = [k for k, part in enumerate(parts) if part == "*"]
        # a column that merges numbered modules (MoE experts) keeps the name of what it merges
        least = len(parts) - stars[-1] + 1 if stars else 1
        for k in range(min(least, len(parts)), len(parts) + 1):
            suffix = parts[-k:]
            if all(other[-k:] != suffix for c, other in split.items() if c != column):
                break
        headers[column] = printable(".".join(suffix), 40, ascii_only=True)
    return headers


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


def _title(report: Mapping[str, Any], width: int) -> str:
    """ "safelora scores: NAME (kind)", the name shortened in the middle to fit ``width``."""
    inputs = _mapping(report, "inputs")
    kind = report.get("kind") if isinstance(report.get("kind"), str) else "adapter"
    for role in ("adapter", "finetune", "model"):
        entry = inputs.get(role)
        if isinstance(entry, Mapping) and (entry.get("ref") or entry.get("path")):
            name = entry.get("ref") or entry.get("path")
            break
    else:
        name = report.get("output") or "(unnamed)"
    profile = " via profile" if isinstance(inputs.get("profile"), Mapping) else ""
    suffix = f" ({printable(kind, 20, ascii_only=True)}{profile})"
    room = width - len("safelora scores: ") - len(suffix)
    return f"safelora scores: {printable(name, room, ascii_only=True)}{suffix}"


def _summary(report: Mapping[str, Any], counts: dict[str, int], cut: float | None) -> str:
    settings = _mapping(report, "settings")
    if settings.get("select") == "threshold":
        rule = f"threshold, T={_short(settings.get('threshold'))}"
    else:
        rule = f"number, K={_short(settings.get('num_layers'))}"
    if cut is not None:
        rule += f"; cut {cut:.4g}"
    return (f"{counts['projected']} of {counts['modules']} modules projected ({rule}), "
            f"{counts['skipped']} skipped")  # fmt: skip


def _short(value: Any) -> str:
    number = _number(value)
    return f"{number:g}" if number is not None else "?"


def _mapping(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = report.get(key)
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_on_hyphens=False) or [""]


def _colour(cosine: float) -> Color:
    """Red (0) through yellow (0.5) to green (1): ColorBrewer's RdYlGn ends and middle."""
    stops = ((0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80)))
    x = min(1.0, max(0.0, cosine))
    (x0, c0), (x1, c1) = (stops[0], stops[1]) if x <= 0.5 else (stops[1], stops[2])
    t = (x - x0) / (x1 - x0)
    red, green, blue = (round(u + (v - u) * t) for u, v in zip(c0, c1, strict=True))
    return Color.from_rgb(red, green, blue)

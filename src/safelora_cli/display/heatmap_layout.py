"""The heat map's layout: a report's modules arranged as stacks of layers × module types.

Pure data, shared by the terminal and text forms (``heatmap``) and the HTML report. A module
name is split at its first numeric component into a stack ("model.layers"), a layer (the
number) and a column ("self_attn.q_proj", shown by its shortest unique suffix, "q_proj");
further numbers become "*", so MoE experts share a column, whose cell shows their lowest
cosine. Names without a number (lm_head, embed_tokens) are kept apart, in ``other``.

Reports may come from a file (``safelora show``): every field is checked, and a malformed
entry is counted, never fatal.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from safelora_cli.display.sink import plain as printable

MAX_COLUMNS = 48  # more distinct module types than this share one "(others)" column
OTHERS = "(others)"
ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj",
         "gate_up_proj", "down_proj", "c_attn", "c_proj", "c_fc", "query_key_value", "W_pack",
         "Wqkv", "dense", "dense_h_to_4h", "dense_4h_to_h", "out_proj", "fc1", "fc2")  # fmt: skip
# a layer number is ASCII digits, at most 9 of them: a longer number (thousands of digits in a
# crafted report) is not a layer, and its module is shown with the others
_LAYER = re.compile(r"(?P<stack>.*?)\.(?P<index>[0-9]{1,9})\.(?P<rest>.+)")


@dataclass
class Cell:
    """What a grid cell shows: the lowest cosine of the modules in it, and their states."""

    cosine: float | None = None
    projected: bool = False
    uncertain: bool = False
    skipped: int = 0
    invalid: int = 0
    modules: int = 0
    names: list[str] = field(default_factory=list)  # the first few, for tooltips

    def add(self, entry: Mapping[str, Any], cut: float | None) -> None:
        self.modules += 1
        if len(self.names) < 4:
            self.names.append(str(entry.get("module")))
        cosine, bound = number(entry.get("cosine")), number(entry.get("cosine_bound"))
        if cosine is None:
            if entry.get("skipped"):
                self.skipped += 1
            else:
                self.invalid += 1
            return
        self.cosine = cosine if self.cosine is None else min(self.cosine, cosine)
        self.projected |= entry.get("projected") is True
        if "uncertain" in entry:  # the run's own verdict (the whole selection, both sides)
            self.uncertain |= entry["uncertain"] is True
        else:  # an older report: near the cut, within the bound
            self.uncertain |= bound is not None and cut is not None and abs(cosine - cut) <= bound

    def core(self, bounds: bool) -> str:
        """Two characters (three with bounds): marker and first decimal, or ``--`` / ``!!``."""
        if self.cosine is None:
            text = "!!" if self.invalid else "--"
            return text + (" " if bounds else "")
        digit = min(9, max(0, math.floor(self.cosine * 10)))
        text = ("*" if self.projected else " ") + str(digit)
        return text + (("~" if self.uncertain else " ") if bounds else "")


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
    summary = mapping(report, "summary")
    cut = number(summary.get("threshold_used"))
    raw = report.get("modules")
    entries = raw if isinstance(raw, list) else []
    stacks: dict[str, Stack] = {}
    other: dict[str, Cell] = {}
    ignored, bounds, counts = 0, False, {"modules": 0, "projected": 0, "skipped": 0}
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("module"), str):
            ignored += 1
            continue
        bounds |= number(entry.get("cosine_bound")) is not None
        counts["modules"] += 1
        counts["projected"] += entry.get("projected") is True
        counts["skipped"] += entry.get("cosine") is None and bool(entry.get("skipped"))
        match = _LAYER.fullmatch(entry["module"])
        if match is None:
            other.setdefault(entry["module"], Cell()).add(entry, cut)
            continue
        stack = stacks.setdefault(match["stack"], Stack(match["stack"]))
        column = ".".join(
            "*" if p.isascii() and p.isdigit() else p for p in match["rest"].split(".")
        )
        row = stack.rows.setdefault(int(match["index"]), {})
        row.setdefault(column, Cell()).add(entry, cut)
    for stack in stacks.values():
        _order_columns(stack)
    return Layout(
        report, list(stacks.values()), other, bounds, summary_line(report, counts, cut), ignored
    )


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
                _merge(row.setdefault(OTHERS, Cell()), row.pop(column))
        order = [c for c in order if c in keep] + [OTHERS]
    rank = {name: k for k, name in enumerate(ORDER)}
    stack.columns = sorted(order, key=lambda c: (rank.get(c.rsplit(".", 1)[-1], len(ORDER)),
                                                 order.index(c)))  # fmt: skip


def _merge(into: Cell, cell: Cell) -> None:
    if cell.cosine is not None:
        into.cosine = cell.cosine if into.cosine is None else min(into.cosine, cell.cosine)
    into.projected |= cell.projected
    into.uncertain |= cell.uncertain
    into.names = (into.names + cell.names)[:4]
    into.skipped += cell.skipped
    into.invalid += cell.invalid
    into.modules += cell.modules


def column_headers(columns: list[str]) -> dict[str, str]:
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


def title(report: Mapping[str, Any], width: int) -> str:
    """The title line, 'safelora scores: NAME (kind)', NAME shortened to fit ``width``."""
    inputs = mapping(report, "inputs")
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


def summary_line(report: Mapping[str, Any], counts: dict[str, int], cut: float | None) -> str:
    """'6 of 16 modules projected (number, K=10; cut 0.379), 1 skipped'."""
    settings = mapping(report, "settings")
    if settings.get("select") == "threshold":
        rule = f"threshold, T={_short(settings.get('threshold'))}"
    else:
        rule = f"number, K={_short(settings.get('num_layers'))}"
    if cut is not None:
        rule += f"; cut {cut:.4g}"
    return (f"{counts['projected']} of {counts['modules']} modules projected ({rule}), "
            f"{counts['skipped']} skipped")  # fmt: skip


def colour(cosine: float) -> tuple[int, int, int]:
    """Red (0) through yellow (0.5) to green (1): ColorBrewer's RdYlGn ends and middle."""
    stops = ((0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80)))
    x = min(1.0, max(0.0, cosine))
    (x0, c0), (x1, c1) = (stops[0], stops[1]) if x <= 0.5 else (stops[1], stops[2])
    t = (x - x0) / (x1 - x0)
    red, green, blue = (round(u + (v - u) * t) for u, v in zip(c0, c1, strict=True))
    return red, green, blue


def _short(value: Any) -> str:
    found = number(value)
    return f"{found:g}" if found is not None else "?"


def mapping(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``report[key]`` if it is a mapping, else an empty one (reports may be malformed)."""
    value = report.get(key)
    return value if isinstance(value, Mapping) else {}


def number(value: Any) -> float | None:
    """A finite int or float as float; anything else (None, NaN, a string, a bool) is None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None

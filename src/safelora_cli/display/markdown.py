"""Markdown: a report as GitHub-flavoured markdown, for CI step summaries and pull-request
comments (``safelora show REPORT --markdown``; appended to ``$GITHUB_STEP_SUMMARY`` in GitHub
Actions).

Per report: a title, the summary line, the heat map as one table per stack of layers (the
``heatmap_layout`` arrangement the terminal and HTML forms share), the modules projected, and the
warnings. Everything a report holds may come from a stranger's files (tensor names, paths,
warning text), and a summary is rendered as HTML by GitHub: names go into code spans, free text
has every ASCII punctuation character backslash-escaped and ``<``/``>``/``&`` written as
entities, so no markdown, link or HTML from a report is ever interpreted. Malformed reports
(from a file) render what they can, as the heat map does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from safelora_cli.display.heatmap_layout import (
    Cell,
    Layout,
    column_headers,
    layout,
    mapping,
    number,
)
from safelora_cli.untrusted import printable

MAX_ROWS = 100
"""The projected-modules table lists at most this many (a step summary holds 1 MiB)."""
MAX_NAME = 200
_PUNCTUATION = re.compile(r"([!\"#$%'()*+,\-./:;=?@\[\\\]^_`{|}~])")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def text(value: Any, limit: int = 2000) -> str:
    """Untrusted free text as markdown that shows exactly these characters, on one line."""
    shown = printable(value, limit)
    shown = _PUNCTUATION.sub(r"\\\1", shown)
    return "".join(_ENTITIES.get(c, c) for c in shown)


def code(value: Any, limit: int = MAX_NAME, cell: bool = True) -> str:
    """An untrusted name (tensor, path) as a code span: nothing inside it is interpreted; in a
    table ``cell``, ``|`` is escaped, since GitHub splits table cells on it even inside code."""
    shown = printable(value, limit)
    if cell:
        shown = shown.replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", shown)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if shown.startswith("`") or shown.endswith("`") or not shown.strip() else ""
    return f"{fence}{pad}{shown}{pad}{fence}"


def _subject(report: Mapping[str, Any]) -> Any:
    inputs = mapping(report, "inputs")
    for role in ("adapter", "model"):
        entry = inputs.get(role)
        if isinstance(entry, Mapping) and (entry.get("ref") or entry.get("path")):
            return entry.get("ref") or entry.get("path")
    return report.get("output") or "(unnamed)"


def _cell(cell: Cell | None, bounds: bool) -> str:
    if cell is None:
        return ""
    if cell.cosine is None:
        return "!!" if cell.invalid else "--"
    value = f"{cell.cosine:.2f}" + ("~" if bounds and cell.uncertain else "")
    return f"**▼ {value}**" if cell.projected else value


def _heatmap(lay: Layout) -> list[str]:
    lines: list[str] = []
    for stack in lay.stacks:
        headers = column_headers(stack.columns)
        lines += [
            "",
            f"{code(stack.name + '.<layer>')}",
            "",
            "| layer | " + " | ".join(code(headers[c], 40) for c in stack.columns) + " |",
            "| ---: |" + " :---: |" * len(stack.columns),
        ]
        for index in sorted(stack.rows):
            row = stack.rows[index]
            cells = [_cell(row.get(column), lay.bounds) for column in stack.columns]
            lines.append(f"| {index} | " + " | ".join(cells) + " |")
    if lay.other:
        lines += ["", "| module | cosine |", "| :--- | :---: |"]
        lines += [f"| {code(name)} | {_cell(c, lay.bounds)} |" for name, c in lay.other.items()]
    legend = "cells: the lowest cosine of the modules there; **▼** projected; -- skipped"
    if lay.bounds:
        legend += "; ~ the profile's error bound leaves the selection open"
    if lay.ignored:
        legend += f"; {lay.ignored} malformed module entries ignored"
    return [*lines, "", f"<sub>{legend}</sub>"]  # our own words: markdown meant


def _projected(report: Mapping[str, Any]) -> list[str]:
    raw = report.get("modules")
    modules = [m for m in raw if isinstance(m, Mapping)] if isinstance(raw, list) else []
    chosen = [m for m in modules if m.get("projected") is True]
    output = report.get("output")
    verb = "would be projected" if output is None else "projected"
    if not chosen:
        return ["", f"No module {verb}."]
    bounds = any(number(m.get("cosine_bound")) is not None for m in chosen)
    lines = ["", f"<details><summary>{len(chosen)} modules {verb}</summary>", ""]
    lines.append("| module | cosine |" + (" bound |" if bounds else ""))
    lines.append("| :--- | ---: |" + (" ---: |" if bounds else ""))
    for module in chosen[:MAX_ROWS]:
        cosine = number(module.get("cosine"))
        row = f"| {code(module.get('module'))} | {'-' if cosine is None else f'{cosine:.4f}'} |"
        if bounds:
            bound = number(module.get("cosine_bound"))
            row += f" {'-' if bound is None else f'±{bound:.3g}'} |"
        lines.append(row)
    if len(chosen) > MAX_ROWS:
        lines.append(f"| … and {len(chosen) - MAX_ROWS} more | |" + (" |" if bounds else ""))
    return [*lines, "", "</details>"]


def _warnings(report: Mapping[str, Any]) -> list[str]:
    raw = report.get("warnings")
    warnings = [w for w in raw if isinstance(w, Mapping)] if isinstance(raw, list) else []
    if not warnings:
        return []
    lines = ["", f"**Warnings** ({len(warnings)})", ""]
    for warning in warnings:
        lines.append(
            f"- {code(warning.get('code'), 60, cell=False)}: {text(warning.get('message'))}"
        )
    return lines


def report_markdown(report: Mapping[str, Any], gate: str | None = None) -> str:
    """One report as a markdown section (see the module docstring); ``gate``: a failed gate's
    message, shown first."""
    lay = layout(report)
    kind = report.get("kind") if isinstance(report.get("kind"), str) else "adapter"
    via = " via a profile" if isinstance(mapping(report, "inputs").get("profile"), Mapping) else ""
    lines = [f"### safelora: {code(_subject(report), cell=False)} ({text(kind, 20)}{via})", ""]
    if gate is not None:
        lines += [f"> **Gate failed:** {text(gate)}", ""]
    lines.append(text(lay.summary))
    lines += _heatmap(lay)
    lines += _projected(report)
    lines += _warnings(report)
    return "\n".join(lines) + "\n"


def reports_markdown(
    reports: Sequence[Mapping[str, Any]], gates: Mapping[int, str] | None = None
) -> str:
    """Several reports' sections, in order; ``gates``: report index -> failed gate message."""
    gates = gates or {}
    parts = [
        report_markdown(r, gates.get(k)) if isinstance(r, Mapping) else "(not a report)\n"
        for k, r in enumerate(reports)
    ]
    return "\n".join(parts)

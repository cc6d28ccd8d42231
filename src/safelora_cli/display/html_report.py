"""HTML report: one self-contained page for a saved report or a batch (``show --html FILE``).

The page holds the same heat map as the terminal (``heatmap_layout``), with the cosine in each
cell and the module names in its tooltip, then every module's numbers. It loads nothing: no
script, no font, no image; a Content-Security-Policy forbids them, so even a name that slipped
through escaping could not fetch or run anything. Every string from the report is escaped
through the display sink (``sink.html``: control and invisible characters made visible, then
``html.escape``), numbers included (``sink.number``). Rendering is linear in the report's size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from safelora_cli.display.heatmap_layout import (
    Cell,
    Layout,
    colour,
    column_headers,
    layout,
    number,
    title,
)
from safelora_cli.display.sink import html as _safe
from safelora_cli.display.sink import number as _number

Reports = Mapping[str, Any] | Sequence[Mapping[str, Any]]
CSP = "default-src 'none'; style-src 'unsafe-inline'"
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; } h3 { font-size: 1em; }
table { border-collapse: collapse; }
table.grid td, table.grid th { border: 1px solid #fff; padding: 2px 6px; text-align: center;
  font: 12px/1.3 ui-monospace, monospace; min-width: 3.2em; }
table.grid thead th:not(:first-child) { writing-mode: vertical-rl; transform: rotate(180deg);
  text-align: left; }
td.projected { outline: 2px solid #000; outline-offset: -2px; font-weight: bold; }
td.skipped { background: repeating-linear-gradient(45deg, #ddd, #ddd 3px, #fff 3px, #fff 6px);
  color: #666; }
td.invalid { background: #000; color: #fff; }
td.absent { background: #f6f6f6; }
table.modules td, table.modules th { border-bottom: 1px solid #ddd; padding: 2px 8px;
  font: 12px ui-monospace, monospace; text-align: right; }
table.modules td:first-child, table.modules th:first-child { text-align: left; }
.legend span { display: inline-block; padding: 1px 8px; font: 12px ui-monospace, monospace; }
.warning { color: #8a3b00; }
"""


def render_html(reports: Reports) -> str:
    """The whole page for one report or a batch (a list of reports), as a string.

    Example:
        >>> Path("report.html").write_text(render_html(json.loads(Path(REPORT).read_text())))
    """
    many = [reports] if isinstance(reports, Mapping) else list(reports)
    body = [
        _report(r) if isinstance(r, Mapping) else "<p>(not a report: ignored)</p>" for r in many
    ]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        "<title>safelora report</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>safelora report</h1>", *body, _legend(), "</body></html>", "",
    ])  # fmt: skip


def _report(report: Mapping[str, Any]) -> str:
    lay = layout(report)
    parts = [f"<section><h2>{_text(title(report, 200))}</h2>", f"<p>{_text(lay.summary)}</p>"]
    parts.append(f"<p>{_inputs(report)}</p>")
    warnings = report.get("warnings")
    for warning in warnings if isinstance(warnings, list) else []:
        message = warning.get("message") if isinstance(warning, Mapping) else warning
        parts.append(f'<p class="warning">warning: {_text(message)}</p>')
    for stack in lay.stacks:
        parts.append(f"<h3>{_text(stack.name)}.&lt;layer&gt;</h3>")
        parts.append(_grid(stack.columns, stack.rows, lay))
    if lay.other:  # headed by their names: any number of them, in linear time
        parts.append("<h3>other modules</h3>")
        names = {name: _text(name) for name in lay.other}
        parts.append(_grid(list(lay.other), {0: lay.other}, lay, label="", headers=names))
    parts.append(_modules(report))
    return "\n".join([*parts, "</section>"])


def _grid(
    columns: list[str],
    rows: Mapping[int, Mapping[str, Cell]],
    lay: Layout,
    label: str = "layer",
    headers: Mapping[str, str] | None = None,
) -> str:
    """A table like the terminal grid; ``label`` "" for the row of modules outside layers,
    whose ``headers`` (escaped) are given."""
    if headers is None:  # a stack's columns: at most MAX_COLUMNS, short unique suffixes
        headers = {c: _text(h) for c, h in column_headers(columns).items()}
    head = "".join(f"<th>{headers[c]}</th>" for c in columns)
    lines = [f'<table class="grid"><thead><tr><th>{label}</th>{head}</tr></thead><tbody>']
    for index in sorted(rows):
        cells = "".join(_cell(rows[index].get(c), lay.bounds) for c in columns)
        lines.append(f"<tr><th>{_text(index) if label else ''}</th>{cells}</tr>")
    return "\n".join([*lines, "</tbody></table>"])


def _cell(cell: Cell | None, bounds: bool) -> str:
    if cell is None:
        return '<td class="absent"></td>'
    tip = _text(", ".join(cell.names) + (" ..." if cell.modules > len(cell.names) else ""))
    if cell.cosine is None:
        kind = "invalid" if cell.invalid else "skipped"
        return f'<td class="{kind}" title="{tip}: {kind}">{"!!" if cell.invalid else "--"}</td>'
    red, green, blue = colour(cell.cosine)
    marks = ("*" if cell.projected else "") + ("~" if bounds and cell.uncertain else "")
    state = "projected" if cell.projected else "kept"
    tip += f": cosine {_safe(_number(cell.cosine, '.4f'))}, {state}"
    background = f"background:rgb({red},{green},{blue})"
    shown = _safe(_number(cell.cosine, ".2f"))
    return f'<td class="{state}" style="{background}" title="{tip}">{marks}{shown}</td>'


def _inputs(report: Mapping[str, Any]) -> str:
    inputs = report.get("inputs")
    parts = []
    for role, entry in inputs.items() if isinstance(inputs, Mapping) else []:
        if isinstance(entry, Mapping):
            ref = entry.get("ref") or entry.get("path")
            commit = f" (commit {_text(entry['commit'])})" if entry.get("commit") else ""
            parts.append(f"{_text(role)}: <code>{_text(ref)}</code>{commit}")
    return " &middot; ".join(parts)


def _modules(report: Mapping[str, Any]) -> str:
    columns = ("module", "cosine", "projected", "skipped", "v_norm", "b_norm_before",
               "b_norm_after", "pdst", "cosine_bound")  # fmt: skip
    modules = [m for m in report.get("modules") or [] if isinstance(m, Mapping)]
    used = [c for c in columns if any(c in m for m in modules)]
    head = "".join(f"<th>{c}</th>" for c in used)
    rows = ["".join(f"<td>{_value(m.get(c))}</td>" for c in used) for m in modules]
    body = "\n".join(f"<tr>{row}</tr>" for row in rows)
    return (f"<details><summary>every module ({len(modules)})</summary>"
            f'<table class="modules"><thead><tr>{head}</tr></thead><tbody>\n{body}\n'
            "</tbody></table></details>")  # fmt: skip


def _legend() -> str:
    steps = [k / 10 for k in range(11)]
    swatches = "".join(f'<span style="background:rgb{colour(x)}">{x:.1f}</span>' for x in steps)
    return (f'<p class="legend">cosine: {swatches} &nbsp; <b>*</b> and a black frame: projected; '
            "-- on hatching: skipped; ~: selection left open by the profile's error bound; "
            "hover a cell for its modules</p>")  # fmt: skip


def _value(value: Any) -> str:
    if value is None:
        return ""
    if number(value) is not None:
        return _safe(_number(value, "d" if isinstance(value, int) else ".4g"))
    return _text(value)


def _text(value: Any) -> str:
    return _safe(value, 300)

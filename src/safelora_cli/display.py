"""Display: what the commands show on stderr (progress, the run's summary table, the presets
and inspect tables), and the result they print to stdout.

CLI side only: the library never imports this module. Each function takes the JSON-ready data
the library returns (reports, ``Preset.describe()``, ``inspection.inspect_adapter``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from safelora_cli.report import SHORT_REASONS

ProgressFn = Any  # pipeline.ProgressFn, without importing torch


@contextmanager
def progress_bar(console: Console, quiet: bool) -> Iterator[ProgressFn | None]:
    """A transient progress bar over the weights, or None when quiet or not on a terminal."""
    if quiet or not console.is_terminal:  # off a terminal, rich would only add a blank line
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, module: str) -> None:
            bar.update(task, completed=done, total=total, description=escape(module))

        yield update


def summary_table(console: Console, report: dict[str, Any]) -> None:
    """The projected and skipped modules of one report, with the summary as caption."""
    summary = report["summary"]
    shown = [m for m in report["modules"] if m["projected"] or m["skipped"]]
    table = Table(
        title=f"safelora: {escape(report['inputs']['adapter']['path'])}: "
        "projected and skipped modules",
        caption=(
            f"{summary['projected']} of {summary['modules']} modules projected, "
            f"{summary['skipped']} skipped; threshold used {_num(summary['threshold_used'])}; "
            f"mean Pdst {_num(summary['mean_pdst'])}"
        ),
    )
    table.add_column("module", no_wrap=True)
    for column in ("cosine", "‖V‖", "‖B‖ before", "‖B‖ after"):
        table.add_column(column, justify="right")
    table.add_column("status")
    for m in shown:
        status = "projected" if m["projected"] else SHORT_REASONS.get(m["skipped"], "skipped")
        table.add_row(
            escape(m["module"]),
            _num(m["cosine"]),
            _num(m["v_norm"]),
            _num(m["b_norm_before"]),
            _num(m["b_norm_after"]),
            status,
        )
    console.print(table)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def emit_results(
    console: Console, reports: list[dict[str, Any]], as_json: bool, quiet: bool, batch: bool
) -> None:
    """Tables to stderr; to stdout only the result: output path(s), or the report(s) as JSON."""
    if not quiet:
        for report in reports:
            summary_table(console, report)
    if as_json:
        sys.stdout.write(json.dumps(reports if batch else reports[0], indent=2) + "\n")
        return
    for report in reports:
        if report["output"] is not None:
            sys.stdout.write(f"{report['output']}\n")


def selection_text(settings: dict[str, Any]) -> str:
    """A preset's settings in one short phrase: "number, K=10", "threshold, T=0.35"."""
    select = settings.get("select")
    parts = [select or "default selection"]
    if select == "number" and "num_layers" in settings:
        parts.append(f"K={settings['num_layers']}")
    if select == "threshold" and "threshold" in settings:
        parts.append(f"T={settings['threshold']:g}")
    for key in ("projection", "rank", "energy"):
        if key in settings:
            parts.append(f"{key}={settings[key]}")
    return ", ".join(parts)


def presets_table(console: Console, presets: Sequence[dict[str, Any]]) -> None:
    """One row per preset: name, base, aligned, recommended selection, note."""
    table = Table(
        title="safelora presets",
        caption="use: safelora patch ADAPTER --preset NAME --output DIR",
    )
    table.add_column("name", no_wrap=True)
    table.add_column("base → aligned", no_wrap=True)
    table.add_column("selection", no_wrap=True)
    table.add_column("note", ratio=1)
    for preset in presets:
        table.add_row(
            escape(preset["name"]),
            f"{escape(preset['base'])}\n→ {escape(preset['aligned'])}",
            selection_text(preset["settings"]),
            escape(preset["description"]),
        )
    console.print(table)


def inspect_tables(console: Console, info: dict[str, Any]) -> None:
    """The adapter's modules (and pairing, when a base was given), then its passthrough tensors."""
    config, summary = info["config"], info["summary"]
    paired = summary["paired"] is not None
    rslora = " (rsLoRA: alpha/sqrt(r))" if config.get("use_rslora") else ""
    caption = (
        f"{summary['modules']} modules; r={config.get('r')}, lora_alpha={config.get('lora_alpha')}"
        f"{rslora}; {summary['lora_parameters']:,} LoRA parameters; "
        f"{summary['passthrough']} passthrough tensor(s)"
    )
    if paired:
        caption += f"; {summary['paired']} of {summary['modules']} pair with the base"
    title = f"safelora inspect: {escape(info['inputs']['adapter']['path'])}"
    table = Table(title=title, caption=caption)
    table.add_column("module", no_wrap=True)
    for column in ("out × in", "rank", "alpha", "scaling"):
        table.add_column(column, justify="right")
    table.add_column("dtype A/B")
    if paired:
        table.add_column("base weight")
    for module in info["modules"]:
        out, inp = module["shape"]
        dtypes = {module["lora_A"]["dtype"], module["lora_B"]["dtype"]}
        row = [
            escape(module["module"]),
            f"{out} × {inp}",
            str(module["rank"]),
            f"{module['alpha']:g}",
            f"{module['scaling']:.4g}",
            "/".join(sorted(dtypes)),
        ]
        if paired:
            row.append(_pairing_text(module))
        table.add_row(*row)
    console.print(table)
    if info["passthrough"]:
        _passthrough_table(console, info["passthrough"])


def _pairing_text(module: dict[str, Any]) -> str:
    if not module["paired"]:
        return f"[red]{escape(module['problem'])}[/red]"
    return "ok (tied to embedding)" if module["tied"] else "ok"


def _passthrough_table(console: Console, tensors: Sequence[dict[str, Any]]) -> None:
    table = Table(title="passthrough tensors (copied unchanged by patch)")
    table.add_column("tensor", no_wrap=True)
    table.add_column("dtype")
    table.add_column("shape", justify="right")
    for tensor in tensors:
        table.add_row(
            escape(tensor["name"]), tensor["dtype"], " × ".join(map(str, tensor["shape"]))
        )
    console.print(table)

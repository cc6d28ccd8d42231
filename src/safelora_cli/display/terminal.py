"""Display: what the commands show on stderr (progress, the run's summary table, the presets
and inspect tables), and the result they print to stdout.

CLI side only: the library never imports this module. Each function takes the JSON-ready data
the library returns (reports, ``Preset.describe()``, ``inspection.inspect_adapter``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from safelora_cli.notices import NOTE, Notice, NotifyFn
from safelora_cli.output.report import SHORT_REASONS, subject
from safelora_cli.untrusted import safe_text

ProgressFn = Any  # pipeline.ProgressFn, without importing torch


def shown(text: Any) -> str:
    """Untrusted text as a rich cell: control characters escaped, long names shortened, markup
    (``[red]``) shown as written rather than interpreted."""
    return escape(safe_text(str(text)))


@contextmanager
def progress_bar(
    console: Console, quiet: bool, label: str = "scoring"
) -> Iterator[ProgressFn | None]:
    """A transient progress bar over the bytes of weights read: speed and time left; None when
    quiet or not on a terminal."""
    if quiet or not console.is_terminal:  # off a terminal, rich would only add a blank line
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, weight: str) -> None:
            bar.update(task, completed=done, total=total, description=shown(weight))

        yield update


def notice_printer(console: Console, quiet: bool) -> NotifyFn:
    """A ``notify`` callback: a warning as one ``warning:`` line on stderr (also when quiet); a
    note as a ``note:`` line, only for a person at a terminal (like the progress bar)."""

    def show(notice: Notice) -> None:
        if notice.level == NOTE and (quiet or not console.is_terminal):
            return
        console.print(
            f"{notice.level}: {safe_text(notice.message)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
            emoji=False,
        )

    return show


def summary_table(console: Console, report: dict[str, Any]) -> None:
    """The projected and skipped modules of one report, with the summary as caption."""
    summary = report["summary"]
    rows = [m for m in report["modules"] if m["projected"] or m["skipped"]]
    table = Table(
        title=f"safelora: {shown(subject(report))}: projected and skipped modules",
        caption=(
            f"{summary['projected']} of {summary['modules']} modules projected, "
            f"{summary['skipped']} skipped; threshold used {_num(summary['threshold_used'])}; "
            f"mean Pdst {_num(summary['mean_pdst'])}"
        ),
    )
    table.add_column("module", no_wrap=True)
    update = "‖D‖" if report.get("kind") == "full" else "‖B‖"  # D = W_ft − W_aligned
    for column in ("cosine", "‖V‖", f"{update} before", f"{update} after"):
        table.add_column(column, justify="right")
    table.add_column("status")
    for m in rows:
        status = "projected" if m["projected"] else SHORT_REASONS.get(m["skipped"], "skipped")
        table.add_row(
            shown(m["module"]),
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
    """Tables to stderr; to stdout only the result: output path(s), or the report(s) as JSON.

    The run is finished here: a table that cannot be shown is a warning, never a failure.
    """
    if not quiet:
        for report in reports:
            show_report(console, report)
    if as_json:  # ASCII only (json escapes the rest): any terminal encoding prints it
        write_stdout(json.dumps(reports if batch else reports[0], indent=2) + "\n")
        return
    for report in reports:
        if report["output"] is not None:
            write_stdout(report["output"] + "\n")


def show_report(console: Console, report: dict[str, Any]) -> None:
    """A report on stderr: the per-layer heat map of its cosines, then the table of the modules
    projected and skipped; either failing to render is a warning."""
    from safelora_cli.display.heatmap import print_heatmap

    show_safely(console, print_heatmap, report)
    show_safely(console, summary_table, report)


def write_stdout(text: str) -> None:
    """Write a result to stdout; a path the terminal's encoding cannot hold goes out as the
    bytes the file system knows it by, so scripts get the real path."""
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        sys.stdout.flush()
        sys.stdout.buffer.write(os.fsencode(text))
    sys.stdout.flush()


def show_safely(console: Console, render: Any, *args: Any) -> None:
    """Render a table; if that fails, one warning line instead (the run's result stands)."""
    try:
        render(console, *args)
    except Exception as exc:  # noqa: BLE001 - display must never fail a finished run
        print(f"warning: could not display the table ({safe_text(repr(exc))})", file=sys.stderr)


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
            shown(preset["name"]),
            f"{shown(preset['base'])}\n→ {shown(preset['aligned'])}",
            selection_text(preset["settings"]),
            shown(preset["description"]),
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
    title = f"safelora inspect: {shown(info['inputs']['adapter']['path'])}"
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
            shown(module["module"]),
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
        return f"[red]{shown(module['problem'])}[/red]"
    return "ok (tied to embedding)" if module["tied"] else "ok"


def _passthrough_table(console: Console, tensors: Sequence[dict[str, Any]]) -> None:
    table = Table(title="passthrough tensors (copied unchanged by patch)")
    table.add_column("tensor", no_wrap=True)
    table.add_column("dtype")
    table.add_column("shape", justify="right")
    for tensor in tensors:
        table.add_row(shown(tensor["name"]), tensor["dtype"], " × ".join(map(str, tensor["shape"])))
    console.print(table)


def changed_table(console: Console, info: dict[str, Any]) -> None:
    """A full fine-tune's changed tensors, most changed first (``finetune.inspect_full``)."""
    summary = info["summary"]
    changed = [t for t in info["tensors"] if t["changed"]]
    table = Table(
        title=f"safelora inspect: {shown(info['inputs']['model']['path'])}: changed weights",
        caption=(
            f"{summary['changed']} of {summary['tensors']} tensors changed by the fine-tune, "
            f"{summary['targeted_changed']} of them patched by default"
        ),
    )
    table.add_column("tensor", no_wrap=True)
    table.add_column("shape", justify="right")
    table.add_column("‖D‖", justify="right")
    table.add_column("‖D‖/‖W‖", justify="right")
    table.add_column("default target")
    for tensor in changed:
        table.add_row(
            shown(tensor["tensor"]),
            " × ".join(map(str, tensor["shape"])),
            _num(tensor["d_norm"]),
            _num(tensor["relative"]),
            "yes" if tensor["targeted"] else "",
        )
    console.print(table)


def profile_table(console: Console, summary: dict[str, Any]) -> None:
    """A profile's weights: stored rank, captured energy, error bound and bytes, with totals."""
    totals, rule = summary["totals"], summary["rank_rule"]
    how = (
        f"rank {rule['rank']}"
        if rule["rank"] is not None
        else (f"tolerance {rule['tolerance']:g} up to rank {rule['max_rank']}")
    )
    table = Table(
        title=f"safelora profile: {shown(summary['path'])} ({how})",
        caption=(
            f"{totals['weights']} weights: {totals['lowrank']} low-rank (max rank "
            f"{totals['max_rank']}), {totals['whole']} stored whole, {totals['zero']} with V = 0; "
            f"{totals['file_bytes'] / 1e6:.1f} MB; largest relative error "
            f"{totals['max_relative_error']:.3g}"
        ),
    )
    table.add_column("weight", no_wrap=True)
    for column in ("shape", "k", "energy", "error bound", "MB"):
        table.add_column(column, justify="right")
    for row in summary["weights"]:
        table.add_row(
            shown(row["weight"]),
            " × ".join(map(str, row["shape"])),
            "whole" if row["kind"] == "whole" else str(row["rank"]),
            f"{row['captured_energy']:.4f}",
            f"{row['error_bound']:.3g}",
            f"{row['bytes'] / 1e6:.2f}",
        )
    console.print(table)

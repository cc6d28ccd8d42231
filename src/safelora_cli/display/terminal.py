"""Display: what the commands show on stderr (progress, the run's summary table, the presets
and inspect tables), and the result they print to stdout.

CLI side only: the library never imports this module. Each function takes the JSON-ready data
the library returns (reports, ``Preset.describe()``, ``inspection.inspect_adapter``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from safelora_cli.display.sink import cell, count, json_text, line, number, plain
from safelora_cli.notices import NOTE, Notice, NotifyFn
from safelora_cli.output.report import SHORT_REASONS, subject
from safelora_cli.untrusted import safe_text

ProgressFn = Any  # pipeline.ProgressFn, without importing torch


def shown(text: Any, limit: int = 160) -> Text:
    """Untrusted text as a rich cell (``sink.cell``): controls and invisible characters
    escaped, long names shortened, markup (``[red]``) shown as written, never interpreted."""
    return cell(text, limit)


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
        TextColumn("{task.description}", markup=False),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, weight: str) -> None:
            bar.update(task, completed=done, total=total, description=plain(weight, 80))

        yield update


def notice_printer(console: Console, quiet: bool) -> NotifyFn:
    """A ``notify`` callback: a warning as one ``warning:`` line on stderr (also when quiet); a
    note as a ``note:`` line, only for a person at a terminal (like the progress bar), unless it
    is ``logged`` (then always, like a warning)."""

    def show(notice: Notice) -> None:
        if notice.level == NOTE and not notice.logged and (quiet or not console.is_terminal):
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
    rows = [m for m in report["modules"] if m.get("projected") or m.get("skipped")]
    table = Table(
        title=line("safelora: ", shown(subject(report)), ": projected and skipped modules"),
        caption=line(
            f"{count(summary['projected'])} of {count(summary['modules'])} modules projected, "
            f"{count(summary['skipped'])} skipped; threshold used "
            f"{_num(summary['threshold_used'])}; mean Pdst {_num(summary['mean_pdst'])}"
        ),
    )
    table.add_column("module", no_wrap=True)
    update = "‖D‖" if report.get("kind") == "full" else "‖B‖"  # D = W_ft − W_aligned
    for column in ("cosine", "‖V‖", f"{update} before", f"{update} after"):
        table.add_column(column, justify="right")
    table.add_column("status")
    for m in rows:
        reason = m.get("skipped") if isinstance(m.get("skipped"), str) else None
        status = "projected" if m.get("projected") else SHORT_REASONS.get(reason or "", "skipped")
        _add_row(
            table,
            shown(m["module"]),
            _num(m.get("cosine")),
            _num(m.get("v_norm")),
            _num(m.get("b_norm_before")),
            _num(m.get("b_norm_after")),
            status,
        )
    console.print(table)


def _num(value: object) -> str:
    return number(value)


def _add_row(table: Table, *cells: str | Text) -> None:
    """A row whose every cell is ``Text``: a ``str`` cell would be parsed as rich markup."""
    table.add_row(*(c if isinstance(c, Text) else Text(plain(c, 10_000)) for c in cells))


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
        write_stdout(json_text(reports if batch else reports[0]))
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
        title=Text("safelora presets"),
        caption=Text("use: safelora patch ADAPTER --preset NAME --output DIR"),
    )
    table.add_column("name", no_wrap=True)
    table.add_column("base → aligned", no_wrap=True)
    table.add_column("selection", no_wrap=True)
    table.add_column("note", ratio=1)
    for preset in presets:
        _add_row(
            table,
            shown(preset["name"]),
            line(shown(preset["base"]), "\n→ ", shown(preset["aligned"])),
            shown(selection_text(preset["settings"])),
            shown(preset["description"]),
        )
    console.print(table)


def inspect_tables(console: Console, info: dict[str, Any]) -> None:
    """The adapter's modules (and pairing, when a base was given), then its passthrough tensors."""
    config, summary = info["config"], info["summary"]
    paired = summary["paired"] is not None
    rslora = " (rsLoRA: alpha/sqrt(r))" if config.get("use_rslora") else ""
    caption = line(
        f"{count(summary['modules'])} modules; r={number(config.get('r'))}, "
        f"lora_alpha={number(config.get('lora_alpha'))}{rslora}; "
        f"{count(summary['lora_parameters'])} LoRA parameters; "
        f"{count(summary['passthrough'])} passthrough tensor(s)"
    )
    if paired:
        caption.append(
            f"; {count(summary['paired'])} of {count(summary['modules'])} pair with the base"
        )
    title = line("safelora inspect: ", shown(info["inputs"]["adapter"]["path"]))
    table = Table(title=title, caption=caption)
    table.add_column("module", no_wrap=True)
    for column in ("out × in", "rank", "alpha", "scaling"):
        table.add_column(column, justify="right")
    table.add_column("dtype A/B")
    if paired:
        table.add_column("base weight")
    for module in info["modules"]:
        dtypes = {str(module["lora_A"]["dtype"]), str(module["lora_B"]["dtype"])}
        row: list[str | Text] = [
            shown(module["module"]),
            _shape(module["shape"]),
            count(module["rank"]),
            number(module["alpha"], "g"),
            number(module["scaling"]),
            shown("/".join(sorted(dtypes))),
        ]
        if paired:
            row.append(_pairing_text(module))
        _add_row(table, *row)
    console.print(table)
    if info["passthrough"]:
        _passthrough_table(console, info["passthrough"])


def _pairing_text(module: dict[str, Any]) -> Text:
    if not module["paired"]:
        return cell(module["problem"], 160, style="red")
    return Text("ok (tied to embedding)" if module["tied"] else "ok")


def _shape(shape: Any) -> Text:
    """A shape as "out × in" (its numbers through the sink)."""
    return Text(" × ".join(count(d) for d in shape) if isinstance(shape, list) else plain(shape))


def _passthrough_table(console: Console, tensors: Sequence[dict[str, Any]]) -> None:
    table = Table(title=Text("passthrough tensors (copied unchanged by patch)"))
    table.add_column("tensor", no_wrap=True)
    table.add_column("dtype")
    table.add_column("shape", justify="right")
    for tensor in tensors:
        _add_row(table, shown(tensor["name"]), shown(tensor["dtype"]), _shape(tensor["shape"]))
    console.print(table)


def changed_table(console: Console, info: dict[str, Any]) -> None:
    """A full fine-tune's changed tensors, most changed first (``finetune.inspect_full``)."""
    summary = info["summary"]
    changed = [t for t in info["tensors"] if t["changed"]]
    table = Table(
        title=line("safelora inspect: ", shown(info["inputs"]["model"]["path"]),
                   ": changed weights"),
        caption=line(
            f"{count(summary['changed'])} of {count(summary['tensors'])} tensors changed by "
            f"the fine-tune, {count(summary['targeted_changed'])} of them patched by default"
        ),
    )  # fmt: skip
    table.add_column("tensor", no_wrap=True)
    table.add_column("shape", justify="right")
    table.add_column("‖D‖", justify="right")
    table.add_column("‖D‖/‖W‖", justify="right")
    table.add_column("default target")
    for tensor in changed:
        _add_row(
            table,
            shown(tensor["tensor"]),
            _shape(tensor["shape"]),
            _num(tensor["d_norm"]),
            _num(tensor["relative"]),
            "yes" if tensor["targeted"] else "",
        )
    console.print(table)


def profile_table(console: Console, summary: dict[str, Any]) -> None:
    """A profile's weights: stored rank, captured energy, error bound and bytes, with totals."""
    totals, rule = summary["totals"], summary["rank_rule"]
    how = (
        f"rank {count(rule['rank'])}"
        if rule["rank"] is not None
        else f"tolerance {number(rule['tolerance'], 'g')} up to rank {count(rule['max_rank'])}"
    )
    table = Table(
        title=line("safelora profile: ", shown(summary["path"]), f" ({how})"),
        caption=line(
            f"{count(totals['weights'])} weights: {count(totals['lowrank'])} low-rank (max rank "
            f"{count(totals['max_rank'])}), {count(totals['whole'])} stored whole, "
            f"{count(totals['zero'])} with V = 0; {_megabytes(totals['file_bytes'], '.1f')} MB; "
            f"largest relative error {number(totals['max_relative_error'], '.3g')}; "
            f"{_certainty(totals.get('failure_probability', 0.0))}",
        ),
    )
    table.add_column("weight", no_wrap=True)
    for column in ("shape", "k", "energy", "error bound", "MB"):
        table.add_column(column, justify="right")
    heads = {stored: head for head, stored in summary.get("tied", {}).items()}
    for row in summary["weights"]:
        tied = f" (and {heads[row['weight']]}, tied)" if row["weight"] in heads else ""
        _add_row(
            table,
            shown(row["weight"] + tied),
            _shape(row["shape"]),
            "whole" if row["kind"] == "whole" else count(row["rank"]),
            number(row["captured_energy"], ".4f"),
            number(row["error_bound"], ".3g"),
            _megabytes(row["bytes"], ".2f"),
        )
    console.print(table)


def _megabytes(value: Any, spec: str) -> str:
    in_range = isinstance(value, int) and abs(value) < 10**18
    return number(value / 1e6 if in_range else value, spec)


def _certainty(failure: object) -> str:
    """How sure the profile's bounds are: proven, or true but with this probability."""
    if failure == 0.0:
        return "every bound proven"
    chance = number(failure, ".1e")
    return f"every bound holds but with probability ≤ {chance} (randomized certificate)"

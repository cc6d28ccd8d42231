"""The ``safelora`` command line: typer only. Every command calls the library (pipeline.py).

stdout carries only the result (the output path, or the report with --json); progress, tables,
warnings and errors go to stderr. torch is imported only by commands that compute.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from safelora_cli import __version__
from safelora_cli.errors import SafeLoraError

if TYPE_CHECKING:
    from safelora_cli.pipeline import ProgressFn, Settings

INTERNAL_ERROR = 70
stderr = Console(stderr=True)

app = typer.Typer(
    name="safelora",
    help="Make a LoRA fine-tune safe again: Safe LoRA projection onto the alignment direction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

AdapterArg = Annotated[str, typer.Argument(help="PEFT LoRA adapter folder.", show_default=False)]
BaseOpt = Annotated[
    str, typer.Option("--base", help="Base model: folder or hub id org/name[@rev].")
]
AlignedOpt = Annotated[
    str, typer.Option("--aligned", help="Aligned sibling of the base: folder or hub id.")
]
SelectOpt = Annotated[
    str, typer.Option("--select", help="number: the K lowest cosines; threshold: cosine <= T.")
]
NumLayersOpt = Annotated[
    int, typer.Option("--num-layers", "-k", help="K for --select number (ties included).")
]
ThresholdOpt = Annotated[
    float, typer.Option("--threshold", help="T for --select threshold, in [-1, 1].")
]
ProjectionOpt = Annotated[str, typer.Option("--projection", help="paper: Ĉ = V Vᵀ / ‖V‖_F.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Hub revision for --base and --aligned.")
]
AdapterNameOpt = Annotated[
    str | None, typer.Option("--adapter-name", help="Adapter to take when a file holds several.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report to stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or table on stderr.")]

PATCH_EXAMPLES = """
Examples:

  safelora patch ./my-lora --base meta-llama/Llama-2-7b-hf
  --aligned meta-llama/Llama-2-7b-chat-hf --output ./my-lora-safe

  safelora patch ./my-lora --base ./base --aligned ./chat --output ./out
  --select threshold --threshold 0.35 --json > report.json
"""

SCORE_EXAMPLES = """
Examples:

  safelora score ./my-lora --base ./base --aligned ./chat

  safelora score ./my-lora --base ./base --aligned ./chat --select threshold
  --threshold 0.5 --fail-if-projected 0    # CI gate: exit 1 if any module drifts
"""


def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


@contextmanager
def _errors_to_exit() -> Iterator[None]:
    """Map every failure to one stderr line and its exit code (traceback with SAFELORA_DEBUG=1)."""
    debug = os.environ.get("SAFELORA_DEBUG") == "1"
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except SafeLoraError as exc:
        _fail(exc.one_line(), exc.exit_code, debug)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130, debug)
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 6, debug)
    except Exception as exc:  # a bug: still one line, never a bare traceback
        _fail(
            f"internal error: {type(exc).__name__}: {exc}",
            INTERNAL_ERROR,
            debug,
            "rerun with SAFELORA_DEBUG=1 and report the traceback",
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str, code: int, debug: bool, hint: str | None = None) -> NoReturn:
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)
    text = f"error: {message}" + (f" (hint: {hint})" if hint else "")
    print(text, file=sys.stderr)
    raise typer.Exit(code)


def _settings(**values: Any) -> Settings:
    from safelora_cli.pipeline import Settings

    return Settings(**values)


@contextmanager
def _progress(quiet: bool) -> Iterator[ProgressFn | None]:
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=stderr,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, module: str) -> None:
            bar.update(task, completed=done, total=total, description=module)

        yield update


def _summary_table(report: dict[str, Any]) -> None:
    from rich.table import Table

    summary = report["summary"]
    shown = [m for m in report["modules"] if m["projected"] or m["skipped"]]
    table = Table(
        title="safelora: projected and skipped modules",
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
        status = "projected" if m["projected"] else f"skipped: {m['skipped']}"
        table.add_row(
            m["module"],
            _num(m["cosine"]),
            _num(m["v_norm"]),
            _num(m["b_norm_before"]),
            _num(m["b_norm_after"]),
            status,
        )
    stderr.print(table)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _emit(report: dict[str, Any], as_json: bool, quiet: bool, result_line: str | None) -> None:
    if not quiet:
        _summary_table(report)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    elif result_line is not None:
        sys.stdout.write(result_line + "\n")


@app.command(epilog=PATCH_EXAMPLES)
def patch(
    adapter: AdapterArg,
    base: BaseOpt,
    aligned: AlignedOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the result.")],
    select: SelectOpt = "number",
    num_layers: NumLayersOpt = 10,
    threshold: ThresholdOpt = 0.5,
    projection: ProjectionOpt = "paper",
    device: DeviceOpt = "auto",
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Write the report here instead of OUTPUT/."),
    ] = None,
    as_json: JsonOpt = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace safelora's files in a non-empty OUTPUT.")
    ] = False,
    quiet: QuietOpt = False,
    revision: RevisionOpt = None,
    adapter_name: AdapterNameOpt = None,
) -> None:
    """Project the drifting modules of ADAPTER and write a patched adapter to OUTPUT."""
    with _errors_to_exit():
        from safelora_cli.pipeline import run_patch

        settings = _settings(
            select=select,
            num_layers=num_layers,
            threshold=threshold,
            projection=projection,
            device=device,
            adapter_name=adapter_name,
        )
        with _progress(quiet) as progress:
            result = run_patch(
                adapter,
                base,
                aligned,
                output,
                settings,
                force=force,
                report_path=report,
                revision=revision,
                progress=progress,
            )
        _emit(result.report, as_json, quiet, str(output))


@app.command(epilog=SCORE_EXAMPLES)
def score(
    adapter: AdapterArg,
    base: BaseOpt,
    aligned: AlignedOpt,
    select: SelectOpt = "number",
    num_layers: NumLayersOpt = 10,
    threshold: ThresholdOpt = 0.5,
    projection: ProjectionOpt = "paper",
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    fail_if_projected: Annotated[
        int | None,
        typer.Option(
            "--fail-if-projected", help="Exit 1 if more than N modules would be projected."
        ),
    ] = None,
    quiet: QuietOpt = False,
    revision: RevisionOpt = None,
    adapter_name: AdapterNameOpt = None,
) -> None:
    """Score ADAPTER's modules and show which would be projected; writes nothing."""
    with _errors_to_exit():
        from safelora_cli.pipeline import run_score

        settings = _settings(
            select=select,
            num_layers=num_layers,
            threshold=threshold,
            projection=projection,
            device=device,
            adapter_name=adapter_name,
        )
        with _progress(quiet) as progress:
            result = run_score(adapter, base, aligned, settings, revision, progress)
        _emit(result.report, as_json, quiet, None)
    projected = result.report["summary"]["projected"]
    if fail_if_projected is not None and projected > fail_if_projected:
        print(
            f"gate failed: {projected} modules would be projected, more than {fail_if_projected}",
            file=sys.stderr,
        )
        raise typer.Exit(1)


def _version(value: bool) -> None:
    if value:
        print(f"safelora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Make a LoRA fine-tune safe again (Safe LoRA, Hsu et al., NeurIPS 2024)."""


def main() -> None:
    """Console-script entry point."""
    app()

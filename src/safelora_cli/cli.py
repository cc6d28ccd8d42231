"""The ``safelora`` command line: typer only. Every command calls the library (pipeline.py,
config.py, inspection.py).

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
from safelora_cli.errors import IncompatibleInputError, SafeLoraError, UsageError
from safelora_cli.select import DEFAULT_NUM_LAYERS, DEFAULT_THRESHOLD

if TYPE_CHECKING:
    from safelora_cli.config import RunConfig
    from safelora_cli.pipeline import ProgressFn, Result

INTERNAL_ERROR = 70
SHORT_REASONS = {
    "base and aligned identical": "skipped: V = 0",
    "LoRA delta is zero": "skipped: BA = 0",
}
stderr = Console(stderr=True)
if not stderr.is_terminal:  # logs and CI: room for full module names
    stderr.width = max(stderr.width, 120)

app = typer.Typer(
    name="safelora",
    help="Make a LoRA fine-tune safe again: Safe LoRA projection onto the alignment direction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

AdaptersArg = Annotated[
    list[str],
    typer.Argument(
        help="PEFT LoRA adapter folder(s); '-' reads one path per line from stdin.",
        show_default=False,
        metavar="ADAPTER",
    ),
]
# Options a preset or --config file may also set default to None here ("not given"): config.py
# merges preset < config file < flags and applies pipeline.Settings' defaults last.
BaseOpt = Annotated[
    str | None,
    typer.Option("--base", help="Base model: folder or hub id org/name[@rev]. Or use --preset."),
]
AlignedOpt = Annotated[
    str | None, typer.Option("--aligned", help="Aligned sibling of the base: folder or hub id.")
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="Known base/aligned pair and its recommended selection (see `safelora presets`).",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML run file with any of these options; overrides --preset, flags override it.",
    ),
]
SelectOpt = Annotated[
    str | None,
    typer.Option(
        "--select", help="number: the K lowest cosines; threshold: cosine <= T. [default: number]"
    ),
]
NumLayersOpt = Annotated[
    int | None,
    typer.Option(
        "--num-layers",
        "-k",
        help=f"K for --select number (ties included). [default: {DEFAULT_NUM_LAYERS}]",
    ),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        "--threshold", help=f"T for --select threshold, in [-1, 1]. [default: {DEFAULT_THRESHOLD}]"
    ),
]
ProjectionOpt = Annotated[
    str | None,
    typer.Option(
        "--projection",
        help="paper: Ĉ = V Vᵀ/‖V‖_F (official); subspace: U_k U_kᵀ, top-k singular vectors of V. "
        "[default: paper]",
    ),
]
RankOpt = Annotated[int | None, typer.Option("--rank", help="k for --projection subspace.")]
EnergyOpt = Annotated[
    float | None,
    typer.Option("--energy", help="Smallest k whose σ² cover this share of ‖V‖² (subspace)."),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N. [default: auto]")
]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Hub revision for --base and --aligned.")
]
AdapterNameOpt = Annotated[
    str | None, typer.Option("--adapter-name", help="Adapter to take when a file holds several.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report to stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or table on stderr.")]

PATCH_EXAMPLES = """\b
Examples:
  safelora patch ./my-lora --base meta-llama/Llama-2-7b-hf \\
      --aligned meta-llama/Llama-2-7b-chat-hf --output ./my-lora-safe
  safelora patch ./my-lora --base ./base --aligned ./chat --output ./out \\
      --select threshold --threshold 0.35 --json > report.json
  find runs -name adapter_config.json -printf '%h\\n' | \\
      safelora patch - --base ./base --aligned ./chat --output ./safe
  safelora patch ./my-lora --preset llama-2-7b-chat --output ./my-lora-safe
  safelora patch ./my-lora --config run.toml --num-layers 8 --output ./out
"""

SCORE_EXAMPLES = """\b
Examples:
  safelora score ./my-lora --base ./base --aligned ./chat
  safelora score ./my-lora --base ./base --aligned ./chat \\
      --select threshold --threshold 0.5 --fail-if-projected 0   # CI gate
  safelora score ./run/checkpoint-* --preset llama-2-7b-chat --json > reports.json
"""

PRESETS_EXAMPLES = """\b
Examples:
  safelora presets
  safelora presets --json | jq -r '.[].name'
  SAFELORA_PRESET_PATH=./my-presets safelora presets   # add your own <name>.toml files
"""

INSPECT_EXAMPLES = """\b
Examples:
  safelora inspect ./my-lora
  safelora inspect ./my-lora --base meta-llama/Llama-2-7b-hf   # does every module pair?
  safelora inspect ./my-lora --json | jq '.summary'
"""


_received: list[int] = []


def _on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    # recorded: torch and safetensors can swallow the KeyboardInterrupt and raise another error
    _received.append(signum)
    raise KeyboardInterrupt


@contextmanager
def _errors_to_exit() -> Iterator[None]:
    """Map every failure to one stderr line and its exit code (traceback with SAFELORA_DEBUG=1)."""
    debug = os.environ.get("SAFELORA_DEBUG") == "1"
    _received.clear()
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            yield
        except Exception as exc:
            if _received:
                raise KeyboardInterrupt from exc
            raise
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
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if _received:  # swallowed inside torch, and the run went on to finish
        _fail("interrupted as the run finished; its output is complete", 130, False)


def _fail(message: str, code: int, debug: bool, hint: str | None = None) -> NoReturn:
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)
    text = f"error: {message}" + (f" (hint: {hint})" if hint else "")
    print(text, file=sys.stderr)
    raise typer.Exit(code)


def _run_config(config_file: Path | None, **flags: Any) -> RunConfig:
    """Merge preset < --config file < flags (None: not given); defaults fill the rest."""
    from safelora_cli.config import resolve_run

    return resolve_run(flags, config_file)


@contextmanager
def _progress(quiet: bool) -> Iterator[ProgressFn | None]:
    if quiet or not stderr.is_terminal:  # off a terminal, rich would only add a blank line
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
    adapter_path = report["inputs"]["adapter"]["path"]
    shown = [m for m in report["modules"] if m["projected"] or m["skipped"]]
    table = Table(
        title=f"safelora: {adapter_path}: projected and skipped modules",
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


def _emit(results: list[Result], as_json: bool, quiet: bool, batch: bool) -> None:
    """Tables to stderr; to stdout only the result: output path(s), or the report(s) as JSON."""
    if not quiet:
        for result in results:
            _summary_table(result.report)
    if as_json:
        reports = [r.report for r in results]
        sys.stdout.write(json.dumps(reports if batch else reports[0], indent=2) + "\n")
        return
    for result in results:
        if result.output is not None:
            sys.stdout.write(f"{result.output}\n")


def _adapter_list(adapters: list[str]) -> tuple[list[str], bool]:
    """The ADAPTER arguments, with '-' read from stdin; and whether this is a batch run."""
    if adapters == ["-"]:
        listed = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
        if not listed:
            raise UsageError("ADAPTER '-': stdin held no adapter paths", "pipe one path per line")
        return listed, True
    if "-" in adapters:
        raise UsageError("ADAPTER '-' must be the only ADAPTER argument")
    return adapters, len(adapters) > 1


@app.command(epilog=PATCH_EXAMPLES)
def patch(
    adapters: AdaptersArg,
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="New folder (with several adapters: OUTPUT/<adapter name>)."
        ),
    ],
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    select: SelectOpt = None,
    num_layers: NumLayersOpt = None,
    threshold: ThresholdOpt = None,
    projection: ProjectionOpt = None,
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    device: DeviceOpt = None,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Write the report here instead of OUTPUT/ (one adapter)."),
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
        paths, batch = _adapter_list(adapters)
        if batch and report is not None:
            raise UsageError("--report takes one adapter", "each batch output has its own report")
        run = _run_config(
            config, preset=preset, base=base, aligned=aligned, revision=revision,
            select=select, num_layers=num_layers, threshold=threshold, projection=projection,
            rank=rank, energy=energy, device=device, adapter_name=adapter_name,
        )  # fmt: skip
        from safelora_cli import pipeline

        with _progress(quiet) as progress:
            if batch:
                results = pipeline.patch_many(
                    paths, run.base, run.aligned, output, run.settings,
                    force=force, revision=run.revision, progress=progress,
                )  # fmt: skip
            else:
                results = [
                    pipeline.patch(
                        paths[0],
                        run.base,
                        run.aligned,
                        output,
                        run.settings,
                        force=force,
                        report_path=report,
                        revision=run.revision,
                        progress=progress,
                    )  # fmt: skip
                ]
        _emit(results, as_json, quiet, batch)


@app.command(epilog=SCORE_EXAMPLES)
def score(
    adapters: AdaptersArg,
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    select: SelectOpt = None,
    num_layers: NumLayersOpt = None,
    threshold: ThresholdOpt = None,
    projection: ProjectionOpt = None,
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
    fail_if_projected: Annotated[
        int | None,
        typer.Option(
            "--fail-if-projected",
            help="Exit 1 if more than N modules of any adapter would be projected (CI gate).",
        ),
    ] = None,
    quiet: QuietOpt = False,
    revision: RevisionOpt = None,
    adapter_name: AdapterNameOpt = None,
) -> None:
    """Score ADAPTER's modules and show which would be projected; writes nothing."""
    with _errors_to_exit():
        paths, batch = _adapter_list(adapters)
        run = _run_config(
            config, preset=preset, base=base, aligned=aligned, revision=revision,
            select=select, num_layers=num_layers, threshold=threshold, projection=projection,
            rank=rank, energy=energy, device=device, adapter_name=adapter_name,
        )  # fmt: skip
        from safelora_cli import pipeline

        with _progress(quiet) as progress:
            results = pipeline.score_many(
                paths, run.base, run.aligned, run.settings, run.revision, progress
            )
        _emit(results, as_json, quiet, batch)
    if fail_if_projected is None:
        return
    over = [r for r in results if r.report["summary"]["projected"] > fail_if_projected]
    for result in over:
        adapter_path = result.report["inputs"]["adapter"]["path"]
        print(
            f"gate failed: {adapter_path}: {result.report['summary']['projected']} modules "
            f"would be projected, more than {fail_if_projected}",
            file=sys.stderr,
        )
    if over:
        raise typer.Exit(1)


@app.command("presets", epilog=PRESETS_EXAMPLES)
def presets_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the presets to stdout.")] = False,
) -> None:
    """List the presets: known base/aligned pairs, their hub ids and recommended selection."""
    with _errors_to_exit():
        from safelora_cli.config import load_presets

        described = [preset.describe() for preset in load_presets().values()]
        if as_json:
            sys.stdout.write(json.dumps(described, indent=2) + "\n")
        else:
            from safelora_cli.display import presets_table

            presets_table(stderr, described)


@app.command("inspect", epilog=INSPECT_EXAMPLES)
def inspect_command(
    adapter: Annotated[
        str,
        typer.Argument(help="PEFT LoRA adapter folder.", show_default=False, metavar="ADAPTER"),
    ],
    base: Annotated[
        str | None,
        typer.Option("--base", help="Also check that every module pairs with this model."),
    ] = None,
    aligned: Annotated[
        str | None,
        typer.Option("--aligned", help="Also pair against this aligned model (needs --base)."),
    ] = None,
    revision: RevisionOpt = None,
    adapter_name: AdapterNameOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the description to stdout.")
    ] = False,
) -> None:
    """Show ADAPTER's modules, ranks, scaling, dtypes and passthrough tensors (headers only).

    With --base, exits 4 after the listing when a module has no matching base weight.
    """
    with _errors_to_exit():
        if aligned is not None and base is None:
            raise UsageError("--aligned needs --base", "give both models, or only --base")
        from safelora_cli.inspection import inspect_adapter

        info = inspect_adapter(adapter, base, aligned, revision=revision, adapter_name=adapter_name)
        if as_json:
            sys.stdout.write(json.dumps(info, indent=2) + "\n")
        else:
            from safelora_cli.display import inspect_tables

            inspect_tables(stderr, info)
        unpaired = [m for m in info["modules"] if m.get("paired") is False]
        if unpaired:
            first = unpaired[0]
            raise IncompatibleInputError(
                f"{adapter}: {len(unpaired)} of {len(info['modules'])} modules do not pair with "
                f"the model(s) given; first: {first['module']}: {first['problem']}",
                "check that --base is the model the adapter was trained on",
            )


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

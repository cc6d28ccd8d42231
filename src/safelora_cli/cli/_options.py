"""Options shared between commands, derived from ``settings.OPTIONS``.

``run_options`` gives a command every option of a run (the models, ``--preset``, ``--config``,
``--revision`` and every ``Settings`` field) in place of its ``run: RunFlags`` parameter, so
``patch`` and ``score`` declare them once; the command receives what was given as ``RunFlags``
and merges it with the preset and run file through ``RunFlags.resolve()``.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from safelora_cli.errors import UsageError
from safelora_cli.inputs.config import RunConfig, resolve_run
from safelora_cli.settings import OPTIONS, Option

AdaptersArg = Annotated[
    list[str],
    typer.Argument(
        help="PEFT LoRA adapter folder(s), or one full fine-tune's model folder (FT_MODEL); "
        "'-' reads one path per line from stdin.",
        show_default=False,
        metavar="ADAPTER",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report to stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or table on stderr.")]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Hub revision for --base and --aligned.")
]
JunitOpt = Annotated[
    Path | None,
    typer.Option(
        "--junit",
        help="Also write the results as JUnit XML here: a testsuite per adapter (or model), a "
        "testcase per module, a failure per module projected.",
        metavar="FILE",
    ),
]
AdapterNameOpt = Annotated[
    str | None, typer.Option("--adapter-name", help="Adapter to take when a file holds several.")
]
_CONFIG = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML run file with any of these options; overrides --preset, flags override it.",
        metavar="FILE",
    ),
]


@dataclass(frozen=True)
class RunFlags:
    """The run options as given on the command line (None: not given) and the ``--config``."""

    values: dict[str, Any]
    config: Path | None

    def resolve(self) -> RunConfig:
        """Merge preset < --config file < flags; ``Settings``' defaults fill the rest."""
        return resolve_run(self.values, self.config)


def _annotation(option: Option) -> Any:
    default = option.default
    shown = f" [default: {default}]" if default not in (None, ()) else ""
    declared = (option.flag, option.short) if option.short else (option.flag,)
    info = typer.Option(*declared, help=option.help + shown, metavar=option.metavar)
    return Annotated[option.annotation | None, info]  # None: "not given", a preset can fill it


def _given(value: Any) -> Any:
    """None for an option not given: typer gives a list option that was not given as []."""
    return None if value == [] else value


def run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Replace the command's ``run: RunFlags`` parameter by every run option (see module doc)."""
    signature = inspect.signature(command, eval_str=True)
    expanded: list[inspect.Parameter] = []
    for param in signature.parameters.values():
        if param.name != "run":
            expanded.append(param)
            continue
        expanded += [
            inspect.Parameter(o.key, param.kind, default=None, annotation=_annotation(o))
            for o in OPTIONS
        ]
        expanded.append(inspect.Parameter("config", param.kind, default=None, annotation=_CONFIG))

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        values = {o.key: _given(kwargs.pop(o.key)) for o in OPTIONS}
        command(run=RunFlags(values, kwargs.pop("config")), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=expanded)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in expanded}
    return wrapper


def adapter_list(adapters: list[str]) -> tuple[list[str], bool]:
    """The ADAPTER arguments, with '-' read from stdin; and whether this is a batch run."""
    if adapters == ["-"]:
        listed = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
        if not listed:
            raise UsageError("ADAPTER '-': stdin held no adapter paths", "pipe one path per line")
        return listed, True
    if "-" in adapters:
        raise UsageError("ADAPTER '-' must be the only ADAPTER argument")
    return adapters, len(adapters) > 1

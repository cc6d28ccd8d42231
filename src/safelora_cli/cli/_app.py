"""The typer application and the stderr console every command shares."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from safelora_cli.errors import ExitCode
from safelora_cli.version import __version__

stderr = Console(stderr=True)
if not stderr.is_terminal:  # logs and CI: room for full module names
    stderr.width = max(stderr.width, 120)


invoked: list[str] = ["safelora"]
"""The command line of this invocation (for the model card): set when the application starts."""


class _OneLineUsageErrors(TyperGroup):
    """Usage errors that click finds (unknown option, bad choice, missing value) as one stderr
    line with a hint, like every other error, instead of click's usage block."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        invoked[:] = ["safelora", *(sys.argv[1:] if args is None else args)]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except typer.TyperException as exc:  # click's exceptions derive from it
            message = exc.format_message()
            show = getattr(exc, "show", None)  # click's exceptions know how to show themselves
            if callable(show) and (exc.exit_code != ExitCode.USAGE or "\n" in message.strip()):
                show()  # not a usage error, or help text (no arguments given)
            else:
                given = list(sys.argv[1:] if args is None else args)
                command = "safelora" + (
                    f" {given[0]}" if given and given[0] in self.commands else ""
                )
                hint = f"`{command} --help` lists the options"
                print(f"error: {' '.join(message.split())} (hint: {hint})", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(int(ExitCode.INTERRUPTED))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="safelora",
    help="Make a LoRA fine-tune safe again: Safe LoRA projection onto the alignment direction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
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

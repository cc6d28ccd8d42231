"""``safelora presets``: the known base/aligned pairs and their recommended selection."""

from __future__ import annotations

from typing import Annotated

import typer

from safelora_cli.cli._app import app, stderr
from safelora_cli.cli._errors import errors_to_exit
from safelora_cli.display.sink import json_text
from safelora_cli.display.terminal import presets_table, show_safely, write_stdout

EXAMPLES = """\b
Examples:
  safelora presets
  safelora presets --json | jq -r '.[].name'
  SAFELORA_PRESET_PATH=./my-presets safelora presets   # add your own <name>.toml files
"""


@app.command("presets", epilog=EXAMPLES)
def presets_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the presets to stdout.")] = False,
) -> None:
    """List the presets: known base/aligned pairs, their hub ids and recommended selection."""
    with errors_to_exit():
        from safelora_cli.inputs.config import load_presets

        described = [preset.describe() for preset in load_presets().values()]
        if as_json:
            write_stdout(json_text(described))
        else:
            show_safely(stderr, presets_table, described)

"""``safelora inspect``: what an adapter holds and whether it pairs, from headers only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safelora_cli.cli._app import app, stderr
from safelora_cli.cli._errors import errors_to_exit
from safelora_cli.cli._options import AdapterNameOpt, RevisionOpt
from safelora_cli.display.sink import json_text
from safelora_cli.display.terminal import write_stdout
from safelora_cli.errors import IncompatibleInputError, UsageError

EXAMPLES = """\b
Examples:
  safelora inspect ./my-lora
  safelora inspect ./my-lora --base meta-llama/Llama-2-7b-hf   # does every module pair?
  safelora inspect ./my-lora --json | jq '.summary'
  safelora inspect ./full-ft --aligned meta-llama/Llama-2-7b-chat-hf   # what changed, how much
  safelora inspect llama-2-7b-chat.safetensors                          # what a profile holds
"""


@app.command("inspect", epilog=EXAMPLES)
def inspect_command(
    adapter: Annotated[
        str,
        typer.Argument(
            help="PEFT LoRA adapter folder; a full fine-tune's model folder (with --aligned); "
            "or an alignment profile's file.",
            show_default=False,
            metavar="ADAPTER",
        ),
    ],
    base: Annotated[
        str | None,
        typer.Option("--base", help="Also check that every module pairs with this model."),
    ] = None,
    aligned: Annotated[
        str | None,
        typer.Option(
            "--aligned",
            help="Also pair against this aligned model (needs --base); for a full fine-tune: "
            "the model it was trained from.",
        ),
    ] = None,
    revision: RevisionOpt = None,
    adapter_name: AdapterNameOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the description to stdout.")
    ] = False,
) -> None:
    """Show ADAPTER's modules, ranks, scaling, dtypes and passthrough tensors (headers only).

    With --base, exits 4 after the listing when a module has no matching base weight. For a full
    fine-tune, with --aligned: which weights changed and by how much (‖D‖/‖W‖; reads both).
    """
    with errors_to_exit():
        if Path(adapter).is_file():  # an alignment profile
            _inspect_profile(Path(adapter), as_json)
            return
        if _is_model(adapter):
            _inspect_model(adapter, aligned, revision, as_json)
            return
        if aligned is not None and base is None:
            raise UsageError("--aligned needs --base", "give both models, or only --base")
        from safelora_cli.runs.inspection import inspect_adapter

        info = inspect_adapter(adapter, base, aligned, revision=revision, adapter_name=adapter_name)
        if as_json:
            write_stdout(json_text(info))
        else:
            from safelora_cli.display.terminal import inspect_tables, show_safely

            show_safely(stderr, inspect_tables, info)
        unpaired = [m for m in info["modules"] if m.get("paired") is False]
        if unpaired:
            first = unpaired[0]
            raise IncompatibleInputError(
                f"{adapter}: {len(unpaired)} of {len(info['modules'])} modules do not pair with "
                f"the model(s) given; first: {first['module']}: {first['problem']}",
                "check that --base is the model the adapter was trained on",
            )


def _inspect_profile(path: Path, as_json: bool) -> None:
    from safelora_cli.sources.profile import read_profile
    from safelora_cli.sources.profile_summary import describe

    summary = describe(read_profile(path))
    if as_json:
        write_stdout(json_text(summary))
    else:
        from safelora_cli.display.terminal import profile_table, show_safely

        show_safely(stderr, profile_table, summary)


def _is_model(ref: str) -> bool:
    from safelora_cli.runs.inspection import FULL, input_kind

    return Path(ref).is_dir() and input_kind(Path(ref)) == FULL


def _inspect_model(model: str, aligned: str | None, revision: str | None, as_json: bool) -> None:
    if aligned is None:
        raise UsageError(
            f"{model}: is a full model; inspecting it compares it with --aligned",
            "give --aligned REF, the model it was fine-tuned from",
        )
    from safelora_cli.runs.inspect_full import inspect_full

    info = inspect_full(model, aligned, revision)
    if as_json:
        write_stdout(json_text(info))
    else:
        from safelora_cli.display.terminal import changed_table, show_safely

        show_safely(stderr, changed_table, info)

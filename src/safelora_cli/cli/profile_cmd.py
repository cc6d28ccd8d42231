"""``safelora profile``: make an alignment profile of a model pair, once, for every later run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safelora_cli.cli._app import app, stderr
from safelora_cli.cli._errors import errors_to_exit
from safelora_cli.cli._options import QuietOpt, RevisionOpt
from safelora_cli.display.sink import json_text
from safelora_cli.display.terminal import (
    notice_printer,
    profile_table,
    progress_bar,
    show_safely,
    write_stdout,
)
from safelora_cli.errors import UsageError
from safelora_cli.settings import PROFILE_MAX_RANK, PROFILE_TOLERANCE

EXAMPLES = """\b
Examples:
  safelora profile --base meta-llama/Llama-2-7b-hf --aligned meta-llama/Llama-2-7b-chat-hf \\
      --output llama-2-7b-chat.safetensors
  safelora profile --preset llama-2-7b-chat --rank 32 --output llama2-r32.safetensors
  safelora score ./my-lora --profile llama-2-7b-chat.safetensors --fail-if-projected 0
  safelora inspect llama-2-7b-chat.safetensors
"""


def _given(value: float | None, default: float) -> float:
    return default if value is None else value


@app.command("profile", epilog=EXAMPLES)
def profile_command(
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="The profile file to write.", metavar="FILE"),
    ],
    base: Annotated[str | None, typer.Option("--base", help="Base model.", metavar="REF")] = None,
    aligned: Annotated[
        str | None, typer.Option("--aligned", help="Its aligned sibling.", metavar="REF")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="A known base/aligned pair.", metavar="NAME"),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option("--rank", help="Keep K singular triplets per weight.", metavar="K"),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance",
            help="Per weight the smallest k whose paper-mode error ‖Ĉ − Ĉ_k‖/‖Ĉ‖ is within T "
            "[default: 0.01].",
            metavar="T",
        ),
    ] = None,
    max_rank: Annotated[
        int,
        typer.Option(
            "--max-rank",
            help="With --tolerance: a weight that needs more is stored whole (exact).",
            metavar="R",
        ),
    ] = PROFILE_MAX_RANK,
    targets: Annotated[
        list[str] | None,
        typer.Option(
            "--targets",
            help="Weights to profile: names, one regex, or all-linear [default: every 2-D "
            "weight of the repeated blocks].",
            metavar="NAMES",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", metavar="DEVICE")
    ] = None,
    revision: RevisionOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing FILE.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary to stdout.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Make an alignment profile: per weight the leading singular vectors and values of
    V = W_aligned − W_base, a small file that stands in for the model pair (--profile)."""
    with errors_to_exit():
        from safelora_cli.api import make_profile
        from safelora_cli.inputs.config import resolve_run
        from safelora_cli.math.lowrank import RankRule
        from safelora_cli.runs.run import resolve_device

        flags = {"preset": preset, "base": base, "aligned": aligned, "revision": revision,
                 "device": device, "targets": targets or None}  # fmt: skip
        config = resolve_run(flags)
        if rank is not None and tolerance is not None:
            raise UsageError("give --rank or --tolerance, not both")
        rule = RankRule(
            rank=rank,
            # only an absent --tolerance takes the default: 0, -0.0 or 1e-400 (0.0) is refused
            tolerance=None if rank is not None else _given(tolerance, PROFILE_TOLERANCE),
            max_rank=max_rank,
        )
        assert config.base is not None  # no --profile here, so resolve_run required both
        assert config.aligned is not None
        with progress_bar(stderr, quiet, "profiling") as progress:
            summary = make_profile(
                config.base, config.aligned, output, rule,
                targets=config.settings.targets, device=resolve_device(config.settings.device),
                revision=config.revision, force=force, progress=progress,
                notify=notice_printer(stderr, quiet),
            )  # fmt: skip
        if as_json:
            write_stdout(json_text(summary))
        else:
            if not quiet:
                show_safely(stderr, profile_table, summary)
            write_stdout(f"{output}\n")

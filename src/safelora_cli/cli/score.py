"""``safelora score``: the scores and selection of ``patch``, written nowhere; a CI gate."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from safelora_cli.cli._app import app, stderr
from safelora_cli.cli._ci import CiOutputs
from safelora_cli.cli._errors import errors_to_exit
from safelora_cli.cli._options import (
    AdaptersArg,
    JsonOpt,
    JunitOpt,
    QuietOpt,
    RunFlags,
    adapter_list,
    run_options,
)
from safelora_cli.display.terminal import emit_results, notice_printer, progress_bar
from safelora_cli.errors import ExitCode, UsageError
from safelora_cli.output.report import subject
from safelora_cli.untrusted import safe_text

EXAMPLES = """\b
Examples:
  safelora score ./my-lora --base ./base --aligned ./chat
  safelora score ./my-lora --base ./base --aligned ./chat \\
      --select threshold --threshold 0.5 --fail-if-projected 0   # CI gate
  safelora score ./run/checkpoint-* --preset llama-2-7b-chat --json > reports.json
  safelora score ./full-ft --base ./base --aligned ./chat --targets all-linear
  safelora score ./my-lora --profile llama2.safetensors --fail-if-projected 0 \\
      --junit safelora-junit.xml   # test report for GitLab, Jenkins, Azure
"""


@app.command(epilog=EXAMPLES)
@run_options
def score(
    adapters: AdaptersArg,
    run: RunFlags,
    as_json: JsonOpt = False,
    fail_if_projected: Annotated[
        int | None,
        typer.Option(
            "--fail-if-projected",
            help="Exit 1 if more than N modules of any adapter would be projected (CI gate).",
            metavar="N",
        ),
    ] = None,
    junit: JunitOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --junit file.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Score ADAPTER's modules and show which would be projected; writes nothing (but --junit).

    In GitHub Actions (GITHUB_ACTIONS=true) a markdown summary per adapter is appended to
    $GITHUB_STEP_SUMMARY, and warnings and a failed gate are annotations (on stderr).
    """
    ci = CiOutputs(junit, force)
    with errors_to_exit():
        if fail_if_projected is not None and fail_if_projected < 0:
            raise UsageError(
                f"--fail-if-projected {fail_if_projected} is negative",
                "give the number of projected modules to tolerate, 0 or more",
            )
        paths, batch = adapter_list(adapters)
        config = run.resolve()
        ci.check(paths, config)
        from safelora_cli import api as pipeline

        with progress_bar(stderr, quiet) as progress:
            results = pipeline.score_many(
                paths,
                config.base,
                config.aligned,
                config.settings,
                config.revision,
                progress,
                notice_printer(stderr, quiet),
                profile=config.profile,
            )
        reports = [r.report for r in results]
        gates = _gate(reports, fail_if_projected)
        ci.publish(reports, gates)  # first: a --junit that cannot be written leaves stdout empty
        emit_results(stderr, reports, as_json, quiet, batch)
    for index, why in gates.items():
        print(f"gate failed: {safe_text(subject(reports[index]))}: {why}", file=sys.stderr)
    if gates:
        raise typer.Exit(int(ExitCode.GATE_FAILED))


def _gate(reports: list[dict[str, Any]], allowed: int | None) -> dict[int, str]:
    """Report index -> why it fails ``--fail-if-projected`` (none without the option)."""
    if allowed is None:
        return {}
    return {
        k: f"{r['summary']['projected']} modules would be projected, more than {allowed}"
        for k, r in enumerate(reports)
        if r["summary"]["projected"] > allowed
    }

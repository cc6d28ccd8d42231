"""``safelora patch``: project the drifting modules of one or more adapters, write new folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safelora_cli.cli._app import app, invoked, stderr
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
from safelora_cli.errors import UsageError

EXAMPLES = """\b
Examples:
  safelora patch ./my-lora --base meta-llama/Llama-2-7b-hf \\
      --aligned meta-llama/Llama-2-7b-chat-hf --output ./my-lora-safe
  safelora patch ./my-lora --base ./base --aligned ./chat --output ./out \\
      --select threshold --threshold 0.35 --json > report.json
  find runs -name adapter_config.json -printf '%h\\n' | \\
      safelora patch - --base ./base --aligned ./chat --output ./safe
  safelora patch ./my-lora --preset llama-2-7b-chat --output ./my-lora-safe
  safelora patch ./my-lora --config run.toml --num-layers 8 --output ./out
  safelora patch ./my-lora --preset llama-2-7b-chat --merge --output ./merged-model
  safelora patch ./full-ft --base ./base --aligned ./chat --output ./full-ft-safe
  safelora patch ./full-ft --base ./base --aligned ./chat --targets q_proj,v_proj -o ./out
  safelora patch ./my-lora --profile llama2.safetensors -o ./my-lora-safe --junit junit.xml
"""


@app.command(epilog=EXAMPLES)
@run_options
def patch(
    adapters: AdaptersArg,
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="New folder (with several adapters: OUTPUT/<adapter name>)."
        ),
    ],
    run: RunFlags,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Write the report here instead of OUTPUT/ (one adapter)."),
    ] = None,
    as_json: JsonOpt = False,
    junit: JunitOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace safelora's files in a non-empty OUTPUT (and --junit's file)."
        ),
    ] = False,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="Write the full model the patched adapter makes (W_aligned + s·B'A), "
            "for engines without LoRA.",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Project the drifting modules of ADAPTER (or of a full fine-tune) and write the patched
    adapter (or model) to OUTPUT.

    A full fine-tune (a model folder with config.json and safetensors, no adapter_config.json)
    is patched on D = W_ft − W_aligned: its selected weights become W_aligned + P D, every other
    tensor and file stays the fine-tune's. Cost per weight O(out·in·min(out, in)): about 1-2 s
    for a 2048 x 5632 weight on 2 CPU cores, 20-45 min for a 7B model (extrapolated); --device
    cuda uses a GPU (not measured yet; see docs/performance.md). In GitHub Actions
    (GITHUB_ACTIONS=true) a markdown summary per adapter is appended to $GITHUB_STEP_SUMMARY.
    """
    ci = CiOutputs(junit, force)
    with errors_to_exit():
        paths, batch = adapter_list(adapters)
        if batch and report is not None:
            raise UsageError("--report takes one adapter", "each batch output has its own report")
        config = run.resolve()
        ci.check(paths, config, output, report)
        from safelora_cli import api as pipeline

        with progress_bar(stderr, quiet) as progress:
            if batch:
                results = pipeline.patch_many(
                    paths, config.base, config.aligned, output, config.settings,
                    force=force, revision=config.revision, progress=progress,
                    notify=notice_printer(stderr, quiet), command=invoked, merge=merge,
                    profile=config.profile,
                )  # fmt: skip
            else:
                results = [
                    pipeline.patch(
                        paths[0],
                        config.base,
                        config.aligned,
                        output,
                        config.settings,
                        force=force,
                        report_path=report,
                        revision=config.revision,
                        progress=progress,
                        profile=config.profile,
                        notify=notice_printer(stderr, quiet),
                        command=invoked,
                        merge=merge,
                    )
                ]
        reports = [r.report for r in results]
        ci.publish(reports, {})  # first: a --junit that cannot be written leaves stdout empty
        emit_results(stderr, reports, as_json, quiet, batch)

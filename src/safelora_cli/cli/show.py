"""``safelora show``: render a saved report (the heat map and the summary), as JSON or as HTML."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safelora_cli.cli._app import app, stderr
from safelora_cli.cli._errors import errors_to_exit
from safelora_cli.display.sink import json_text
from safelora_cli.display.terminal import notice_printer, show_report, write_stdout
from safelora_cli.errors import UsageError
from safelora_cli.notices import Notices

EXAMPLES = """\b
Examples:
  safelora show ./my-lora-safe/safelora_report.json
  safelora score ./run/checkpoint-* --preset llama-2-7b-chat --json > reports.json
  safelora show reports.json --html reports.html
  safelora show report.json --json | jq '.summary'
  safelora show report.json --markdown > comment.md   # a pull-request comment, a CI summary
"""


@app.command("show", epilog=EXAMPLES)
def show_command(
    report: Annotated[
        Path,
        typer.Argument(
            help="A report: safelora_report.json, or what --json printed (one or a list).",
            show_default=False,
            metavar="REPORT",
        ),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report(s) to stdout, checked.")
    ] = False,
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Also write a self-contained HTML page here.", metavar="FILE"),
    ] = None,
    markdown: Annotated[
        bool,
        typer.Option(
            "--markdown",
            help="Print the report(s) as GitHub-flavoured markdown to stdout (the GitHub Actions "
            "step summary).",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --html file.")
    ] = False,
) -> None:
    """Show a saved report: the per-layer heat map of its cosines and the modules projected."""
    with errors_to_exit():
        if as_json and markdown:
            raise UsageError("--json and --markdown both print to stdout", "choose one")
        from safelora_cli.output.report_file import read_reports

        reports = read_reports(report)
        if html is not None:
            from safelora_cli.display.html_report import render_html
            from safelora_cli.output.atomic import write_text
            from safelora_cli.output.target import check_target

            check_target(html, "--html", force=force)
            page = render_html(reports if len(reports) > 1 else reports[0])
            notices = Notices(notice_printer(stderr, quiet=False))
            write_text(html, page, "--html", "HTML page", notices)
        if as_json:
            write_stdout(json_text(reports if len(reports) > 1 else reports[0]))
        elif markdown:
            from safelora_cli.display.markdown import reports_markdown

            write_stdout(reports_markdown(reports))
        else:
            for one in reports:
                show_report(stderr, one)

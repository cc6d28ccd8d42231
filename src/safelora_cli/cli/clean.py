"""``safelora clean``: remove the staging folders that interrupted runs left in a folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from safelora_cli.cli._app import app, stderr
from safelora_cli.cli._errors import errors_to_exit
from safelora_cli.display.terminal import notice_printer, write_stdout
from safelora_cli.errors import FilesystemError
from safelora_cli.untrusted import safe_text

EXAMPLES = """\b
Examples:
  safelora clean ./out
  safelora clean ./out --dry-run
  safelora clean /data/runs --json | jq -r '.[] | select(.removable) | .path'
  find /data/runs -maxdepth 2 -type d -exec safelora clean {} \\;     # a cron job
"""


@app.command("clean", epilog=EXAMPLES)
def clean_command(
    folder: Annotated[
        Path,
        typer.Argument(
            help="The folder the outputs were written into (the parent of --output).",
            show_default=False,
            metavar="DIR",
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print every staging folder found, as JSON.")
    ] = False,
) -> None:
    """Remove the staging folders (.safelora-tmp-*) that interrupted runs (killed, out of memory,
    a power loss) left in DIR, and print each with its size. A live run's staging, another
    host's (until 7 days old) and anything that is not safelora's staging are left alone."""
    with errors_to_exit():
        from safelora_cli.notices import Notices
        from safelora_cli.output.reclaim import human_size, survey

        if not folder.is_dir():
            raise FilesystemError(f"{folder}: is not a folder", "give the folder to clean")
        notices = Notices(notice_printer(stderr, quiet=False))
        try:
            found = survey(folder, remove=not dry_run, notices=notices, listing=True)
        except OSError as exc:
            raise FilesystemError(f"{folder}: cannot be read ({exc.strerror})") from exc
        gone = [item for item in found if item.removable]
        if as_json:
            write_stdout(json.dumps([item.as_dict() for item in found], indent=2) + "\n")
        else:
            write_stdout("".join(f"{human_size(i.size)}\t{i.path}\n" for i in gone))
        freed = human_size(sum(item.size for item in gone))
        if not gone:
            summary = f"nothing to clean in {folder}"
        elif dry_run:
            summary = f"would remove {len(gone)} staging folder(s), {freed}"
        else:
            summary = f"removed {len(gone)} staging folder(s), {freed} freed"
        print(safe_text(summary), file=sys.stderr)

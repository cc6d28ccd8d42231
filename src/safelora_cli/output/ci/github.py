"""GitHub Actions: workflow-command annotations and the job's step summary.

Active only when ``GITHUB_ACTIONS=true`` (GitHub sets it on every runner); elsewhere nothing here
runs. Annotations (``::error title=safelora::…``, ``::warning title=safelora::…``) are single
lines, escaped by GitHub's rules: ``%``, CR and LF in the message; also ``:`` and ``,`` in a
property's value. The runner parses workflow commands on stdout and stderr alike, so safelora
writes them to stderr: stdout keeps carrying only the result (``--json`` stays valid JSON).
The step summary is appended to the file ``GITHUB_STEP_SUMMARY`` names, never replaced (earlier
steps' summaries are in it too).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from safelora_cli.errors import FilesystemError
from safelora_cli.untrusted import safe_text

TITLE = "safelora"
MAX_SUMMARY_BYTES = 1 << 20
"""GitHub shows at most 1 MiB of a step's summary: a larger addition is refused, not cut."""


def active(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs in a GitHub Actions job."""
    return (os.environ if environ is None else environ).get("GITHUB_ACTIONS") == "true"


def escape_data(text: str) -> str:
    """A workflow command's message: ``%``, CR and LF percent-encoded."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A workflow command's property value: as ``escape_data``, and ``:`` and ``,`` too."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(level: str, message: str, title: str = TITLE) -> str:
    """One workflow command line, ``::error title=safelora::message``; the untrusted message
    has its control characters escaped first (so it stays one line in the log too)."""
    if level not in ("error", "warning", "notice"):
        raise ValueError(f"not an annotation level: {level!r}")
    return f"::{level} title={escape_property(title)}::{escape_data(safe_text(message))}"


def summary_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The step summary file, when GitHub Actions names one."""
    environ = os.environ if environ is None else environ
    if not active(environ):
        return None
    named = environ.get("GITHUB_STEP_SUMMARY", "")
    return Path(named) if named else None


def append_summary(path: Path, markdown: str) -> None:
    """Append ``markdown`` to the step summary file (one write, after a blank line).

    Raises:
        FilesystemError: the file cannot be opened or written (not a regular file, a missing
            folder, no permission, disk full), or the addition exceeds GitHub's 1 MiB.
    """
    data = ("\n" + markdown).encode("utf-8")
    if len(data) > MAX_SUMMARY_BYTES:
        raise FilesystemError(
            f"GITHUB_STEP_SUMMARY {path}: the summary is {len(data)} bytes, over GitHub's 1 MiB",
            "use --junit for runs this large",
        )
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise FilesystemError(f"GITHUB_STEP_SUMMARY {path}: not a regular file")
    try:
        with path.open("ab") as fh:
            fh.write(data)
    except OSError as exc:
        raise FilesystemError(
            f"GITHUB_STEP_SUMMARY {path}: cannot append ({exc.strerror or exc})"
        ) from exc

"""The ``safelora`` command line: typer only; every command calls the library.

One module per command: ``patch``, ``score``, ``inspect_cmd`` (not ``inspect``: the standard
library's name), ``presets``, ``profile_cmd``, ``schema``, ``show`` and ``clean``. ``_app`` holds
the application and the stderr console, ``_options`` the options the commands share (derived from
``settings.OPTIONS``), ``_errors`` the one table from exceptions to stderr lines and exit codes,
``_ci`` what a finished run hands to CI (``--junit``, GitHub Actions' summary and annotations).
stdout carries only the result (the output path, or the report with --json); progress, tables,
warnings and errors go to stderr. torch is imported only by commands that compute.
"""

from __future__ import annotations

import gc

from safelora_cli.cli import (  # noqa: F401  (importing a command's module registers it)
    clean,
    inspect_cmd,
    patch,
    presets,
    profile_cmd,
    schema,
    score,
    show,
)
from safelora_cli.cli._app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    # torch creates ~200k objects that every full collection walks: collect young objects less
    # often while importing (0.3 s of collections at the default threshold), and freeze them all
    # at the end, so that the interpreter's last collection at exit skips them (0.35-0.45 s)
    gc.set_threshold(100_000, 10, 10)
    try:
        app()
    finally:
        gc.freeze()

"""Shared test helpers: running the CLI in-process, asserting errors, comparing tensors.

Imported by the test modules (never redefined there); constants come from the package.
"""

from __future__ import annotations

from typing import Any

import torch
from typer.testing import CliRunner, Result

from safelora_cli.cli import app
from safelora_cli.errors import ExitCode


def invoke(args: list[str], **kwargs: Any) -> Result:
    """Run the CLI in-process; ``result.stdout`` and ``result.stderr`` are separate."""
    return CliRunner().invoke(app, args, **kwargs)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64 (0 when both are zero)."""
    got64, want64 = got.double(), want.double()
    norm = float(torch.linalg.vector_norm(want64))
    diff = float(torch.linalg.vector_norm(got64 - want64))
    return diff / norm if norm else diff


def assert_error(result: Result, code: ExitCode, *phrases: str) -> str:
    """The run failed with ``code`` and one stderr line holding every phrase; returns the line."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]

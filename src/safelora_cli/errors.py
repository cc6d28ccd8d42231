"""One error hierarchy: every failure the user can cause carries its exit code and a hint.

The CLI maps these to a single line on stderr (see ``cli.py``); the library raises them and never
prints. Exit codes are the contract in shared/DESIGN.md.
"""

from __future__ import annotations


class SafeLoraError(Exception):
    """Base class: a failure with a user-facing message, a hint and an exit code."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and hint as the single stderr line the CLI prints."""
        text = " ".join(self.message.split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


class UsageError(SafeLoraError):
    """A flag or argument that cannot be used as given."""

    exit_code = 2


class CorruptFileError(SafeLoraError):
    """An input file that is not a valid safetensors/JSON file."""

    exit_code = 3


class IncompatibleInputError(SafeLoraError):
    """Valid files that do not fit together (wrong model pair, shapes, unsupported format)."""

    exit_code = 4


class NumericalError(SafeLoraError):
    """NaN or Inf in a tensor that was read or computed."""

    exit_code = 5


class FilesystemError(SafeLoraError):
    """The output cannot be written safely (exists, not writable, inside an input, disk full)."""

    exit_code = 6


class HubError(SafeLoraError):
    """A hub id could not be resolved (offline and not cached, not found, gated, bad revision)."""

    exit_code = 7


class Interrupted(SafeLoraError):
    """Ctrl-C or SIGTERM: the run stopped and left nothing partial."""

    exit_code = 130

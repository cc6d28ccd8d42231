"""One error hierarchy: every failure the user can cause carries its exit code, a hint, and the
data it is about.

The library raises these and never prints; the CLI turns any exception into one stderr line and
an exit code through one table (``cli/_errors.py``). Callers read an error's fields (``problems``,
``path``), never its message text.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from safelora_cli.untrusted import safe_text


class ExitCode(IntEnum):
    """The process exit codes: the CLI's contract with scripts and CI."""

    OK = 0
    GATE_FAILED = 1
    USAGE = 2
    CORRUPT = 3
    INCOMPATIBLE = 4
    NUMERICAL = 5
    FILESYSTEM = 6
    HUB = 7
    INTERNAL = 70
    INTERRUPTED = 130


class SafeLoraError(Exception):
    """Base class: a failure with a user-facing message and a hint; unclassified ones are bugs."""

    exit_code = ExitCode.INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and hint as the single stderr line the CLI prints: untrusted names in it
        (paths, tensor names) have their control characters escaped and are shortened."""
        text = safe_text(self.message)
        if self.hint:
            text += f" (hint: {safe_text(self.hint)})"
        return text


class UsageError(SafeLoraError):
    """A flag or argument that cannot be used as given."""

    exit_code = ExitCode.USAGE


class CorruptFileError(SafeLoraError):
    """An input file that is not a valid safetensors/JSON file."""

    exit_code = ExitCode.CORRUPT


class IncompatibleInputError(SafeLoraError):
    """Valid files that do not fit together (wrong model pair, shapes, unsupported format)."""

    exit_code = ExitCode.INCOMPATIBLE


@dataclass(frozen=True)
class PairingProblem:
    """One module that does not pair: its name and what is wrong with it."""

    module: str
    problem: str


class PairingError(IncompatibleInputError):
    """Adapter modules that do not pair with the model pair; ``problems`` lists every one."""

    def __init__(self, problems: list[PairingProblem], summary: str, hint: str) -> None:
        super().__init__(summary, hint)
        self.problems = problems


class NumericalError(SafeLoraError):
    """NaN or Inf in a tensor that was read or computed."""

    exit_code = ExitCode.NUMERICAL


class FilesystemError(SafeLoraError):
    """The output cannot be written safely (exists, not writable, inside an input, disk full)."""

    exit_code = ExitCode.FILESYSTEM


class HubError(SafeLoraError):
    """A hub id could not be resolved (offline and not cached, not found, gated, bad revision)."""

    exit_code = ExitCode.HUB


class InternalError(SafeLoraError):
    """A bug: an exception the code did not expect."""

    exit_code = ExitCode.INTERNAL


class Interrupted(SafeLoraError):
    """Ctrl-C or SIGTERM: the run stopped and left nothing partial."""

    exit_code = ExitCode.INTERRUPTED

"""Every failure to one stderr line and its exit code, through one table.

Library errors carry their exit code (``errors.ExitCode``); the table turns everything else into
one of them: Ctrl-C and SIGTERM into ``Interrupted`` (130), an OSError into ``FilesystemError``
(6), anything unexpected into ``InternalError`` (70, a bug). A traceback only with SAFELORA_DEBUG=1.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

import typer

from safelora_cli.errors import (
    FilesystemError,
    InternalError,
    Interrupted,
    SafeLoraError,
)


def _os_error(exc: OSError) -> SafeLoraError:
    return FilesystemError(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


def _internal(exc: BaseException) -> SafeLoraError:
    return InternalError(
        f"internal error: {type(exc).__name__}: {exc}",
        "rerun with SAFELORA_DEBUG=1 and report the traceback",
    )


def _itself(exc: SafeLoraError) -> SafeLoraError:
    return exc


def _interrupted(exc: KeyboardInterrupt) -> SafeLoraError:
    return Interrupted("interrupted; nothing was written")


# exception class -> the error the user sees; an exception takes the row of its nearest class
_TABLE: dict[type[BaseException], Callable[[Any], SafeLoraError]] = {
    SafeLoraError: _itself,
    KeyboardInterrupt: _interrupted,
    OSError: _os_error,
    BaseException: _internal,
}


def as_error(exc: BaseException) -> SafeLoraError:
    """The ``SafeLoraError`` an exception reaches the user as."""
    kind = next(k for k in type(exc).__mro__ if k in _TABLE)
    return _TABLE[kind](exc)


_received: list[int] = []


def _on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    # recorded: torch and safetensors can swallow the KeyboardInterrupt and raise another error
    _received.append(signum)
    raise KeyboardInterrupt


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Run a command's body: any failure becomes one stderr line and its exit code."""
    _received.clear()
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            yield
        except Exception as exc:
            if _received and not isinstance(exc, Interrupted):
                raise KeyboardInterrupt from exc
            raise
    except (Exception, KeyboardInterrupt) as exc:
        fail(as_error(exc))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if _received:  # swallowed inside torch, and the run went on to finish
        fail(Interrupted("interrupted as the run finished; its output is complete"))


def fail(error: SafeLoraError) -> NoReturn:
    """Print ``error`` as one line on stderr and exit with its code."""
    if os.environ.get("SAFELORA_DEBUG") == "1":
        import traceback

        traceback.print_exc(file=sys.stderr)
    print(f"error: {error.one_line()}", file=sys.stderr)
    raise typer.Exit(int(error.exit_code))

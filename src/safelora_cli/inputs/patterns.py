"""Regular expressions that come from input files (the keys of ``rank_pattern`` and
``alpha_pattern``, a ``target_modules`` regex), matched as PEFT matches them and in bounded time.

A pattern such as ``(a+)+$`` against a long module name backtracks for ever. Each match here runs
under a timer (SIGALRM, in the main thread: Python's regex engine checks for signals while it
matches); a pattern that outlasts it, or is longer than ``MAX_PATTERN``, is an
``IncompatibleInputError`` (exit 4) naming it. Off the main thread (a library caller's worker
thread) no timer can be set and matches are not bounded.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from types import FrameType
from typing import Any

from safelora_cli.errors import IncompatibleInputError

MATCH_SECONDS = 1.0
"""Time one match may take: real module names match any sane pattern in microseconds."""
MAX_PATTERN = 2000


class _Timeout(Exception):
    pass


def _expire(signum: int, frame: FrameType | None) -> None:
    raise _Timeout


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@lru_cache(maxsize=256)
def compile_pattern(pattern: str, template: str = "{}") -> re.Pattern[str]:
    """Compile ``template`` with ``pattern`` in it; too long or invalid is a ValueError."""
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"longer than {MAX_PATTERN} characters")
    try:
        return re.compile(template.format(pattern))
    except re.error as exc:
        raise ValueError(str(exc)) from exc


def bounded_match(regex: re.Pattern[str], text: str, full: bool, where: str) -> bool:
    """``regex.fullmatch`` (or ``match``) of ``text`` within ``MATCH_SECONDS``.

    Raises:
        IncompatibleInputError: the match did not finish in time (``where`` names the pattern).
    """
    try:
        with _time_limit(MATCH_SECONDS):
            found = regex.fullmatch(text) if full else regex.match(text)
    except _Timeout:
        raise IncompatibleInputError(
            f"{where}: the pattern {regex.pattern[:80]!r} takes more than {MATCH_SECONDS:g} s to "
            f"match {text[:80]!r} (catastrophic backtracking)",
            "simplify the pattern; PEFT itself would hang on it",
        ) from None
    return found is not None


# PEFT's rule for a rank_pattern / alpha_pattern key: the pattern matches the end of the module
# name, at a "." boundary (peft.tuners.tuners_utils, get_pattern_key).
PEFT_KEY = r"(.*\.)?({})$"


def check_pattern(pattern: str, where: str) -> None:
    """Refuse a pattern that is not a valid regular expression or is too long."""
    try:
        compile_pattern(pattern, PEFT_KEY)
    except ValueError as exc:
        raise IncompatibleInputError(
            f"{where}: {pattern[:80]!r} is not a usable regular expression ({exc})"
        ) from exc


def pattern_value(patterns: Mapping[str, Any] | None, module: str, where: str = "") -> Any | None:
    """The value of the first key of ``patterns`` that matches ``module`` (PEFT's rule), or None."""
    for pattern, value in (patterns or {}).items():
        if pattern == module:
            return value
        regex = compile_pattern(pattern, PEFT_KEY)
        if bounded_match(regex, module, full=False, where=where or "pattern"):
            return value
    return None

"""Small input files (JSON and TOML: configs, indexes, run files, reports), read through one
checked reader.

Every such file comes from a folder the user may have downloaded from a stranger, so it is read
only if it is a regular file (a FIFO or a device never hangs the run), up to a size cap, and its
nesting depth is bounded. A file that cannot be read at all is a ``CorruptFileError`` (exit 3)
whichever file it is; what is wrong inside it is the caller's error class (an adapter config that
is not an object is exit 4, a run file with bad syntax exit 2).
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO

from safelora_cli.errors import CorruptFileError, SafeLoraError
from safelora_cli.untrusted import shorten

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

MAX_JSON_BYTES = 50 * 1024 * 1024
MAX_DEPTH = 64
"""Deeper nesting than any real config has: refused before it can exhaust the stack."""


def open_regular(path: Path) -> BinaryIO:
    """Open an input file for reading, refusing anything but a regular file: opening a FIFO
    would wait for a writer for ever, and a device never ends.

    Raises:
        CorruptFileError: the file cannot be opened, or is not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptFileError(
                f"{path}: is not a regular file (a FIFO, device or folder)",
                "replace it with the real file",
            )
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path: Path, what: str, limit: int, error: type[SafeLoraError]) -> bytes:
    """The bytes of a small regular file.

    Args:
        path: the file; what: how to name it in errors ("adapter config").
        limit: the most bytes it may hold (``error`` beyond that).
        error: the error class for a file that is too large.
    Raises:
        CorruptFileError: the file cannot be opened or read, or is not a regular file.
    """
    with open_regular(path) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise error(f"{path}: {what} is {size} bytes, more than the {limit} allowed")
            data = fh.read(limit + 1)
        except OSError as exc:
            raise CorruptFileError(f"{path}: cannot read {what} ({exc.strerror})") from exc
    if len(data) > limit:  # it grew after fstat
        raise error(f"{path}: {what} is more than the {limit} bytes allowed")
    return data


class DuplicateKey(ValueError):
    """A key given twice in one JSON object (``json`` would silently keep the last)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


def depth(value: Any) -> int:
    """Nesting depth of decoded JSON/TOML (a scalar is 0), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        stack.extend((child, level + 1) for child in children)
    return deepest


def _checked(
    value: Any, path: Path, what: str, error: type[SafeLoraError], kinds: tuple[type, ...]
) -> Any:
    if not isinstance(value, kinds):
        names = {"dict": "a JSON object", "list": "a JSON list"}
        expected = " or ".join(names.get(kind.__name__, kind.__name__) for kind in kinds)
        raise error(f"{path}: {what} is not {expected}")
    if depth(value) > MAX_DEPTH:
        raise error(f"{path}: {what} is nested more than {MAX_DEPTH} levels deep")
    return value


MAX_INT_DIGITS = 19
"""With ``strict_numbers``: the longest integer a file of ours can hold (64 bits)."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number (JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{shorten(text, 40)} is not a finite float")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def decode_json(
    raw: bytes,
    path: Path,
    what: str,
    error: type[SafeLoraError],
    kinds: tuple[type, ...] = (dict,),
    strict_numbers: bool = False,
) -> Any:
    """Decode JSON bytes holding one of ``kinds`` (an object by default), rejecting duplicate
    keys and deep nesting; with ``strict_numbers`` (files safelora writes: reports, profiles)
    also NaN, Infinity, floats that overflow (1e309) and integers over 64 bits."""
    numbers: dict[str, Any] = (
        {"parse_constant": _no_constant, "parse_float": _finite_float, "parse_int": _bounded_int}
        if strict_numbers
        else {}
    )
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicates, **numbers)
    except DuplicateKey as exc:
        raise error(f"{path}: {what} has the key {exc.key!r} twice") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{path}: {what} is not valid JSON ({exc})", "re-export the file") from exc
    return _checked(value, path, what, error, kinds)


def load_json(
    path: Path,
    what: str,
    error: type[SafeLoraError] = CorruptFileError,
    limit: int = MAX_JSON_BYTES,
) -> dict[str, Any]:
    """Read a JSON file that must hold one object (see ``read_small`` and ``decode_json``).

    Example:
        >>> load_json(Path("adapter/adapter_config.json"), "adapter config")["r"]
        16
    """
    value: dict[str, Any] = decode_json(read_small(path, what, limit, error), path, what, error)
    return value


def decode_toml(
    raw: bytes, path: Path | str, what: str, error: type[SafeLoraError]
) -> dict[str, Any]:
    """Decode a TOML document (a run file, a preset) with the depth check of ``decode_json``."""
    try:
        value = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise error(f"{path}: {what} is not valid TOML ({exc})", "fix the file's syntax") from exc
    checked: dict[str, Any] = _checked(value, Path(path), what, error, (dict,))
    return checked


def load_toml(
    path: Path, what: str, error: type[SafeLoraError], limit: int = 1024 * 1024
) -> dict[str, Any]:
    """Read a TOML file with the checks of ``read_small`` and ``decode_toml``."""
    return decode_toml(read_small(path, what, limit, error), path, what, error)

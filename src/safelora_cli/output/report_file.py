"""Reading a saved report (``safelora show``): the file parsed into checked values before any of
it is displayed.

A report file can come from anyone, so it is read as untrusted input: through the checked JSON
reader (regular file, size cap, nesting depth; numbers finite and integers within 64 bits), then
checked field by field against the report schema (README, "Report"): every field the display uses
has its type and range (cosines in [-1, 1], norms finite and ≥ 0, counts and ranks integers in
range, names and free text strings of bounded length), and a report that is not one — an empty
list, a field of the wrong type, a number out of range — is ``CorruptFileError`` (exit 3) naming
the field; a newer schema is ``IncompatibleInputError`` (exit 4). Fields this version does not
know are kept as they are (a newer tool may add fields within one schema version). Checking is
linear in the file's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safelora_cli.errors import CorruptFileError, IncompatibleInputError
from safelora_cli.inputs.smallfiles import MAX_JSON_BYTES, decode_json, read_small
from safelora_cli.output.report import SCHEMA_VERSION

MAX_NAME = 1024
"""The longest module name a report may hold (real ones are under 200 characters)."""
MAX_TEXT = 65536
"""The longest string anywhere else in a report (a warning, a path)."""
MAX_COUNT = 2**31 - 1
COSINE_SLACK = 1e-6  # a cosine computed in float64 may pass ±1 by rounding
Check = Callable[[Any, str], None]


class _Bad(Exception):
    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")


def _text(limit: int) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, str):
            raise _Bad(where, f"is a {_kind(value)}, not a string")
        if len(value) > limit:
            raise _Bad(where, f"is a string of {len(value)} characters (at most {limit})")

    return check


def _boolean(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise _Bad(where, f"is a {_kind(value)}, not true or false")


def _count(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise _Bad(where, f"{_short(value)} is not a count (an integer in 0..{MAX_COUNT})")


def _real(low: float, high: float) -> Check:
    def check(value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(where, f"is a {_kind(value)}, not a number")
        if not (math.isfinite(value) and low <= value <= high):
            raise _Bad(where, f"{_short(value)} is outside [{low:g}, {high:g}]")

    return check


def _optional(check: Check) -> Check:
    def optional(value: Any, where: str) -> None:
        if value is not None:
            check(value, where)

    return optional


def _list_of(check: Check, limit: int | None = None) -> Check:
    def each(value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise _Bad(where, f"is a {_kind(value)}, not a list")
        if limit is not None and len(value) > limit:
            raise _Bad(where, f"holds {len(value)} items (at most {limit})")
        for k, item in enumerate(value):
            check(item, f"{where}[{k}]")

    return each


def _object(fields: dict[str, tuple[bool, Check]]) -> Check:
    """An object with these fields (name -> (required, check)); other fields are kept."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise _Bad(where, f"is a {_kind(value)}, not an object")
        for name, (required, field_check) in fields.items():
            if name in value:
                field_check(value[name], f"{where}.{name}")
            elif required:
                raise _Bad(where, f"has no {name!r}")
        _strings(value, where)

    return check


def _strings(value: dict[str, Any], where: str) -> None:
    """Every string directly in ``value`` (keys included) within MAX_TEXT."""
    for key, item in value.items():
        if len(key) > MAX_TEXT or (isinstance(item, str) and len(item) > MAX_TEXT):
            raise _Bad(where, f"holds a string of more than {MAX_TEXT} characters")


_NAME, _TEXT = _text(MAX_NAME), _text(MAX_TEXT)
_NORM = _optional(_real(0.0, math.inf))
_NUMBER = _optional(_real(-math.inf, math.inf))
_COSINE = _optional(_real(-1.0 - COSINE_SLACK, 1.0 + COSINE_SLACK))
_SHARE = _optional(_real(0.0, 1.0 + COSINE_SLACK))
_FLAG = (False, _boolean)
_MODULE = _object({
    "module": (True, _NAME),
    "cosine": (True, _COSINE),
    "projected": (True, _boolean),
    "skipped": (True, _optional(_TEXT)),
    "weight": (False, _optional(_NAME)),
    "shape": (False, _list_of(_count, 4)),
    "rank": (False, _optional(_count)),
    "v_norm": (False, _NORM),
    "b_norm_before": (False, _NORM),
    "b_norm_after": (False, _NORM),
    "pdst": (False, _SHARE),
    "cosine_bound": (False, _optional(_real(0.0, 2.0))),
    "captured_energy": (False, _SHARE),
    "subspace_rank": (False, _optional(_count)),
    "profile_rank": (False, _optional(_count)),
    "fused": _FLAG, "tied": _FLAG, "transposed": _FLAG, "uncertain": _FLAG,
})  # fmt: skip
_SUMMARY = _object({
    "modules": (True, _count),
    "projected": (True, _count),
    "skipped": (True, _count),
    "threshold_used": (True, _NUMBER),
    "mean_pdst": (True, _SHARE),
    "uncertain": (False, _count),
})  # fmt: skip
_SETTINGS = _object({
    "select": (False, _optional(_TEXT)),
    "num_layers": (False, _optional(_count)),
    "threshold": (False, _COSINE),
    "projection": (False, _optional(_TEXT)),
    "rank": (False, _optional(_count)),
    "energy": (False, _SHARE),
})  # fmt: skip
_INPUT = _object({
    "ref": (False, _optional(_TEXT)),
    "path": (False, _optional(_TEXT)),
    "commit": (False, _optional(_TEXT)),
})  # fmt: skip


def _inputs(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise _Bad(where, f"is a {_kind(value)}, not an object")
    for role, entry in value.items():
        _NAME(role, f"{where} key")
        _optional(_INPUT)(entry, f"{where}.{role}")


def _warning(value: Any, where: str) -> None:
    if isinstance(value, str):
        _TEXT(value, where)
    else:
        _object({"message": (False, _TEXT), "code": (False, _TEXT)})(value, where)


_REPORT = _object({
    "modules": (True, _list_of(_MODULE)),
    "summary": (True, _SUMMARY),
    "settings": (False, _SETTINGS),
    "inputs": (False, _inputs),
    "output": (False, _optional(_TEXT)),
    "kind": (False, _TEXT),
    "passthrough": (False, _list_of(_TEXT)),
    "warnings": (False, _list_of(_warning)),
    "tool": (False, _object({})),
})  # fmt: skip


def read_reports(path: Path) -> list[dict[str, Any]]:
    """The report(s) in a saved file: one report, or the list that ``--json`` prints for a batch,
    each checked (module docstring).

    Raises:
        CorruptFileError: not JSON, not reports, or a field of the wrong type or out of range.
        IncompatibleInputError: written by a newer safelora (a higher ``schema_version``).
    """
    value = decode_json(
        read_small(path, "report", MAX_JSON_BYTES, CorruptFileError),
        path,
        "report",
        CorruptFileError,
        (dict, list),
        strict_numbers=True,
    )
    reports = value if isinstance(value, list) else [value]
    if not reports:
        raise CorruptFileError(f"{path}: an empty list, not a safelora report")
    for k, report in enumerate(reports):
        where = f"report {k}" if isinstance(value, list) else "report"
        if not isinstance(report, dict) or not isinstance(report.get("modules"), list):
            raise CorruptFileError(f"{path}: {where} is not a safelora report (no 'modules' list)")
        _schema(path, where, report.get("schema_version"))
        try:
            _REPORT(report, where)
        except _Bad as exc:
            raise CorruptFileError(
                f"{path}: {exc}", "this is not a report safelora wrote; re-run to get one"
            ) from None
    return reports


def _schema(path: Path, where: str, version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CorruptFileError(
            f"{path}: {where}: schema_version {_short(version)} is not a version number"
        )
    if version > SCHEMA_VERSION:
        raise IncompatibleInputError(
            f"{path}: report schema version {version}; this safelora reads up to {SCHEMA_VERSION}",
            "upgrade safelora (pip install -U safelora)",
        )


def _kind(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

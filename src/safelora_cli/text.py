"""Untrusted text made safe to show: paths, tensor names and config values come from downloaded
folders, and a name can hold terminal escape sequences, newlines or rich markup.

``safe_text`` escapes every control character (C0, DEL, C1), the Unicode bidirectional
overrides and unpaired surrogates (undecodable file names) as ``\\x1b``-style escapes, so a
message stays one line and nothing reaches the terminal raw; very long words are shortened in
the middle. Rich markup is escaped where text goes through rich (``display.py``).
"""

from __future__ import annotations

import re

MAX_WORD = 160
"""A longer run of non-space characters (a path, a tensor name) is shortened in the middle."""

_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_LONG = re.compile(rf"\S{{{MAX_WORD + 1},}}")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _shorten(match: re.Match[str]) -> str:
    word = match.group()
    keep = MAX_WORD // 2 - 2
    return f"{word[:keep]}…{word[-keep:]} ({len(word)} chars)"


def safe_text(text: str, *, shorten: bool = True) -> str:
    """``text`` with control and bidi characters escaped, and over-long words shortened.

    Example:
        >>> safe_text("model.\\x1b]0;owned\\x07q_proj")
        'model.\\\\x1b]0;owned\\\\x07q_proj'
    """
    escaped = _UNSAFE.sub(_escape, text)
    return _LONG.sub(_shorten, escaped) if shorten else escaped

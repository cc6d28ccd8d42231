"""Untrusted strings (tensor names, paths, config values) made safe to show.

Names come from adapters and models downloaded from strangers: a name can hold terminal escape
sequences (ESC, BEL, C1 controls), bidirectional overrides that reorder what the reader sees,
newlines that forge a second message line, or be thousands of characters long. ``printable``
turns any of them into one visible line of bounded length; ``safe_text`` does the same for a
whole message (an error line), shortening each over-long word (a path, a name) in it. Rich markup
is not this module's concern: the display code escapes it or builds ``rich.text.Text`` objects,
which never interpret markup.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, line/paragraph separators, the bidi marks, embeddings, overrides and
# isolates ("Trojan Source"), unpaired surrogates (file names that are not valid UTF-8), and the
# invisible characters that make two different names look the same: zero-width space, joiners
# and marks (U+200B-U+200F), the soft hyphen, word joiner and invisible operators (U+2060-U+206F),
# the byte-order mark / zero-width no-break space (U+FEFF), the combining grapheme joiner, the
# Hangul and Khmer fillers, Mongolian selectors, variation selectors, interlinear annotations and
# tag characters. Each is shown as a visible escape, never written raw.
INVISIBLE = (
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb\U000e0000-\U000e0fff"
)
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{INVISIBLE}\ud800-\udfff]")
ELLIPSIS = "..."
MAX_WORD = 160
"""In a message, a longer run of non-space characters (a path, a tensor name) is shortened."""
_LONG = re.compile(rf"\S{{{MAX_WORD + 1},}}")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: object, limit: int = 80, ascii_only: bool = False) -> str:
    """One safe line for ``text``: controls escaped (``\\x1b``), shortened in the middle.

    Args:
        text: any value; non-strings are shown through ``str``.
        limit: the longest result, in characters (at least 8); the middle of a longer text is
            replaced by "...", so both the start and the end (usually the leaf name) stay visible.
        ascii_only: also escape every non-ASCII character (for plain-text output whose
            encoding is unknown, such as CI logs).
    Returns:
        The escaped, shortened text.
    Example:
        >>> printable("model.layers.0.\\x1b]0;owned\\x07q_proj")
        'model.layers.0.\\\\x1b]0;owned\\\\x07q_proj'
    """
    shown = _UNSAFE.sub(_escape, str(text))
    if ascii_only:
        shown = shown.encode("ascii", "backslashreplace").decode("ascii")
    return shorten(shown, limit)


def shorten(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its start and end around "..."."""
    limit = max(limit, 2 * len(ELLIPSIS) + 2)
    if len(text) <= limit:
        return text
    keep = limit - len(ELLIPSIS)
    head = keep - keep // 2
    return text[:head] + ELLIPSIS + text[len(text) - keep // 2 :]


def _shorten_word(match: re.Match[str]) -> str:
    word = match.group()
    return f"{shorten(word, MAX_WORD)} ({len(word)} chars)"


def safe_text(text: str) -> str:
    """A message (an error or warning line) made safe: controls escaped as in ``printable``,
    each word over ``MAX_WORD`` characters shortened in the middle, nothing else changed.

    Example:
        >>> safe_text("--output x\nINJECTED: is a symlink")
        '--output x\\x0aINJECTED: is a symlink'
    """
    return _LONG.sub(_shorten_word, _UNSAFE.sub(_escape, text))

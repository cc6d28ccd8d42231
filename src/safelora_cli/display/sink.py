"""The one display sink: every value shown to a person or printed as a result passes through here.

Reports, profiles and adapters come from files anyone can craft, and not only their names: a
report read by ``safelora show`` may hold "[link=...]" or an escape sequence where a count should
be. So the renderers (terminal tables, the heat map, the HTML page, ``inspect``) never put a
value into rich markup, an HTML page or a JSON result themselves; they take it from here:

- ``plain``: one visible line, the rules of ``untrusted.printable`` (controls, bidi overrides and
  zero-width characters escaped, long text shortened in the middle); the heat map's text (its
  terminal and plain forms, and the HTML page's grid) is made of it;
- ``cell`` / ``line``: that line as ``rich.text.Text``, which rich never parses as markup (a
  table's title, caption or cell given as ``str`` would be);
- ``number``: a finite number formatted, None as "-", anything else shown as text, never a crash
  (an integer too large for a float included);
- ``html``: ``plain`` escaped for HTML text and attribute values;
- ``json_text``: a JSON result that any JSON parser reads: non-finite floats (NaN, Infinity)
  become null, and ``allow_nan=False`` makes sure none is left.

Error and warning lines (``errors.SafeLoraError.one_line``, notices) follow the same rules through
``untrusted.safe_text``, below the display layer, as the library raises them.
"""

from __future__ import annotations

import html as _html
import json
import math
from typing import Any

from rich.style import Style
from rich.text import Text

from safelora_cli.untrusted import printable

NO_NUMBER = "-"


def plain(value: object, limit: int = 80, ascii_only: bool = False) -> str:
    """``value`` as one safe line of at most ``limit`` characters (``untrusted.printable``)."""
    return printable(value, limit, ascii_only)


def cell(value: object, limit: int = 80, style: str | Style | None = None) -> Text:
    """``value`` as a rich ``Text`` (never parsed as markup): a table cell, title or caption."""
    return Text(plain(value, limit), style=style or "", no_wrap=False, end="")


def line(*parts: str | Text) -> Text:
    """Text joined from pieces: ``str`` pieces are the renderer's own words (not data), made
    safe anyway; ``Text`` pieces come from ``cell`` or ``number``."""
    joined = Text(end="")
    for part in parts:
        joined.append(part if isinstance(part, Text) else plain(part, 10_000))
    return joined


def number(value: object, spec: str = ".4g") -> str:
    """A finite int or float formatted with ``spec`` (an int as written with "d"); None "-";
    anything else (a string, a bool, NaN, an int too large for a float) as safe text."""
    if value is None:
        return NO_NUMBER
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return plain(value, 20)
    if isinstance(value, int) and spec == "d":
        return plain(value, 40)
    try:
        as_float = float(value)
    except OverflowError:  # an int past float's range
        return plain(value, 20)
    return format(as_float, spec) if math.isfinite(as_float) else plain(value, 20)


def count(value: object) -> str:
    """An int as written (1,234 with ``,``); anything else as ``number`` shows it."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) < 10**18 else plain(value, 20)
    return number(value)


def html(value: object, limit: int = 300) -> str:
    """``value`` as safe HTML text or attribute value (quotes escaped)."""
    return _html.escape(plain(value, limit), quote=True)


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON's null), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def json_text(value: Any) -> str:
    """A JSON result for stdout (``--json``): indented, ASCII only, every number finite.

    Example:
        >>> json_text({"cosine": float("nan")})
        '{\\n  "cosine": null\\n}\\n'
    """
    return json.dumps(finite(value), indent=2, allow_nan=False) + "\n"

"""Notices: what a user should know about a run that does not stop it (a file not copied, a
REF resolved on the hub, inputs that look like a mistake).

The library never prints: it hands each notice to the caller's ``notify`` callback as it happens
(the CLI prints it on stderr as one ``warning:`` line) and lists it in the report's ``warnings``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

WARNING = "warning"
NOTE = "note"


@dataclass(frozen=True)
class Notice:
    """One notice: a stable ``code`` for scripts ("file-outside-input", ...), a message, and a
    level: a ``warning`` (listed in the report) or a ``note`` (for a person at a terminal)."""

    code: str
    message: str
    level: str = WARNING

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


NotifyFn = Callable[[Notice], None]


@dataclass
class Notices:
    """The notices of one run, passed on to ``notify`` as they come."""

    notify: NotifyFn | None = None
    items: list[Notice] = field(default_factory=list)

    def add(self, code: str, message: str, level: str = WARNING) -> None:
        notice = Notice(code, message, level)
        if notice in self.items:  # the same file seen for each adapter of a batch
            return
        self.items.append(notice)
        if self.notify is not None:
            self.notify(notice)

    def as_list(self) -> list[dict[str, Any]]:
        """The warnings, as the report lists them."""
        return [notice.as_dict() for notice in self.items if notice.level == WARNING]

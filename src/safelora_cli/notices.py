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
    level: a ``warning`` (listed in the report) or a ``note`` (for a person at a terminal).

    ``values`` holds the raw values compared (for the report); ``adapter`` the adapter folder
    a notice is about, so that each report of a batch lists its own (None: the whole run).
    ``logged``: a note that belongs in logs too (what the run did to the disk beside the output:
    an interrupted run's staging removed), printed off a terminal and with --quiet.
    """

    code: str
    message: str
    level: str = WARNING
    values: dict[str, Any] | None = field(default=None, compare=False)
    adapter: str | None = None
    logged: bool = field(default=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.values:
            entry["values"] = self.values
        return entry


NotifyFn = Callable[[Notice], None]


@dataclass
class Notices:
    """The notices of one run, passed on to ``notify`` as they come."""

    notify: NotifyFn | None = None
    items: list[Notice] = field(default_factory=list)
    adapter: str | None = None  # what ``add`` files notices under when not told

    def scoped(self, adapter: str) -> Notices:
        """A view that files its notices under ``adapter``, into the same list."""
        return Notices(self.notify, self.items, adapter)

    def add(
        self,
        code: str,
        message: str,
        level: str = WARNING,
        values: dict[str, Any] | None = None,
        adapter: str | None = None,
        logged: bool = False,
    ) -> None:
        notice = Notice(code, message, level, values, adapter or self.adapter, logged)
        if notice in self.items:  # the same file seen for each adapter of a batch
            return
        self.items.append(notice)
        if self.notify is not None:
            self.notify(notice)

    def as_list(self, adapter: str | None = None) -> list[dict[str, Any]]:
        """The warnings as the report of ``adapter`` lists them: the run's and its own."""
        return [
            notice.as_dict()
            for notice in self.items
            if notice.level == WARNING and notice.adapter in (None, adapter)
        ]

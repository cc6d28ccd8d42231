"""Reclaim: find the staging that interrupted runs left behind (SIGKILL, the OOM killer, a power
loss, a container stopped), and remove it; ``safelora clean`` and every run writing into a folder
call it.

Only safelora's staging folders (``staging.STAGE_PREFIX``) are looked at, never anything else;
each is, by its owner file (``staging.Owner``):

- ``live``: its run holds the lock; left alone;
- ``dead``: made on this machine (``Owner.same_machine``), nobody holds the lock; removed;
- ``other-host``: made on another machine (a shared file system, where the lock may not reach);
  ``unknown``: no readable owner file (an older safelora, a foreign tool's look-alike), or a file
  system without locks; both left alone with a note, unless older than ``STALE_AFTER_DAYS``;
- ``publishing``: dead in the middle of the renames that publish a ``--force`` output: it may hold
  the previous output or the user's files; always left alone, with a note saying where.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safelora_cli.notices import NOTE, Notices
from safelora_cli.output.staging import (
    OWNER_NAME,
    PUBLISHING,
    STAGE_PREFIX,
    STAGED_NAME,
    Owner,
    publish_lock,
    try_lock,
)

STALE_AFTER_DAYS = 7
"""Staging whose state cannot be told here (another host's, or without an owner file) is removed
only once it is this many days old: no run lasts that long, and a shared file system's lock may
not reach the host that holds it."""
DEAD, LIVE, OTHER_HOST, UNKNOWN, INTERRUPTED_PUBLISH = (
    "dead", "live", "other-host", "unknown", "publishing",
)  # fmt: skip
REMOVABLE = frozenset({DEAD})


@dataclass(frozen=True)
class Found:
    """One staging folder: where, its size on disk, what it is, and whether it goes."""

    path: Path
    size: int
    state: str  # DEAD, LIVE, OTHER_HOST, UNKNOWN or INTERRUPTED_PUBLISH
    owner: Owner | None
    age_s: float
    removable: bool

    def as_dict(self) -> dict[str, Any]:
        owner = self.owner
        return {
            "path": str(self.path),
            "bytes": self.size,
            "state": self.state,
            "removable": self.removable,
            "what": owner.what if owner else None,
            "host": owner.host if owner else None,
            "pid": owner.pid if owner else None,
        }


def human_size(size: int) -> str:
    """``12 GB``, ``340 MB``, ``4.0 kB``: decimal units, as ``df -H`` and file managers."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 10 else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def disk_usage(path: Path) -> int:
    """Bytes ``path`` takes on disk (blocks, so sparse files count what they use), not
    following links."""
    total = 0
    stack = [path]
    while stack:
        here = stack.pop()
        try:
            info = os.lstat(here)
        except OSError:
            continue
        total += getattr(info, "st_blocks", 0) * 512 or info.st_size
        if stat.S_ISDIR(info.st_mode):
            try:
                stack.extend(here / name for name in os.listdir(here))
            except OSError:
                continue
    return total


def _candidates(folder: Path) -> Iterator[Path]:
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        path = folder / name
        try:
            if name.startswith(STAGE_PREFIX) and stat.S_ISDIR(os.lstat(path).st_mode):
                yield path
        except OSError:  # removed meanwhile: a run that just finished
            continue


def _classify(path: Path, stack: ExitStack, now: float) -> Found | None:
    """What ``path`` is (None: gone meanwhile); when it is dead, its owner file's lock is taken
    and kept by ``stack`` (nobody else then removes it, or takes it for live)."""
    try:
        age = max(0.0, now - os.lstat(path).st_mtime)
        with os.scandir(path) as entries:
            empty = next(entries, None) is None
    except OSError:
        return None
    owner: Owner | None = None
    state = UNKNOWN
    try:
        fd = os.open(path / OWNER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        fd = -1
    if fd >= 0:
        stack.callback(os.close, fd)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            owner = Owner.parse(os.pread(fd, 64 << 10, 0))
        if owner is not None:
            age = max(0.0, now - owner.started)
            locked = try_lock(fd)
            if locked is False:
                state = LIVE
            elif not owner.same_machine():
                state = OTHER_HOST
            elif locked is None:
                state = UNKNOWN  # a file system without locks
            elif owner.state == PUBLISHING and (path / STAGED_NAME).exists():
                state = INTERRUPTED_PUBLISH
            else:
                state = DEAD
    if state == UNKNOWN and empty:
        state = DEAD  # its run was removing it, or was killed just after making it: nothing in it
    old = age > STALE_AFTER_DAYS * 86400
    removable = state == DEAD or (state in (OTHER_HOST, UNKNOWN) and old)
    return Found(path, disk_usage(path), state, owner, age, removable)


def survey(
    folder: Path, remove: bool = False, notices: Notices | None = None, listing: bool = False
) -> list[Found]:
    """safelora's staging folders in ``folder`` and what each is; with ``remove``, the dead
    ones (and those too old to be alive) are removed, with a note for each, and a note for each
    left alone that is not a live run's.

    Args:
        folder: the folder a run writes into (the parent of its output).
        remove: remove what can be (``clean`` without ``--dry-run``, and every run).
        notices: where the notes go (``note:`` lines on stderr, in logs too).
        listing: the caller lists what is removable itself (``clean``): no note for those, and
            a note for a live run's.
    Returns:
        Every staging folder found, sorted by name.
    Raises:
        OSError: ``folder`` cannot be opened.
    """
    with ExitStack() as locks:
        with publish_lock(folder):
            now = time.time()
            seen = (_classify(path, locks, now) for path in _candidates(folder))
            found = [item for item in seen if item is not None]
        for item in found:
            if remove and item.removable:
                shutil.rmtree(item.path, ignore_errors=True)
            if notices is not None:
                _note(notices, item, remove, listing)
    return found


def reclaim(folder: Path, notices: Notices | None) -> list[Found]:
    """Before a run writes into ``folder``: remove the staging of interrupted runs there, each
    with a note giving the space freed (``survey(remove=True)``); never fails the run."""
    try:
        return survey(folder, remove=True, notices=notices)
    except OSError:  # an unreadable folder: the run's own write will say what is wrong
        return []


def _note(notices: Notices, item: Found, removed: bool, listing: bool) -> None:
    owner = item.owner
    whose = f", pid {owner.pid} on {owner.host}" if owner else ""
    size = human_size(item.size)
    if item.removable:
        if listing or not removed or (item.state == DEAD and owner is None):
            return  # listed by the caller, or an empty folder: nothing worth a line
        what = "an interrupted run's" if item.state == DEAD else "an abandoned"
        message = f"removed {what} staging folder {item.path} ({size} freed{whose})"
    elif item.state == LIVE:
        if not listing:
            return
        message = f"left {item.path} ({size}{whose}): its run is still going"
    elif item.state == INTERRUPTED_PUBLISH:
        target = owner.target if owner else "its output"
        message = (
            f"left {item.path} ({size}{whose}): its run was killed while publishing {target}; "
            "it may hold the previous output or your files: look inside, then remove it"
        )
    else:
        why = "made on another host" if item.state == OTHER_HOST else "whose run cannot be told"
        message = (
            f"left {item.path} ({size}{whose}): {why}; safelora removes it once it is "
            f"{STALE_AFTER_DAYS} days old"
        )
    notices.add("staging", message, level=NOTE, logged=True)

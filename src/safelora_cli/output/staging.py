"""Staging: every output is written in a staging folder beside its target, which says whose it is
and whether that run is still alive.

A staging folder is ``.safelora-tmp-<target name>-<random>`` (the target's name says what it is:
``.safelora-tmp-merged-3f9c…`` for ``-o out/merged``). It holds:

- ``.safelora-owner``: JSON (host, pid, start time, what is staged, target, state, the kernel's
  boot id), locked with ``flock`` for the run's lifetime. The kernel drops the lock when the run
  ends however it ends (SIGKILL, the OOM killer): a lock that can be taken means the run is dead.
  Host and boot id tell a run of this machine (any of its containers) from another machine's on a
  shared file system, whose lock may not reach here; host and pid are for the messages.
- ``new``: what is published (the output folder, or a file: ``--report``, ``--html``, a
  profile), renamed onto the target at the end;
- ``old``, while ``--force`` swaps a folder: the previous output, removed just after.

Folders are created and published under ``publish_lock`` on the parent folder, which
``reclaim.py`` also takes to look: it never sees a staging folder half made or half published by
a live run.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, runs are then told apart by age only
    fcntl = None  # type: ignore[assignment]

STAGE_PREFIX = ".safelora-tmp-"
OWNER_NAME = ".safelora-owner"
STAGED_NAME = "new"
OLD_NAME = "old"
STAGING = "staging"
PUBLISHING = "publishing"
_MAX_OWNER_BYTES = 64 << 10


_NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
"""What ``flock`` answers on a file system that keeps no locks (some network ones)."""


@contextmanager
def publish_lock(parent: Path) -> Iterator[None]:
    """Serialize publishing (and creating, and reclaiming staging) between safelora runs writing
    into the same parent folder (not at all on a file system without locks)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)


@contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM back for a few steps that must not be cut in two (making a staging
    folder and recording it for removal; moving the output into place); yields the signals
    that arrived meanwhile. Outside the main thread (where no handler runs) it holds nothing."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def record(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    # read first: a signal landing between two installs (its KeyboardInterrupt raised before
    # ``signal.signal`` returns the old handler) must still find every handler put back
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for signum in previous:
            signal.signal(signum, record)
        yield caught
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: not installed from Python, nothing to put back
                signal.signal(signum, handler)


def try_lock(fd: int) -> bool | None:
    """Take the exclusive lock on ``fd`` without waiting: True; False when a live run holds it;
    None where the file system keeps no locks (the state cannot be told)."""
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _NO_LOCKS:
            return None
        raise
    return True


def this_host() -> str:
    return socket.gethostname()


def this_boot() -> str:
    """This kernel's boot id: the same for every container of one machine, new at each boot
    ("" where Linux does not tell it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read(64).strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Owner:
    """Who made a staging folder, as its owner file records it."""

    host: str
    pid: int
    started: float  # seconds since the epoch
    what: str  # "output folder", "report", "HTML page", "profile"
    target: str  # the target's name
    state: str = STAGING  # or PUBLISHING: the renames that publish it have begun
    boot: str = ""  # the kernel's boot id (``this_boot``)

    def same_machine(self) -> bool:
        """Made under this kernel (any container of this machine, since its last boot), or on
        a host of this name: there, a lock that can be taken is a dead run's (a reboot ends
        every run)."""
        return (bool(self.boot) and self.boot == this_boot()) or self.host == this_host()

    @staticmethod
    def parse(data: bytes) -> Owner | None:
        """The owner of an owner file's bytes; None when they are not one."""
        try:
            value: Any = json.loads(data.decode("utf-8"))
            owner = Owner(
                str(value["host"]), int(value["pid"]), float(value["started"]),
                str(value["what"]), str(value["target"]), str(value["state"]),
                str(value.get("boot", "")),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None
        return owner

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode("utf-8")


class Staging:
    """One run's staging folder for ``target``: created (and locked) by ``create``, removed by
    ``remove``; ``staged`` is what is published.

    Example:
        >>> stage = Staging(Path("out/merged"), "output folder")
        >>> stage.create(folder=True)       # .safelora-tmp-merged-…/new, owner file locked
        >>> ...                             # write into stage.staged
        >>> os.rename(stage.staged, "out/merged"); stage.remove()
    """

    def __init__(self, target: Path, what: str) -> None:
        self.target = target
        self.what = what
        self.parent = target.resolve().parent
        # named before it exists: an interrupt landing just after mkdir still knows what to remove
        self.path = self.parent / f"{STAGE_PREFIX}{target.name}-{secrets.token_hex(8)}"
        self.staged = self.path / STAGED_NAME
        self.old = self.path / OLD_NAME
        self._fd: int | None = None
        self._made = False
        self._owner = Owner(
            this_host(), os.getpid(), time.time(), what, target.name, STAGING, this_boot()
        )

    def create(self, folder: bool) -> None:
        """Make the staging folder, its locked owner file and (``folder``) the folder staged.

        Raises:
            OSError: the folder cannot be made (FileExistsError included: never one not ours).
        """
        # Ctrl-C or SIGTERM is held back from mkdir until ``_made`` records it (landing between
        # the two, its KeyboardInterrupt would leave the folder behind), then delivered here;
        # one landing as the handlers are put back or the lock let go removes the folder too
        try:
            with publish_lock(self.parent), deferred_signals() as caught:
                self.path.mkdir(mode=0o700)  # private while staged; ``new`` follows the umask
                self._made = True
                try:
                    fd = os.open(self.path / OWNER_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    self._fd = fd
                    try_lock(fd)  # a new file: nobody else can hold it (None: no locks here)
                    os.write(fd, self._owner.encode())
                    if folder:
                        self.staged.mkdir()  # the umask decides the published folder's mode
                except BaseException:
                    self.remove()  # still under the lock: never seen half made
                    raise
            for signum in caught:  # the handlers are back: as if it had landed just now
                signal.raise_signal(signum)
        except BaseException:
            self.remove()  # nothing when the folder was not made (or is gone already)
            raise

    def mark(self, state: str) -> None:
        """Record ``state`` in the owner file (``PUBLISHING`` before the first rename)."""
        if self._fd is None:
            return
        self._owner = Owner(**{**self._owner.__dict__, "state": state})
        data = self._owner.encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def remove(self) -> None:
        """Remove the staging folder, its owner file last (a run looking meanwhile sees it
        locked: live), then let go of the lock; also when a second Ctrl-C or SIGTERM lands
        during removal. Never a folder this object did not make."""
        try:
            self._remove()
        except KeyboardInterrupt:
            self._remove()
            raise
        finally:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

    def _remove(self) -> None:
        if not self._made:
            return
        try:
            entries = [entry.name for entry in os.scandir(self.path)]
        except FileNotFoundError:
            return
        except OSError:
            entries = []
        for name in entries:
            if name != OWNER_NAME:
                path = self.path / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        (self.path / OWNER_NAME).unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            shutil.rmtree(self.path, ignore_errors=True)

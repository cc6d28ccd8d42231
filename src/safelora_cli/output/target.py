"""Target: the one policy for every path safelora writes, checked before any work and again
just before the output is renamed into place.

Every output (``patch --output`` and ``--report``, ``profile --output``, ``show --html``, merged
and full-model outputs, a batch's folders, and any output added later) goes through
``check_target``: the path is absent, or a regular file (``folder=False``) or a folder
(``folder=True``) that the rules allow. A device, FIFO or socket is refused with or without
``--force``, and left as it is: ``--force`` replaces safelora's own files, never a node of the
system (``show r.json --html /dev/null --force`` run as root would otherwise turn /dev/null into a
regular file). ``check_replaceable`` repeats the node check at publish time, for a node that
appeared during the run.

Example:
    >>> check_target(Path("out"), "--output", folder=True, force=False, inputs=[adapter_dir])
    >>> check_target(Path("report.json"), "--report", force=True)
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from safelora_cli.errors import FilesystemError, UsageError

__all__ = ["check_replaceable", "check_target", "node_kind", "resolve_named"]

_NODES = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def node_kind(mode: int) -> str | None:
    """What a special node is ("a character device", ...), or None for a file, folder or link."""
    return next((name for test, name in _NODES if test(mode)), None)


def check_target(
    path: Path,
    flag: str,
    *,
    folder: bool = False,
    force: bool = False,
    inputs: Sequence[Path] = (),
) -> Path:
    """Refuse an output path that would be unsafe to write, before any work is done.

    Args:
        path: where the output goes (need not exist).
        flag: the option that named it (``--output``, ``--report``, ``--html``), for messages.
        folder: the output is a folder (else a file).
        force: allow replacing an existing file, or safelora's files in a non-empty folder.
        inputs: local input folders the output must not be, nor be inside.
    Returns:
        ``path`` resolved.
    Raises:
        FilesystemError: a device, FIFO or socket (even with ``force``); a symlink; a file where
            a folder is due or the reverse; an existing file or non-empty folder without
            ``force``; inside an input; parent folder missing or not writable.
        UsageError: a name the file system cannot hold.
    """
    resolved = resolve_named(path, flag)
    try:
        mode: int | None = os.lstat(path).st_mode
    except OSError:
        mode = None
    if mode is not None:
        _refuse_node(path, flag, mode)
        if stat.S_ISLNK(mode):
            what = "folder" if folder else "file"
            raise FilesystemError(f"{flag} {path}: is a symlink", f"give a real {what} path")
    for source in inputs:
        if resolved == source or source in resolved.parents:
            raise FilesystemError(
                f"{flag} {path}: is inside the input folder {source}",
                "write the output to a new path outside the inputs",
            )
    if mode is not None:
        if folder and not stat.S_ISDIR(mode):
            raise FilesystemError(f"{flag} {path}: exists and is not a folder")
        if not folder and stat.S_ISDIR(mode):
            raise FilesystemError(f"{flag} {path}: is a folder", "give a file path")
        if not force and (not folder or any(path.iterdir())):
            what = "exists and is not empty" if folder else "exists"
            how = "replace safelora's files in it" if folder else "replace it"
            raise FilesystemError(
                f"{flag} {path}: {what}", f"choose a new path, or pass --force to {how}"
            )
    parent = resolved.parent
    if not parent.is_dir():
        raise FilesystemError(f"{flag} {path}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FilesystemError(f"{flag} {path}: cannot write in {parent} (permission denied)")
    return resolved


def check_replaceable(path: Path, flag: str) -> None:
    """Just before ``path`` is replaced: refuse a device, FIFO or socket that appeared there
    during the run (the node is left as it is).

    Raises:
        FilesystemError: ``path`` is such a node.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    _refuse_node(path, flag, mode)


def _refuse_node(path: Path, flag: str, mode: int) -> None:
    kind = node_kind(mode)
    if kind is not None:
        raise FilesystemError(
            f"{flag} {path}: is {kind}, not a file or folder; it was left as it is",
            "give the path of a regular file or folder (--force never replaces a device, FIFO "
            "or socket)",
        )


def resolve_named(path: Path, flag: str) -> Path:
    """``path`` resolved; a name the file system cannot hold is a usage error, not an I/O one."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise UsageError(f"{flag} {path}: the name is too long for the file system") from exc
    return path.resolve()

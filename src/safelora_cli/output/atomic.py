"""Atomic: the low-level pieces that make writing safe: files staged beside their target
(``staging.Staging``, after reclaiming the dead staging there) and renamed into place, interrupts
held back while a folder is being moved, outputs with the modes the umask gives, and input files
copied with their failures told apart from the output's.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from safelora_cli.errors import CorruptFileError
from safelora_cli.notices import Notices
from safelora_cli.output.reclaim import reclaim
from safelora_cli.output.staging import Staging, deferred_signals, publish_lock
from safelora_cli.output.target import check_replaceable

__all__ = ["StagedFile", "copy_input", "deferred_signals", "publish_lock", "save_safetensors",
           "stage_file", "stage_json", "write_json", "write_safetensors", "write_text"]  # fmt: skip
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def copy_input(src: Path, dst: Path) -> None:
    """Copy one input file; a read failure is the input's (exit 3), a write failure the output's."""
    try:
        source = src.open("rb")
    except OSError as exc:
        raise CorruptFileError(f"{src}: cannot read ({exc.strerror})") from exc
    with source, dst.open("wb") as target:
        while True:
            try:
                chunk = source.read(1 << 20)
            except OSError as exc:
                raise CorruptFileError(f"{src}: cannot read ({exc.strerror})") from exc
            if not chunk:
                return
            target.write(chunk)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``os.umask`` sets it
    to read it: a window in which another thread would create files with the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open``: 0o666 less the umask (0o644 under umask 022)."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode a new folder gets from ``mkdir``: 0o777 less the umask (0o755 under 022)."""
    return 0o777 & ~current_umask()


class StagedFile:
    """A file written in its own staging folder beside ``path`` (``staging.Staging``: locked,
    named after ``path``), then renamed over ``path`` by ``publish``; ``discard`` removes it.

    Example:
        >>> staged = StagedFile(Path("report.html"), "--html", "HTML page").create()
        >>> staged.file.write_bytes(page)
        >>> staged.publish()
    """

    def __init__(
        self, path: Path, flag: str = "--output", what: str = "file", notices: Notices | None = None
    ) -> None:
        self.path = path
        self.flag = flag
        self.notices = notices
        self._stage = Staging(path, what)
        self.file = self._stage.staged

    def create(self) -> StagedFile:
        """Reclaim the dead staging beside ``path`` (``reclaim.reclaim``), then stage."""
        reclaim(self._stage.parent, self.notices)
        self._stage.create(folder=False)
        return self

    def check(self) -> None:
        """Refuse to publish over a device, FIFO or socket (``target.check_replaceable``)."""
        check_replaceable(self.path, self.flag)

    def publish(self) -> None:
        """Rename the file over ``path`` (never over a device, FIFO or socket), then remove the
        staging folder; on any failure the staged file goes and ``path`` is untouched."""
        try:
            self.check()
            os.replace(self.file, self.path)
        finally:
            self._stage.remove()

    def discard(self) -> None:
        self._stage.remove()


def stage_file(
    path: Path,
    write: Callable[[BinaryIO], object],
    flag: str = "--output",
    what: str = "file",
    notices: Notices | None = None,
) -> StagedFile:
    """Write a file staged beside ``path`` with ``write`` (synced to disk, with the mode the
    umask gives a new file, as any tool's output); ``publish`` puts it in place."""
    staged = StagedFile(path, flag, what, notices).create()
    try:
        fd = os.open(staged.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        staged.discard()
        raise
    return staged


def stage_json(
    path: Path,
    value: Any,
    flag: str = "--output",
    what: str = "file",
    notices: Notices | None = None,
) -> StagedFile:
    def dump(fh: BinaryIO) -> None:
        text = io.TextIOWrapper(fh, encoding="utf-8", write_through=True)
        json.dump(value, text, indent=2, allow_nan=False)
        text.write("\n")
        text.detach()

    return stage_file(path, dump, flag, what, notices)


def write_text(
    path: Path,
    text: str,
    flag: str = "--output",
    what: str = "file",
    notices: Notices | None = None,
) -> None:
    """Write a text file atomically: staged beside ``path``, then renamed over it; ``flag``
    names the option that gave ``path`` in errors, ``what`` what it is (the staging's owner
    file says so); dead staging beside ``path`` is reclaimed first, with notes to ``notices``."""
    stage_file(path, lambda fh: fh.write(text.encode("utf-8")), flag, what, notices).publish()


def write_json(
    path: Path,
    value: Any,
    flag: str = "--output",
    what: str = "file",
    notices: Notices | None = None,
) -> None:
    """Write JSON atomically, as ``write_text``."""
    stage_json(path, value, flag, what, notices).publish()


def save_safetensors(
    save: Callable[..., None],
    path: Path,
    tensors: Mapping[str, Any],
    metadata: dict[str, str] | None,
) -> None:
    """Write a safetensors file with ``save`` (``safetensors.torch.save_file``), with its I/O
    failures (disk full) raised as the OSError they are: safetensors reports them as its own
    error type, with the OS error number in the message; the file gets the mode the umask
    gives (safetensors makes it 0600)."""
    try:
        save(dict(tensors), str(path), metadata=metadata)
    except Exception as exc:
        found = _OS_ERROR.search(str(exc))
        if found is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), str(path)) from exc
    os.chmod(path, file_mode())  # safetensors makes its files 0600 whatever the umask


def write_safetensors(
    save: Callable[..., None],
    path: Path,
    tensors: Mapping[str, Any],
    metadata: dict[str, str] | None,
    flag: str = "--output",
    what: str = "file",
    notices: Notices | None = None,
) -> None:
    """Write a safetensors file atomically (``save_safetensors`` into a ``StagedFile``, synced,
    renamed over ``path``): it appears complete under its name or not at all.

    Raises:
        OSError: writing failed (disk full included); nothing is left behind.
        FilesystemError: a device, FIFO or socket appeared at ``path`` (left as it is).
    """
    staged = stage_file(path, lambda fh: None, flag, what, notices)
    try:
        save_safetensors(save, staged.file, tensors, metadata)
        with open(staged.file, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        staged.discard()
        raise
    staged.publish()
    fsync_folder(path.resolve().parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

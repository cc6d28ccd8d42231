"""Atomic: the low-level pieces that make writing safe: files written beside their target and
renamed into place, publishing serialized between runs, interrupts held back while a folder is
being moved, and input files copied with their failures told apart from the output's.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

from safelora_cli.errors import CorruptFileError
from safelora_cli.output.target import check_replaceable

_OS_ERROR = re.compile(r"\(os error (\d+)\)")

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: publishing is then not serialized between runs
    fcntl = None  # type: ignore[assignment]


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


@contextmanager
def publish_lock(parent: Path) -> Iterator[None]:
    """Serialize publishing between safelora runs writing into the same parent folder."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM back while the output is being moved into place (a few renames), so
    that an interrupt never leaves it half-swapped; yields the signals that arrived meanwhile."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def record(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    previous = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def remove_tree(stage: Path) -> None:
    """Remove the staging folder, even when a second Ctrl-C or SIGTERM lands during removal."""
    try:
        shutil.rmtree(stage, ignore_errors=True)
    except KeyboardInterrupt:
        shutil.rmtree(stage, ignore_errors=True)
        raise


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


def stage_file(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a temporary file beside ``path`` with ``write`` (synced to disk, with the mode the
    umask gives a new file, as any tool's output) and return it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes it 0600 whatever the umask
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def stage_json(path: Path, value: Any) -> Path:
    def dump(fh: BinaryIO) -> None:
        text = io.TextIOWrapper(fh, encoding="utf-8", write_through=True)
        json.dump(value, text, indent=2, allow_nan=False)
        text.write("\n")
        text.detach()

    return stage_file(path, dump)


def replace_file(tmp: Path, path: Path, flag: str = "--output") -> None:
    """Rename the staged ``tmp`` over ``path``, unless a device, FIFO or socket appeared there
    during the run (``target.check_replaceable``); ``tmp`` is removed on any failure."""
    try:
        check_replaceable(path, flag)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, flag: str = "--output") -> None:
    """Write a text file atomically: to a temporary file beside ``path``, then renamed over it;
    ``flag`` names the option that gave ``path`` in errors."""
    replace_file(stage_file(path, lambda fh: fh.write(text.encode("utf-8"))), path, flag)


def write_json(path: Path, value: Any, flag: str = "--output") -> None:
    """Write JSON atomically, as ``write_text``."""
    replace_file(stage_json(path, value), path, flag)


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
) -> None:
    """Write a safetensors file atomically (``save_safetensors`` into a temporary file beside
    ``path``, synced, renamed over it): it appears complete under its name or not at all.

    Raises:
        OSError: writing failed (disk full included); nothing is left behind.
        FilesystemError: a device, FIFO or socket appeared at ``path`` (left as it is).
    """
    parent = path.resolve().parent
    tmp = stage_file(path, lambda fh: None)
    try:
        save_safetensors(save, tmp, tensors, metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        replace_file(tmp, path, flag)
        fsync_folder(parent)
    finally:  # on success tmp was renamed away; on any failure (Ctrl-C included) it goes
        tmp.unlink(missing_ok=True)


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

"""Writer: the output folder, staged beside its target and moved into place only when complete.

A failure, Ctrl-C or SIGTERM at any point removes the staging folder: the target is either
untouched or complete. ``--force`` replaces only the files safelora writes; anything else already
in the folder is left alone.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from safelora_cli.errors import FilesystemError, NumericalError

STAGE_PREFIX = ".safelora-tmp-"
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def check_output(target: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output that would be unsafe to write, before any work is done.

    Args:
        target: the output folder (need not exist).
        inputs: local input folders the output must not be, nor be inside.
        force: allow replacing safelora's files in an existing non-empty folder.
    Raises:
        FilesystemError: symlink, not a folder, exists and not empty without ``force``, inside an
            input, parent missing or not writable.
    """
    if target.is_symlink():
        raise FilesystemError(f"--output {target}: is a symlink", "give a real folder path")
    resolved = target.resolve()
    for folder in inputs:
        if resolved == folder or folder in resolved.parents:
            raise FilesystemError(
                f"--output {target}: is inside the input folder {folder}",
                "write the patched adapter to a new folder",
            )
    if target.exists():
        if not target.is_dir():
            raise FilesystemError(f"--output {target}: exists and is not a folder")
        if any(target.iterdir()) and not force:
            raise FilesystemError(
                f"--output {target}: exists and is not empty",
                "choose a new folder, or pass --force to replace safelora's files in it",
            )
    parent = resolved.parent
    if not parent.is_dir():
        raise FilesystemError(f"--output {target}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FilesystemError(f"--output {target}: cannot write in {parent} (permission denied)")


def check_report_path(path: Path, inputs: list[Path]) -> None:
    """Refuse a ``--report`` path inside an input, behind a symlink, or with no parent folder."""
    if path.is_symlink() or path.is_dir():
        raise FilesystemError(f"--report {path}: is a symlink or a folder", "give a file path")
    resolved = path.resolve()
    if any(folder in resolved.parents for folder in inputs):
        raise FilesystemError(f"--report {path}: is inside an input folder")
    if not os.access(resolved.parent, os.W_OK | os.X_OK):
        raise FilesystemError(f"--report {path}: cannot write in {resolved.parent}")


@contextmanager
def staged_output(target: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success move its files into ``target``.

    On any exception (KeyboardInterrupt included) the staging folder is removed and the
    exception propagates; ``target`` is not touched.
    """
    parent = target.resolve().parent
    # named before it exists: an interrupt landing just after mkdir still knows what to remove
    stage = parent / f"{STAGE_PREFIX}{target.name}-{secrets.token_hex(8)}"
    try:
        stage.mkdir(mode=0o700)
    except OSError as exc:  # FileExistsError included: never remove a folder that is not ours
        raise _fs_error(target, exc) from exc
    except BaseException:
        _remove(stage)
        raise
    try:
        yield stage
        _publish(stage, target)
    except OSError as exc:
        raise _fs_error(target, exc) from exc
    finally:
        _remove(stage)


def _remove(stage: Path) -> None:
    """Remove the staging folder, even when a second Ctrl-C or SIGTERM lands during removal."""
    try:
        shutil.rmtree(stage, ignore_errors=True)
    except KeyboardInterrupt:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _publish(stage: Path, target: Path) -> None:
    for path in stage.iterdir():
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        stage.rename(target)
        return
    # --force on a non-empty folder: replace only our files, the report last.
    names = sorted(p.name for p in stage.iterdir())
    names.sort(key=lambda n: n.endswith("report.json"))
    for name in names:
        os.replace(stage / name, target / name)


def _fs_error(target: Path, exc: OSError) -> FilesystemError:
    if exc.errno == errno.ENOSPC:
        return FilesystemError(
            f"--output {target}: disk full while writing; nothing was left behind",
            "free some space and run again",
        )
    return FilesystemError(f"--output {target}: {exc.strerror or exc} ({exc.filename or target})")


def write_adapter_weights(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str] | None,
) -> None:
    """Write the adapter's safetensors file; tensor data is written byte for byte as given.

    Args:
        path: destination file.
        tensors: name -> tensor, in the adapter's own dtypes.
        metadata: the original file's ``__metadata__`` (kept as is).
    """
    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except Exception as exc:  # safetensors reports I/O failures (disk full) as its own error
        found = _OS_ERROR.search(str(exc))
        if found is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), str(path)) from exc


def cast_checked(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a projected tensor back to the adapter's dtype and refuse NaN/Inf (fp16 overflow)."""
    out = tensor.to("cpu", dtype).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise NumericalError(
            f"projected {name} is not finite in {str(dtype).removeprefix('torch.')}",
            "the adapter's dtype cannot hold the projected values; convert the adapter to fp32",
        )
    return out


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically: to a temporary file beside ``path``, then renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(value, fh, indent=2, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

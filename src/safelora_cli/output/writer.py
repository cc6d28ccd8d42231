"""Writer: owns the output folder, from the checks before any work to the atomic publish.

``OutputFolder`` stages every file in a folder beside the target and publishes it only when the
``with`` block ends without an exception; on any failure, Ctrl-C or SIGTERM included, the staging
folder is removed and the target is untouched. Publishing is atomic against other runs: without
``--force`` the staging folder is renamed onto the target, which fails if the target appeared
(non-empty) during the run; with ``--force`` the old folder is swapped out in one step under a lock,
so the target never holds a mix of two runs' files (files safelora did not write are carried over).
Which input files travel into an output is ``sidecars.py``'s policy; the low-level pieces (atomic
files, the publish lock, held-back interrupts) are ``atomic.py``'s; the staging folder (locked, so
that an interrupted run's is told from a live one's) is ``staging.py``'s, and reclaiming what
killed runs left ``reclaim.py``'s.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file

from safelora_cli.errors import (
    CorruptFileError,
    FilesystemError,
    Interrupted,
    NumericalError,
    SafeLoraError,
    UsageError,
)
from safelora_cli.inputs.adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter
from safelora_cli.inputs.loader import TensorReader
from safelora_cli.inputs.smallfiles import load_json
from safelora_cli.notices import Notices
from safelora_cli.output.atomic import (
    StagedFile,
    copy_input,
    deferred_signals,
    publish_lock,
    save_safetensors,
    stage_json,
    write_json,
    write_text,
)
from safelora_cli.output.reclaim import reclaim
from safelora_cli.output.report import REPORT_NAME
from safelora_cli.output.sidecars import plan_sidecars
from safelora_cli.output.staging import PUBLISHING, STAGE_PREFIX, Staging
from safelora_cli.output.target import check_replaceable, check_target, resolve_named

__all__ = ["STAGE_PREFIX", "OutputFolder", "cast_checked", "check_output", "check_report_path",
           "output_error", "write_adapter", "write_json", "write_text"]  # fmt: skip


def check_output(target: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output folder that would be unsafe to write, before any work is done
    (``target.check_target``: the one policy every output goes through).

    Args:
        target: the output folder (need not exist).
        inputs: local input folders the output must not be, nor be inside.
        force: allow replacing safelora's files in an existing non-empty folder.
    Raises:
        FilesystemError: a device, FIFO or socket (even with ``force``), symlink, not a folder,
            exists and not empty without ``force``, inside an input, parent missing or not
            writable.
    """
    check_target(target, "--output", folder=True, force=force, inputs=inputs)


def check_report_path(path: Path, inputs: list[Path], output: Path, force: bool) -> None:
    """Refuse a ``--report`` path before any work: inside the output or an input, an existing
    file without ``force``, a device, FIFO or socket, behind a symlink, or with no writable
    parent folder."""
    resolved = resolve_named(path, "--report")
    target = resolve_named(output, "--output")
    if resolved == target or target in resolved.parents:
        raise UsageError(
            f"--report {path}: is inside the output folder {output}",
            "leave --report out to write the report there, or give a path outside it",
        )
    check_target(path, "--report", force=force, inputs=inputs)


class OutputFolder(AbstractContextManager["OutputFolder"]):
    """A new output folder: written in ``path`` (the staging folder), published on success.

    Example:
        >>> with OutputFolder(Path("out"), force=False) as out:
        ...     out.save_tensors("adapter_model.safetensors", tensors)
        ...     out.write_report(report)
    """

    def __init__(
        self, target: Path, *, force: bool = False, notices: Notices | None = None
    ) -> None:
        self.target = target
        self.force = force
        self.notices = notices  # where reclaiming dead staging says what it removed
        self._stage = Staging(target, "output folder")
        self.parent = self._stage.parent
        self.path = self._stage.staged  # .safelora-tmp-<name>-<random>/new
        self._attached: list[StagedFile] = []  # files outside the folder (--report)

    def __enter__(self) -> OutputFolder:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.publish()
            return
        self.discard()
        if isinstance(exc, OSError):  # writing a file failed: disk full, permissions
            raise output_error(self.target, exc) from exc

    def open(self) -> None:
        """Reclaim the staging interrupted runs left beside the target, then create this run's
        staging folder (``staging.Staging``)."""
        reclaim(self.parent, self.notices)
        try:
            self._stage.create(folder=True)
        except OSError as exc:  # FileExistsError included: never remove a folder that is not ours
            raise output_error(self.target, exc) from exc

    def discard(self) -> None:
        """Remove everything staged; the target and the attached files' paths are untouched."""
        self._stage.remove()
        for staged in self._attached:
            staged.discard()

    def publish(self) -> None:
        """Move the staged folder (and the attached files) into place; discard it on failure."""
        try:
            self._publish()
        except OSError as error:
            raise output_error(self.target, error) from error
        finally:
            self.discard()

    def attach_json(self, path: Path, value: Any) -> None:
        """Stage a JSON file that lives outside the folder (``--report``): it is published with
        the folder, just after it, and never without it."""
        self._attached.append(stage_json(path, value, "--report", "report", self.notices))

    def save_tensors(
        self, name: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None
    ) -> None:
        """Write a safetensors file; tensor data is written byte for byte as given."""
        save_safetensors(save_file, self.path / name, tensors, metadata)

    def copy_files(
        self,
        source: Path,
        inside: Path,
        notices: Notices,
        skip: frozenset[str] = frozenset(),
        trusted: frozenset[str] = frozenset(),
        model: bool = False,
    ) -> None:
        """Copy ``source``'s sidecar files into the output (``sidecars.plan_sidecars``); each
        file left out that a user might expect is a notice."""
        keep, refused = plan_sidecars(source, inside, skip, trusted, model)
        for refusal in refused:
            notices.add(refusal.code, f"{refusal.path}: not copied: {refusal.reason}")
        for src in keep:
            copy_input(src, self.path / src.name)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write one file of the output."""
        (self.path / name).write_bytes(data)

    def write_report(self, report: dict[str, Any]) -> None:
        """Write the report last, listing every file of the output (``files``)."""
        report["files"] = sorted({p.name for p in self.path.iterdir()} | {REPORT_NAME})
        with (self.path / REPORT_NAME).open("w", encoding="utf-8") as fh:  # staged already
            json.dump(report, fh, indent=2, allow_nan=False)
            fh.write("\n")

    def _publish(self) -> None:
        for path in self.path.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        published = False
        try:
            with publish_lock(self.parent), deferred_signals() as caught:
                check_replaceable(self.target, "--output")
                for staged in self._attached:  # never the folder without its report
                    staged.check()
                self._stage.mark(PUBLISHING)  # killed from here on: reclaim leaves it to the user
                if self.force and _has_entries(self.target):
                    self._swap()
                else:
                    self._rename()
                for staged in self._attached:
                    staged.publish()
                published = True
        except KeyboardInterrupt:  # landed as the handlers came back or the lock was let go
            if not published:
                raise
            caught = [0]  # after the renames: the output is in place, and complete
        if caught:
            raise Interrupted(
                f"interrupted just after {self.target} was written; it is complete",
                "run again with --force if in doubt",
            )

    def _rename(self) -> None:
        try:
            os.rename(self.path, self.target)  # onto a missing or empty folder only
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise FilesystemError(
                f"--output {self.target}: appeared during the run and is not empty; "
                "it was left as it is and nothing was written",
                "another run may be writing there; choose a new folder, or pass --force",
            ) from exc

    def _swap(self) -> None:
        """Carry over the files of the old folder that safelora did not write, then swap."""
        ours = set(_previous_files(self.target)) | {p.name for p in self.path.iterdir()}
        carried = [entry.name for entry in self.target.iterdir() if entry.name not in ours]
        old = self._stage.old  # inside the staging folder: removed with it
        moved: list[str] = []
        try:
            for name in carried:
                os.rename(self.target / name, self.path / name)
                moved.append(name)
            os.rename(self.target, old)
        except BaseException:
            for name in moved:  # the user's files go back where they were
                os.rename(self.path / name, self.target / name)
            raise
        try:
            os.rename(self.path, self.target)
        except BaseException:
            os.rename(old, self.target)
            for name in moved:
                os.rename(self.path / name, self.target / name)
            raise


def _has_entries(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _previous_files(target: Path) -> list[str]:
    """The files an earlier safelora run wrote into ``target``, from its report's ``files``."""
    if not (target / REPORT_NAME).is_file():
        return []
    try:
        files = load_json(target / REPORT_NAME, "earlier report").get("files")
    except SafeLoraError:
        return []
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []


def output_error(target: Path, exc: OSError) -> FilesystemError:
    """The error for an OSError met while writing the output ``target`` (a folder or a file)."""
    if exc.errno == errno.ENOSPC:
        return FilesystemError(
            f"--output {target}: disk full while writing; nothing was left behind",
            "free some space and run again",
        )
    return FilesystemError(f"--output {target}: {exc.strerror or exc} ({exc.filename or target})")


def write_adapter(
    out: OutputFolder,
    adapter: Adapter,
    replaced: Mapping[str, torch.Tensor],
    inside: Path,
    notices: Notices,
    skip: frozenset[str] = frozenset(),
) -> None:
    """Write a patched adapter: its tensors with ``replaced`` ones swapped in (every other one
    byte-identical), ``adapter_config.json`` and the folder's other files but ``skip``.

    Args:
        out: the output being written.
        adapter: the input adapter.
        replaced: tensor name -> new value, already in the adapter's dtype (``cast_checked``).
        inside: the folder the copied files must live in (``ResolvedInput.trusted_root``);
            adapter_config.json, validated when the adapter was loaded, is copied wherever it is.
        notices: where a file not copied is reported.
    Raises:
        CorruptFileError: the adapter's config disappeared during the run, or an input file
            cannot be read.
    """
    with TensorReader() as reader:
        tensors = {
            name: replaced[name] if name in replaced else reader.read(info)
            for name, info in adapter.weights.tensors.items()
        }
        out.save_tensors(WEIGHTS_NAME, tensors, adapter.weights.metadata)
    ours = frozenset({WEIGHTS_NAME}) | skip
    out.copy_files(adapter.root, inside, notices, ours, trusted=frozenset({CONFIG_NAME}))
    if not (out.path / CONFIG_NAME).is_file():
        raise CorruptFileError(f"{adapter.root / CONFIG_NAME}: removed during the run")


def cast_checked(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a projected tensor back to the adapter's dtype and refuse NaN/Inf (fp16 overflow)."""
    out = tensor.to("cpu", dtype).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise NumericalError(
            f"projected {name} is not finite in {str(dtype).removeprefix('torch.')}",
            "the adapter's dtype cannot hold the projected values; convert the adapter to fp32",
        )
    return out

"""Shards: write a model folder as a copy of a source model with some tensors' values replaced.

A replaced tensor keeps its dtype and shape, so every output shard is the source shard with those
byte ranges overwritten: headers, untouched tensors, shard names, the index and the sidecar files
(config, generation config, tokenizer) are the source's, byte for byte. A shard is copied (by the
kernel, ``shutil.copyfile``) when its first tensor is replaced, and each replacement is written as
soon as it is given, so memory stays O(one tensor) whatever the model size.

The caller owns the folder: normally a staging folder it publishes atomically once ``finalize``
has returned. Sidecar policy: regular files at the top of the source folder, never a weight file
of another format (pickles such as ``*.bin`` would be stale, unpatched copies that some loaders
prefer), never a hidden file, never a symlink that leads out of the model folder (a hub snapshot's
links into its own cached repository excepted).
"""

from __future__ import annotations

import os
import shutil
import stat
from io import FileIO
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import torch

from safelora_cli.errors import CorruptFileError
from safelora_cli.index import PICKLE_SUFFIXES, TensorIndex, TensorInfo
from safelora_cli.loader import TORCH_DTYPES
from safelora_cli.report import REPORT_NAME

# Weights in other formats than the shards: copying them would publish stale, unpatched weights.
STALE_WEIGHT_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors", ".gguf", ".onnx", ".msgpack", ".h5")


def sidecar_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files of a model folder to copy beside its weights, and those refused, with why.

    Args:
        root: the model folder (its shards and index are handled by the caller).
    Returns:
        (files to copy, sorted; (file, reason) for each file left out that a user might expect).
    """
    keep: list[Path] = []
    refused: list[tuple[Path, str]] = []
    inside = [root.resolve()]
    if root.parent.name == "snapshots":  # hub cache: snapshots/<commit>/x -> ../../blobs/<hash>
        inside.append(root.parent.parent.resolve())
    for path in sorted(root.iterdir()):
        name = path.name
        if name.startswith(".") or name == REPORT_NAME:
            continue
        if name.endswith(STALE_WEIGHT_SUFFIXES):
            if not name.endswith(".safetensors"):
                refused.append((path, "weights in another format would be stale"))
            continue
        reason = _refusal(path, inside)
        if reason is None:
            keep.append(path)
        elif reason != "a folder":
            refused.append((path, reason))
    return keep, refused


def _refusal(path: Path, inside: list[Path]) -> str | None:
    try:
        mode = path.stat().st_mode  # follows links: a FIFO or device is never opened
    except OSError:
        return "a broken link" if path.is_symlink() else "unreadable"
    if stat.S_ISDIR(mode):
        return "a folder"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if path.is_symlink():
        real = path.resolve()
        if not any(real.is_relative_to(folder) for folder in inside):
            return "a symlink to outside the model folder"
    return None


class ShardWriter:
    """Writes ``output`` as a copy of the model ``source`` indexes, with replaced tensors.

    Example:
        >>> with ShardWriter(index_folder(aligned), stage) as writer:
        ...     for info, tensor in merged_tensors(plan, reader.read):
        ...         writer.replace(info, tensor)
        ...     written = writer.finalize()
    After an exception inside the ``with`` block (or from ``replace``), ``finalize`` refuses and
    the files written so far are removed.
    """

    def __init__(self, source: TensorIndex, output: Path) -> None:
        self.source = source
        self.output = output
        self.replaced: set[str] = set()
        self.refused: list[tuple[Path, str]] = []
        self._handles: dict[Path, FileIO] = {}
        self._sizes = {info.path: info.file_size for info in source.tensors.values()}
        self._created: list[Path] = []
        self._state = "open"  # "open" -> "finalized" | "failed"

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._fail()
        self._close()

    def replace(self, info: TensorInfo, tensor: torch.Tensor) -> None:
        """Write ``tensor`` over the bytes of the source tensor ``info``, now.

        Args:
            info: a tensor of the source index.
            tensor: its new value: same dtype and shape (a CPU copy is made if needed).
        Raises:
            ValueError: ``info`` is not in the source, was replaced already, or ``tensor`` does
                not have its dtype and shape (a caller's bug, not a user's input).
            CorruptFileError: the source shard changed since it was indexed.
            OSError: writing failed (disk full included); the writer is then failed.
        """
        self._check_open()
        dtype = TORCH_DTYPES.get(info.dtype)
        if self.source.get(info.name) != info or info.name in self.replaced:
            raise ValueError(f"{info.name}: not a tensor of {self.source.root}, or replaced twice")
        if dtype is None or tensor.dtype != dtype or tuple(tensor.shape) != info.shape:
            raise ValueError(
                f"{info.name}: got {tensor.dtype} {list(tensor.shape)}, "
                f"the file holds {info.dtype} {list(info.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        try:
            handle = self._shard(info.path)
            handle.seek(info.offset)
            view = memoryview(cast(Any, data.numpy()))
            while view:  # unbuffered: on disk (in the page cache) when replace returns
                view = view[handle.write(view) :]
        except BaseException:
            self._fail()
            raise
        self.replaced.add(info.name)

    def finalize(self) -> list[Path]:
        """Copy every shard not touched and the sidecar files; check every shard's size.

        Returns:
            The files written, shards first. ``refused`` then lists sidecars left out, and why.
        Raises:
            RuntimeError: after an exception, or a second time.
        """
        self._check_open()
        try:
            for path in self.source.files:
                self._shard(path)
            self._close()
            for path in self.source.files:
                self._check_size(path, self.output / path.name)
            files, self.refused = sidecar_files(self.source.root)
            for path in files:
                self._copy(path, self.output / path.name)
        except BaseException:
            self._fail()
            raise
        self._state = "finalized"
        return list(self._created)

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"ShardWriter for {self.output} is {self._state}")

    def _shard(self, source: Path) -> FileIO:
        handle = self._handles.get(source)
        if handle is None:
            target = self.output / source.name
            self._copy(source, target)
            self._check_size(source, target)
            handle = self._handles[source] = target.open("r+b", buffering=0)
        return handle

    def _copy(self, source: Path, target: Path) -> None:
        self._created.append(target)  # before copying: a partial copy is removed too
        shutil.copyfile(source, target)

    def _check_size(self, source: Path, target: Path) -> None:
        expected = self._sizes.get(source)  # a shard that holds no tensor has nothing to check
        size = os.stat(target).st_size
        if expected is not None and size != expected:
            raise CorruptFileError(
                f"{source}: {size} bytes now, {expected} when indexed; the file changed during "
                "the run",
                "run again once it is stable",
            )

    def _close(self) -> None:
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.close()

    def _fail(self) -> None:
        self._state = "failed"
        try:
            self._close()
        finally:
            for path in self._created:
                path.unlink(missing_ok=True)

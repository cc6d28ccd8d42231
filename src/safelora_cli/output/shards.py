"""Shards: write a model folder as a copy of a source model with some tensors' values replaced.

A replaced tensor keeps its dtype and shape, so every output shard is the source shard with those
byte ranges overwritten: headers, untouched tensors, shard names, the index and the sidecar files
(config, generation config, tokenizer) are the source's, byte for byte. Each replacement is
written as soon as it is given (memory stays O(one tensor) whatever the model size), after the
source bytes before it, copied by the kernel (``os.copy_file_range``; through a buffer where the
kernel refuses, e.g. to another file system); ``finalize`` copies what is left. Replacements given
in offset order (as the plans give them) make every shard one sequential write in which every
byte is written once. (Copying whole shards first and overwriting them wrote
a merged 22-layer model's bytes twice: 5.3 s of a 13 s merge; writing replacements into a sparse
file first was slower than sequential writes on the machine measured.)

The caller owns the folder: normally a staging folder (``writer.OutputFolder``) it publishes
atomically once ``finalize`` has returned, and into which it copies the sidecar files (config,
generation config, tokenizer, the index) under ``sidecars.py``'s policy.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from io import FileIO
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import torch

from safelora_cli.errors import CorruptFileError
from safelora_cli.inputs.index import TensorIndex, TensorInfo
from safelora_cli.inputs.loader import TORCH_DTYPES


class ShardWriter:
    """Writes ``output`` as a copy of the model ``source`` indexes, with replaced tensors.

    Example:
        >>> with ShardWriter(index_folder(aligned), stage) as writer:
        ...     for info, tensor in merged_tensors(plan, reader.read):
        ...         writer.replace(info, tensor)
        ...     shards = writer.finalize()
    After an exception inside the ``with`` block (or from ``replace``), ``finalize`` refuses and
    the files written so far are removed.
    """

    def __init__(self, source: TensorIndex, output: Path) -> None:
        self.source = source
        self.output = output
        self.replaced: set[str] = set()
        self._handles: dict[Path, FileIO] = {}
        self._sizes = {info.path: info.file_size for info in source.tensors.values()}
        self._sources: dict[Path, FileIO] = {}
        self._written: dict[Path, list[tuple[int, int]]] = {}  # per source shard: (start, stop)
        self._ends: dict[Path, int] = {}  # per source shard: where the output file ends
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
            handle, source = self._shard(info.path)
            end, stop = self._ends[info.path], info.offset + info.nbytes
            if info.offset > end:  # the source's bytes up to this tensor first: no hole
                copy_range(source, handle, end, info.offset)
                self._written[info.path].append((end, info.offset))
            view = memoryview(cast(Any, data.numpy()))
            offset = info.offset
            while view:  # unbuffered: on disk (in the page cache) when replace returns
                count = os.pwrite(handle.fileno(), view, offset)
                view, offset = view[count:], offset + count
        except BaseException:
            self._fail()
            raise
        self.replaced.add(info.name)
        self._written[info.path].append((info.offset, stop))
        self._ends[info.path] = max(end, stop)

    def finalize(self) -> list[Path]:
        """Copy what no replacement covered, from every shard; check every shard's size.

        Returns:
            The shards written.
        Raises:
            RuntimeError: after an exception, or a second time.
        """
        self._check_open()
        try:
            for path in self.source.files:
                handle, source = self._shard(path)
                for start, stop in _gaps(self._written[path], os.fstat(source.fileno()).st_size):
                    copy_range(source, handle, start, stop)
            self._close()
            for path in self.source.files:
                self._check_size(path, self.output / path.name)
        except BaseException:
            self._fail()
            raise
        self._state = "finalized"
        return list(self._created)

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"ShardWriter for {self.output} is {self._state}")

    def _shard(self, source: Path) -> tuple[FileIO, FileIO]:
        """(the output shard of ``source``, open for writing; ``source``, open for reading)."""
        handle = self._handles.get(source)
        if handle is None:
            target = self.output / source.name
            self._check_size(source, source)  # changed since it was indexed: refused now
            self._sources[source] = source.open("rb", buffering=0)
            self._created.append(target)  # before writing: a partial shard is removed too
            handle = self._handles[source] = target.open("xb", buffering=0)
            self._written[source], self._ends[source] = [], 0
        return handle, self._sources[source]

    def _check_size(self, source: Path, target: Path) -> None:
        """``target`` (the source itself, or its output copy) must have the size ``source`` had
        when it was indexed."""
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
        sources, self._sources = self._sources, {}
        for handle in [*handles.values(), *sources.values()]:
            handle.close()

    def _fail(self) -> None:
        self._state = "failed"
        try:
            self._close()
        finally:
            for path in self._created:
                path.unlink(missing_ok=True)


def _gaps(written: list[tuple[int, int]], size: int) -> Iterator[tuple[int, int]]:
    """The byte ranges of [0, size) that no (start, stop) of ``written`` covers."""
    position = 0
    for start, stop in sorted(written):
        if start > position:
            yield position, start
        position = max(position, stop)
    if position < size:
        yield position, size


_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                             errno.ENOTSUP, errno.EBADF, errno.EPERM})  # fmt: skip
"""What ``copy_file_range`` answers where the kernel will not copy between these two files:
another file system (EXDEV, before Linux 5.3 and again between file system types since 5.18),
no such call (ENOSYS: old kernels, seccomp filters), file systems that cannot (EINVAL,
EOPNOTSUPP: some FUSE and network file systems; EBADF, EPERM: some sandboxes)."""
_BUFFER = 1 << 24


def copy_range(source: FileIO, target: FileIO, start: int, stop: int) -> None:
    """Copy bytes [start, stop) of ``source`` to the same offsets of ``target``, in the kernel
    where it can (``os.copy_file_range``), else through a buffer (another file system: the
    kernel refuses, see ``_NO_KERNEL_COPY``); the bytes written are the same either way.

    Raises:
        CorruptFileError: ``source`` ends early (it changed since it was indexed).
        OSError: writing failed (disk full included).
    """
    position = start
    kernel = hasattr(os, "copy_file_range")
    while position < stop:
        count = min(stop - position, 1 << 30)
        done = -1
        if kernel:
            try:
                done = os.copy_file_range(source.fileno(), target.fileno(), count, position,
                                          position)  # fmt: skip
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False
        if done < 0:
            done = _copy_buffered(source, target, position, min(count, _BUFFER))
        if done == 0:
            raise CorruptFileError(
                f"{source.name}: ends at byte {position}, {stop} expected; the file changed "
                "during the run",
                "run again once it is stable",
            )
        position += done


def _copy_buffered(source: FileIO, target: FileIO, position: int, count: int) -> int:
    """Copy up to ``count`` bytes at ``position`` through memory; returns how many (0: the
    source ends there)."""
    data = os.pread(source.fileno(), count, position)
    view, offset = memoryview(data), position
    while view:
        written = os.pwrite(target.fileno(), view, offset)
        view, offset = view[written:], offset + written
    return len(data)

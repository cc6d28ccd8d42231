"""Loader: read indexed tensors, keeping one handle open per file.

``read`` returns a view on safetensors' memory map (small adapter tensors). ``read_into`` copies a
model weight's bytes into a caller's reusable buffer with plain reads: no page of the model stays
mapped into the process, so memory does not grow with the model. Reads are cheapest in
shard/offset order (the pipeline asks in that order).
"""

from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager
from io import FileIO
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import torch
from safetensors import safe_open

from safelora_cli.errors import CorruptFileError
from safelora_cli.inputs.index import TensorInfo

TORCH_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


_SEEKING = threading.Lock()  # where there is no pread: one seek-and-read at a time


def _read_at(fh: FileIO, target: memoryview, offset: int) -> int:
    """Read into ``target`` from ``offset`` without moving a position other threads share."""
    if hasattr(os, "preadv"):
        return os.preadv(fh.fileno(), [target], offset)
    with _SEEKING:  # pragma: no cover (Windows)
        fh.seek(offset)
        return fh.readinto(target) or 0


class TensorReader(AbstractContextManager["TensorReader"]):
    """Reads tensors described by ``TensorInfo`` from their files, with plain reads.

    Example:
        >>> with TensorReader() as reader:
        ...     weight = reader.read(index.tensors["model.layers.0.self_attn.q_proj.weight"])
    """

    def __init__(self) -> None:
        self._handles: dict[Path, Any] = {}
        self._files: dict[Path, FileIO] = {}
        self._opening = threading.Lock()  # ``read`` is called from the stream's worker threads

    def read_into(self, info: TensorInfo, raw: torch.Tensor) -> torch.Tensor:
        """Read the tensor ``info`` describes into ``raw`` and return it as stored; safe to call
        from several threads, each with its own ``raw``.

        Args:
            info: a float tensor from a validated index (offsets checked against the file size).
            raw: flat uint8 CPU buffer of at least ``info.nbytes`` (pinned for CUDA copies).
        Returns:
            A view on ``raw`` with the stored dtype and shape.
        Raises:
            CorruptFileError: the file ends early (changed since it was indexed).
        """
        target = memoryview(cast(Any, raw[: info.nbytes].numpy()))  # numpy shares the memory
        try:
            fh = self._file(info)
            done = 0
            while done < info.nbytes:
                count = _read_at(fh, target[done:], info.offset + done)
                if not count:
                    break
                done += count
        except OSError as exc:
            raise CorruptFileError(
                f"{info.path}: cannot read tensor {info.name!r} ({exc.strerror})",
                "was the file changed or removed during the run?",
            ) from exc
        if done != info.nbytes:
            raise CorruptFileError(
                f"{info.path}: tensor {info.name!r} ends early ({done} of {info.nbytes} bytes); "
                "the file changed during the run",
                "run again once it is stable",
            )
        return raw[: info.nbytes].view(TORCH_DTYPES[info.dtype]).view(info.shape)

    def read(self, info: TensorInfo) -> torch.Tensor:
        """Return the tensor ``info`` describes, as stored (dtype and shape of the file).

        Float tensors are plain reads into a new buffer: no page of the file stays mapped, so a
        pass over a whole model (a merge) does not hold it in memory. Other dtypes (``inspect``
        on anything) go through safetensors. Safe to call from several threads.
        """
        if info.dtype in TORCH_DTYPES:
            return self.read_into(info, torch.empty(info.nbytes, dtype=torch.uint8))
        with self._opening:
            handle = self._handles.get(info.path)
            if handle is None:
                handle = self._open(info.path)
        try:
            tensor: torch.Tensor = handle.get_tensor(info.name)
        except Exception as exc:  # safetensors raises its own untyped errors
            raise CorruptFileError(
                f"{info.path}: cannot read tensor {info.name!r} ({exc})",
                "was the file changed during the run?",
            ) from exc
        # the file is opened after it was indexed: it may have been replaced in between
        # (packed dtypes such as F4 come back with another shape: compare their byte count)
        expected = TORCH_DTYPES.get(info.dtype)
        if tensor.numel() * tensor.element_size() != info.nbytes or (
            expected is not None and (tensor.dtype, tuple(tensor.shape)) != (expected, info.shape)
        ):
            raise CorruptFileError(
                f"{info.path}: tensor {info.name!r} is {list(tensor.shape)} "
                f"{str(tensor.dtype).removeprefix('torch.')} now, {list(info.shape)} {info.dtype} "
                "when indexed",
                "the file was changed during the run; run again once it is stable",
            )
        return tensor

    def _file(self, info: TensorInfo) -> FileIO:
        """The open file of ``info``, its size checked against the index when first opened."""
        with self._opening:
            fh = self._files.get(info.path)
            if fh is None:
                fh = info.path.open("rb", buffering=0)
                if os.fstat(fh.fileno()).st_size != info.file_size:
                    fh.close()
                    raise CorruptFileError(
                        f"{info.path}: size changed since it was indexed; the file changed "
                        "during the run",
                        "run again once it is stable",
                    )
                self._files[info.path] = fh
            return fh

    def _open(self, path: Path) -> Any:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:
            raise CorruptFileError(
                f"{path}: cannot open ({exc})", "was the file changed or removed during the run?"
            ) from exc
        self._handles[path] = handle
        return handle

    def close(self) -> None:
        self._handles.clear()
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

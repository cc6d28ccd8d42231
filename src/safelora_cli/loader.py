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
from safelora_cli.index import TensorInfo

TORCH_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


class TensorReader(AbstractContextManager["TensorReader"]):
    """Reads tensors described by ``TensorInfo`` from their files, memory-mapped.

    Example:
        >>> with TensorReader() as reader:
        ...     weight = reader.read(index.tensors["model.layers.0.self_attn.q_proj.weight"])
    """

    def __init__(self) -> None:
        self._handles: dict[Path, Any] = {}
        self._files: dict[Path, FileIO] = {}
        self._opening = threading.Lock()  # ``read`` is called from the stream's worker threads

    def read_into(self, info: TensorInfo, raw: torch.Tensor) -> torch.Tensor:
        """Read the tensor ``info`` describes into ``raw`` and return it as stored.

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
            fh = self._files.get(info.path)
            if fh is None:
                fh = self._files[info.path] = info.path.open("rb", buffering=0)
                if os.fstat(fh.fileno()).st_size != info.file_size:
                    raise CorruptFileError(
                        f"{info.path}: size changed since it was indexed; the file changed "
                        "during the run",
                        "run again once it is stable",
                    )
            fh.seek(info.offset)
            done = 0
            while done < info.nbytes:
                count = fh.readinto(target[done:])
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

        Safe to call from several threads (``read_into`` is not: it seeks a shared file).
        """
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

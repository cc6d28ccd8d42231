"""Loader: read indexed tensors memory-mapped, keeping one handle open per file.

Reads are cheapest in shard/offset order (the pipeline asks in that order). A tensor returned here
is a view on the memory map: no copy is made until the caller converts it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

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

    def read(self, info: TensorInfo) -> torch.Tensor:
        """Return the tensor ``info`` describes, as stored (dtype and shape of the file)."""
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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

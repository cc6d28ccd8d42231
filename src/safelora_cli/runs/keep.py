"""Where a run keeps the projected B's until it writes them.

Selection needs every module's score before it can say which B's are replaced (number mode), so
each projected B must outlive the pass over the source. ``InMemory`` keeps them (one adapter:
its own size); ``Spill`` writes them as they come to an unnamed scratch file beside the output
and reads back the ones written (a batch: memory stays that of one adapter's weights in flight,
whatever the batch size; the file is gone when closed, or when the process ends); ``Drop`` keeps
none (``score`` writes nothing). The scores themselves (cosines, norms) are always kept.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, cast

import torch

from safelora_cli.errors import FilesystemError
from safelora_cli.math.projection import ModuleScore


class Keep(Protocol):
    """Holds projected B's by (adapter index, module name), safe to call from worker threads."""

    def put(self, index: int, module: str, score: ModuleScore) -> ModuleScore:
        """Take ``score``'s projected B; returns the score to keep for selection and report."""
        ...

    def take(self, index: int, module: str) -> torch.Tensor | None:
        """The projected B put for the module (float32, (out, r)); None if it had none."""
        ...

    def close(self) -> None: ...


class InMemory:
    """Every projected B stays in the score that holds it."""

    def __init__(self) -> None:
        self._kept: dict[tuple[int, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    def put(self, index: int, module: str, score: ModuleScore) -> ModuleScore:
        if score.projected_b is not None:
            with self._lock:
                self._kept[(index, module)] = score.projected_b
        return score

    def take(self, index: int, module: str) -> torch.Tensor | None:
        return self._kept.get((index, module))

    def close(self) -> None:
        self._kept.clear()


class Drop:
    """No projected B is kept (nothing will be written)."""

    def put(self, index: int, module: str, score: ModuleScore) -> ModuleScore:
        return replace(score, projected_b=None)

    def take(self, index: int, module: str) -> torch.Tensor | None:
        return None

    def close(self) -> None:
        pass


class Spill:
    """Projected B's written to an unnamed scratch file in ``folder`` as they come.

    Example:
        >>> with Spill(output_dir.parent) as keep:
        ...     score = keep.put(0, "model.layers.0.self_attn.q_proj", score)
        ...     b = keep.take(0, "model.layers.0.self_attn.q_proj")
    """

    def __init__(self, folder: Path) -> None:
        try:
            self._file = tempfile.TemporaryFile(dir=folder, prefix=".safelora-spill-")
        except OSError as exc:
            raise FilesystemError(
                f"{folder}: cannot write a scratch file ({exc.strerror})"
            ) from exc
        self._fd = self._file.fileno()
        self._where: dict[tuple[int, str], tuple[int, tuple[int, ...]]] = {}
        self._end = 0
        self._lock = threading.Lock()
        self.folder = folder

    def __enter__(self) -> Spill:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def put(self, index: int, module: str, score: ModuleScore) -> ModuleScore:
        projected = score.projected_b
        if projected is None:
            return score
        data = projected.detach().to("cpu", torch.float32).contiguous()
        nbytes = data.numel() * 4
        with self._lock:
            offset, self._end = self._end, self._end + nbytes
            self._where[(index, module)] = (offset, tuple(data.shape))
        self._write(data, offset)
        return replace(score, projected_b=None)

    def take(self, index: int, module: str) -> torch.Tensor | None:
        found = self._where.get((index, module))
        if found is None:
            return None
        offset, shape = found
        out = torch.empty(shape, dtype=torch.float32)
        view = memoryview(cast(Any, out.numpy())).cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise FilesystemError(f"{self.folder}: the scratch file was cut short")
            done += got
        return out

    def _write(self, data: torch.Tensor, offset: int) -> None:
        view = memoryview(cast(Any, data.numpy())).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as exc:
            raise FilesystemError(
                f"{self.folder}: cannot write the scratch file ({exc.strerror})",
                "free some space and run again",
            ) from exc

    def close(self) -> None:
        self._file.close()

    @property
    def nbytes(self) -> int:
        """Bytes written so far."""
        return self._end

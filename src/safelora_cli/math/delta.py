"""Delta: a weight update kept as two factors, X = left @ right, formed one row block at a time.

Both ways a weight changes here are products that are never stored whole: Safe LoRA's P D for a
full fine-tune (``full.py``) and PEFT's s · B A for a merged adapter (``merge.py``). A row block of
X is one GEMM, so ``W + X`` is written straight into the output dtype with O(one weight) memory.
Pure torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from safelora_cli.errors import NumericalError

# A block of 4 Mi float32 (16 MiB): 2048 rows of a 2048-wide weight, 744 of a 5632-wide one.
# Blocked, P D with its statistics ran within the noise of the unblocked product on 2 CPU
# cores (bench/full_projection.py), and the scratch is small beside one weight.
BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Factored:
    """X = left @ right, never built whole.

    ``left``: (rows, m), ``right``: (m, cols), float32, on one device.
    """

    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def T(self) -> Factored:
        """Xᵀ = rightᵀ leftᵀ (views, no copy): the update in a transposed storage layout."""
        return Factored(self.right.T, self.left.T)

    def row_blocks(self, buffer: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (first row, X[rows]) for consecutive row blocks of about ``BLOCK_ELEMENTS``.

        Args:
            buffer: optional float32 scratch of at least one block, reused for every block
                (each yielded block is valid until the next one is requested).
        """
        rows, cols = self.shape
        step = max(1, min(rows, BLOCK_ELEMENTS // max(1, cols)))
        if buffer is None:
            buffer = torch.empty(step * cols, dtype=torch.float32, device=self.left.device)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            out = buffer[: (stop - start) * cols].view(stop - start, cols)
            yield start, torch.mm(self.left[start:stop], self.right, out=out)


def concat(deltas: Sequence[Factored]) -> Factored:
    """Σ L_i R_i as one product [L_1 … L_n] [R_1; …; R_n] (all of one shape and device)."""
    if len(deltas) == 1:
        return deltas[0]
    return Factored(
        torch.cat([d.left for d in deltas], dim=1), torch.cat([d.right for d in deltas], dim=0)
    )


def add_delta(weight: torch.Tensor, delta: Factored, dtype: torch.dtype, name: str) -> torch.Tensor:
    """W + X in float32, cast to ``dtype`` on the CPU, refusing any value the cast cannot hold.

    Args:
        weight: W, 2-D, any float dtype, any device; never written.
        delta: X, of W's shape (in W's storage layout).
        dtype: the output dtype (the model's, so the tensor fits its byte range in the file).
        name: the tensor's name, for the error.
    Returns:
        A new contiguous CPU tensor of ``dtype`` and W's shape.
    Raises:
        NumericalError: NaN or Inf in the result (an fp16 overflow, or a non-finite input).
    """
    if tuple(weight.shape) != delta.shape:
        raise ValueError(f"{name}: update {list(delta.shape)} for a {list(weight.shape)} weight")
    out = torch.empty(weight.shape, dtype=dtype)
    device = delta.left.device
    limit = finite_limit(dtype)
    bad = torch.zeros((), dtype=torch.bool, device=device)  # one sync, at the end
    for start, block in delta.row_blocks():
        stop = start + block.shape[0]
        block.add_(weight[start:stop].to(device, torch.float32, non_blocking=True))
        # one float32 reduction instead of isfinite over the cast (2.2 s of a 22-layer merge);
        # NaN fails both comparisons
        low, high = torch.aminmax(block)
        bad |= ~((low > -limit) & (high < limit))
        out[start:stop].copy_(block)  # cast to dtype
    if bool(bad):
        raise_overflow(name, dtype)
    return out


def finite_limit(dtype: torch.dtype) -> float:
    """The least magnitude that rounds to ±Inf when cast to ``dtype`` (round to nearest even:
    max + half an ulp of max, e.g. 65520 for float16); Inf for float32 and float64 (from
    float32 values)."""
    info = torch.finfo(dtype)
    ulp = info.eps * info.max / (2.0 - info.eps)  # the spacing of the top binade
    limit = info.max + ulp / 2.0
    return limit if dtype not in (torch.float32, torch.float64) else float("inf")


def cast_finite(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``tensor`` cast to ``dtype`` on the CPU (contiguous), refusing NaN/Inf in the result."""
    out = tensor.to("cpu", dtype).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise_overflow(name, dtype)
    return out


def raise_overflow(name: str, dtype: torch.dtype) -> None:
    """Raise the NumericalError for a value ``dtype`` cannot hold (exit 5)."""
    short = str(dtype).removeprefix("torch.")
    raise NumericalError(
        f"{name}: the patched values are not finite in {short}",
        f"a value overflows {short} (or an input holds NaN/Inf); convert the model to "
        "float32 or bfloat16 first",
    )

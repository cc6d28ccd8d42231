"""Projection: the Safe LoRA math on one module, in factored form. Pure torch, no I/O.

Shapes: V (out, in), B = lora_B (out, r), A = lora_A (r, in). The out x out projector and the
out x in update B A are never built:

    Ĉ B = V (Vᵀ B) / ‖V‖_F                       (paper projection)
    G = A Aᵀ,  ⟨P B A, B A⟩ = Σ ((P B)ᵀ B) ∘ G,   ‖X A‖² = Σ (Xᵀ X) ∘ G   (G is symmetric)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ZERO_V = "base and aligned identical"
ZERO_DELTA = "LoRA delta is zero"


@dataclass(frozen=True)
class ModuleScore:
    """Everything Safe LoRA knows about one module before selection.

    ``projected_b`` is P B in float32, (out, r); None when the module is skipped.
    ``distance`` is ‖B − P B‖_F, from which the report's Pdst follows.
    """

    cosine: float | None
    projected_b: torch.Tensor | None
    v_norm: float
    b_norm: float
    projected_b_norm: float
    distance: float
    skipped: str | None = None


def alignment_matrix(
    w_base: torch.Tensor, w_aligned: torch.Tensor, device: torch.device, transpose: bool = False
) -> torch.Tensor:
    """V = W_aligned − W_base in float32 on ``device``, whatever the stored dtype.

    The subtraction is done in float32 (never bf16/fp16, where the small difference cancels), into
    one fresh buffer: the inputs may be read-only memory maps and are never written.

    Args:
        w_base, w_aligned: (out, in), or (in, out) when ``transpose`` (fan_in_fan_out).
    Returns:
        V, (out, in), float32.
    """
    v = torch.empty(w_aligned.shape, dtype=torch.float32, device=device)
    v.copy_(w_aligned.to(device, non_blocking=True))
    v.sub_(w_base.to(device, non_blocking=True))
    return v.T if transpose else v


def paper_project(v: torch.Tensor, b: torch.Tensor, v_norm: float) -> torch.Tensor:
    """Ĉ B = V (Vᵀ B) / ‖V‖_F, the paper's (and the official code's) projection.

    Args:
        v: (out, in) float32; b: (out, r) float32; v_norm: ‖V‖_F > 0.
    Returns:
        (out, r) float32.
    """
    return (v @ (v.T @ b)).div_(v_norm)


def factored_cosine(pb: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[float, float]:
    """cos(P B A, B A) over the flattened (out, in) matrices, and ‖B A‖_F, via r x r Grams.

    Computed in float64 (the inputs are skinny, so this is cheap).

    Args:
        pb: P B, (out, r); b: B, (out, r); a: A, (r, in).
    Returns:
        (cosine, ‖B A‖_F); the cosine is 0 when P B A = 0.
    """
    pb64, b64, a64 = pb.double(), b.double(), a.double()
    gram = a64 @ a64.T
    inner = float(((pb64.T @ b64) * gram).sum())
    ba_sq = float(((b64.T @ b64) * gram).sum())
    pba_sq = float(((pb64.T @ pb64) * gram).sum())
    if pba_sq <= 0.0 or ba_sq <= 0.0:
        return 0.0, math.sqrt(max(ba_sq, 0.0))
    return max(-1.0, min(1.0, inner / math.sqrt(ba_sq * pba_sq))), math.sqrt(ba_sq)


def score_module(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> ModuleScore:
    """Score one module with the paper projection.

    Args:
        v: V, (out, in) float32; a: lora_A, (r, in); b: lora_B, (out, r), any float dtype, on
            the same device as ``v``.
    Returns:
        The score; ``skipped`` says why when V = 0 or B A = 0 (the cosine is then undefined).
        A non-finite ``v_norm`` means V (so a weight) holds NaN or Inf: the caller must check.
    """
    b32, a32 = b.float(), a.float()
    v_norm = float(torch.linalg.vector_norm(v))
    b_norm = float(torch.linalg.vector_norm(b32))
    if not math.isfinite(v_norm) or v_norm == 0.0:
        reason = ZERO_V if v_norm == 0.0 else None
        return ModuleScore(None, None, v_norm, b_norm, b_norm, 0.0, reason)
    pb = paper_project(v, b32, v_norm)
    cosine, ba_norm = factored_cosine(pb, b32, a32)
    if ba_norm == 0.0:
        return ModuleScore(None, None, v_norm, b_norm, b_norm, 0.0, ZERO_DELTA)
    return ModuleScore(
        cosine=cosine,
        projected_b=pb,
        v_norm=v_norm,
        b_norm=b_norm,
        projected_b_norm=float(torch.linalg.vector_norm(pb)),
        distance=float(torch.linalg.vector_norm(b32 - pb)),
    )

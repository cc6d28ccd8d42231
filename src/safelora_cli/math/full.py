"""Full fine-tunes: Safe LoRA on D = W_ft − W_aligned in place of B A. Pure torch, no I/O.

Shapes: V = W_aligned − W_base and D = W_ft − W_aligned, both (out, in); for a weight stored
(in, out) (GPT-2's Conv1D) the caller passes ``.T`` views, as for adapters, and writes ``pd.T``.

    paper:     P D = Ĉ D = V Vᵀ D / ‖V‖_F
    subspace:  P D = U_k U_kᵀ D                       (U_k from projection.subspace_basis)
    s = cos(P D, D)  over the flattened matrices;    W_out = W_aligned + P D  (selected weights)

P D is kept as two factors (``delta.Factored``) and formed a row block at a time, both to score it
and to write W_out, so memory stays O(one weight): V, D, the smaller factor and one block.

Cost. The paper product is two GEMMs of out·in·min(out, in) multiply-adds each, in the cheaper
association: (V Vᵀ) D when out < in (the out x out Gram), else V (Vᵀ D) (the in x in one). The
other association does max/min times the work (2.75x for TinyLlama's 2048 x 5632 MLP weights;
2.1x to 3.2x slower when measured on 2 CPU cores: bench/full_projection.py). Subspace costs about
2·out·in·k plus the SVD.
"""

from __future__ import annotations

import math

import torch

from safelora_cli.math.delta import Factored, add_delta
from safelora_cli.math.projection import ModuleScore, alignment_matrix_into, subspace_basis
from safelora_cli.math.reasons import UNCHANGED, ZERO_V
from safelora_cli.settings import Projection, ProjectionSpec

__all__ = ["UNCHANGED", "merged_weight", "project_delta", "score_delta", "score_projection"]


def weight_delta_into(
    w_aligned: torch.Tensor, w_ft: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """D = W_ft − W_aligned into ``out`` (float32, converted before subtracting), and ‖D‖_F.

    ``projection.alignment_matrix_into`` with the fine-tune as the later model: same buffers,
    same blocked single pass; see there for ``out`` and ``scratch``.
    """
    return alignment_matrix_into(w_aligned, w_ft, out, scratch)


def project_delta(
    v: torch.Tensor, d: torch.Tensor, spec: ProjectionSpec, v_norm: float
) -> tuple[Factored, int | None, float | None]:
    """P D as factors, in the cheaper association.

    Args:
        v: V, (out, in) float32; d: D, (out, in) float32, same device; v_norm: ‖V‖_F > 0.
        spec: paper (Ĉ) or subspace (U_k U_kᵀ with k from rank or energy).
    Returns:
        (P D as ``Factored``; its right factor may be ``d`` itself, so it is valid while ``d``
        is; the subspace rank k and captured energy, or None for paper).
    """
    if v.shape != d.shape:
        raise ValueError(f"V {list(v.shape)} and D {list(d.shape)} differ in shape")
    if spec.kind is Projection.SUBSPACE:
        u, captured = subspace_basis(v, v_norm, spec.rank, spec.energy)
        return Factored(u, u.T @ d), u.shape[1], captured
    out, inp = v.shape
    if out < inp:
        return Factored((v @ v.T).div_(v_norm), d), None, None
    return Factored(v, (v.T @ d).div_(v_norm)), None, None


def _block_stats(pd: Factored, d: torch.Tensor) -> tuple[float, float, float]:
    """(⟨P D, D⟩, ‖P D‖², ‖D − P D‖²), one row block of P D at a time, summed in float64."""
    sums = torch.zeros(3, dtype=torch.float64, device=d.device)  # one sync, at the end
    for start, block in pd.row_blocks():
        rows = d[start : start + block.shape[0]].reshape(-1)
        flat = block.view(-1)
        sums[0] += torch.dot(flat, rows)
        # vector_norm's reduction is vectorized and cascaded: faster and closer than dot here
        sums[1] += torch.linalg.vector_norm(flat).double() ** 2
        flat.sub_(rows)  # the block is ours: it becomes P D − D
        sums[2] += torch.linalg.vector_norm(flat).double() ** 2
    inner, pd_sq, dist_sq = sums.tolist()
    return inner, pd_sq, dist_sq


def score_delta(
    v: torch.Tensor,
    d: torch.Tensor,
    spec: ProjectionSpec | None = None,
    v_norm: float | None = None,
    d_norm: float | None = None,
) -> tuple[ModuleScore, Factored | None]:
    """Score one fine-tuned weight: cos(P D, D), and P D for writing W_out if it is selected.

    Args:
        v: V, (out, in) float32; d: D, (out, in) float32, on the same device.
        spec: the projector (None: paper).
        v_norm, d_norm: ‖V‖_F and ‖D‖_F when already known (``alignment_matrix_into`` and
            ``weight_delta_into`` return them).
    Returns:
        (score, P D). The score reads as for an adapter module, with D in B A's place:
        ``b_norm`` is ‖D‖_F, ``projected_b_norm`` ‖P D‖_F, ``distance`` ‖D − P D‖_F;
        ``projected_b`` is None (P D is weight-sized: it is the second item, valid while
        ``v`` and ``d`` are). A weight with D = 0 or V = 0 is skipped with the reason, and
        P D is None. A non-finite ``v_norm`` or ``b_norm`` means a weight holds NaN or Inf:
        the caller must check and name it.
    Example:
        >>> score, pd = score_delta(v, d, ProjectionSpec())
        >>> w_out = merged_weight(w_aligned, pd, torch.bfloat16, name) if pd is not None else None
    """
    if v_norm is None:
        v_norm = float(torch.linalg.vector_norm(v))
    if d_norm is None:
        d_norm = float(torch.linalg.vector_norm(d))
    if not (math.isfinite(v_norm) and math.isfinite(d_norm)):
        return ModuleScore(None, None, v_norm, d_norm, d_norm, 0.0), None
    for norm, reason in ((d_norm, UNCHANGED), (v_norm, ZERO_V)):
        if norm == 0.0:
            return ModuleScore(None, None, v_norm, d_norm, d_norm, 0.0, reason), None
    pd, k, captured = project_delta(v, d, spec or ProjectionSpec(), v_norm)
    return score_projection(pd, d, v_norm, d_norm, k, captured), pd


def score_projection(
    pd: Factored,
    d: torch.Tensor,
    v_norm: float,
    d_norm: float,
    subspace_rank: int | None = None,
    captured_energy: float | None = None,
) -> ModuleScore:
    """The score of a P D given as factors, whatever built it (``project_delta``, or a profile:
    ``Factored(U_k Σ_k² / ‖V‖_F, U_kᵀ D)``). One pass of row blocks; ``d_norm`` > 0.

    Returns:
        The score (see ``score_delta``), cosine 0 when P D = 0.
    """
    inner, pd_sq, dist_sq = _block_stats(pd, d)
    cosine = 0.0 if pd_sq <= 0.0 else max(-1.0, min(1.0, inner / (math.sqrt(pd_sq) * d_norm)))
    return ModuleScore(
        cosine=cosine,
        projected_b=None,
        v_norm=v_norm,
        b_norm=d_norm,
        projected_b_norm=math.sqrt(pd_sq),
        distance=math.sqrt(max(dist_sq, 0.0)),
        subspace_rank=subspace_rank,
        captured_energy=captured_energy,
    )


def merged_weight(
    w_aligned: torch.Tensor, pd: Factored, dtype: torch.dtype, name: str
) -> torch.Tensor:
    """W_out = W_aligned + P D, summed in float32 and cast to the fine-tune's ``dtype``.

    Args:
        w_aligned: the aligned weight as stored (any float dtype and device).
        pd: P D in the same layout (``pd.T`` for a weight stored (in, out)).
        dtype: the fine-tune's dtype for this weight (the output keeps its byte range).
        name: the weight's name, for the error.
    Returns:
        A contiguous CPU tensor of ``dtype``, ready for ``shards.ShardWriter.replace``.
    Raises:
        NumericalError: a value ``dtype`` cannot hold (exit 5).
    """
    return add_delta(w_aligned, pd, dtype, name)

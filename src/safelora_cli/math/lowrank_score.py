"""Scoring one module from a profile entry instead of V. Pure torch, no I/O.

Shapes: A = lora_A (r, in), B = lora_B (out, r), the entry's Û (out, k) and ŝ (k,).

    paper:     Ĉ_k B = Û diag(ŝ²) Ûᵀ B / ν, with a bound on |cosine − exact cosine|
    subspace:  U_j U_jᵀ B for j ≤ k (``--rank j``, or the smallest j whose ŝ² reach ``--energy``)

The bound's derivation is in ``safelora_cli.math.certificate``. An entry stored whole is scored by
``projection.score_module`` on its V, exactly as the model pair would be.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import replace

import torch

from safelora_cli.errors import IncompatibleInputError
from safelora_cli.math.delta import Factored
from safelora_cli.math.full import score_delta, score_projection
from safelora_cli.math.lowrank import WHOLE, ZERO, LowRank
from safelora_cli.math.projection import (
    ENERGY_TOLERANCE,
    ModuleScore,
    factored_cosine,
    score_module,
)
from safelora_cli.math.reasons import UNCHANGED, ZERO_DELTA, ZERO_V
from safelora_cli.settings import Projection, ProjectionSpec

PAPER_SPEC = ProjectionSpec()
DELTA_ROUNDING = 1e-5
"""Added to a full fine-tune's bound: its cosine is summed over out x in float32 products
(``full.score_projection``), good to about this; an adapter's is summed in float64."""


def score_entry(
    entry: LowRank,
    a: torch.Tensor,
    b: torch.Tensor,
    spec: ProjectionSpec = PAPER_SPEC,
    module: str = "",
) -> ModuleScore:
    """Score one module from its profile entry: project B, and the cosine between P B A and B A.

    Args:
        entry: the weight's profile entry, in the module's (out, in) orientation.
        a: lora_A, (r, in); b: lora_B, (out, r); any float dtype, same device.
        spec: the projector. Subspace ranks and energies must be within what the entry stores.
        module: the module's name, for error messages.
    Returns:
        The score, with ``profile_rank`` and, in paper mode, ``cosine_bound``.
    Raises:
        IncompatibleInputError: a subspace rank or energy beyond the stored rank.
    """
    b32 = b.float()
    b_norm = float(torch.linalg.vector_norm(b32))
    if entry.kind == ZERO:
        return ModuleScore(None, None, 0.0, b_norm, b_norm, 0.0, ZERO_V, profile_rank=0)
    if entry.kind == WHOLE:
        assert entry.v is not None
        score = score_module(entry.v.to(b.device), a, b, spec, entry.v_norm)
        bound = None if spec.kind is Projection.SUBSPACE or score.cosine is None else 0.0
        return replace(score, profile_rank=entry.rank, cosine_bound=bound)
    u, s = _factors(entry, b.device)
    captured, k, bound = None, None, None
    if spec.kind is Projection.SUBSPACE:
        k, captured = subspace_rank(entry, spec, module)
        uk = u[:, :k]
        pb = uk @ (uk.T @ b.double())
    else:
        pb, bound = _paper(entry, u, s, a.double(), b.double())
    cosine, ba_norm = factored_cosine(pb, b32, a.float())
    if ba_norm == 0.0:
        return ModuleScore(None, None, entry.v_norm, b_norm, b_norm, 0.0, ZERO_DELTA, k, captured)
    pb32 = pb.float()
    return ModuleScore(
        cosine=cosine,
        projected_b=pb32,
        v_norm=entry.v_norm,
        b_norm=b_norm,
        projected_b_norm=float(torch.linalg.vector_norm(pb32)),
        distance=float(torch.linalg.vector_norm(b32 - pb32)),
        subspace_rank=k,
        captured_energy=captured,
        profile_rank=entry.rank,
        cosine_bound=bound,
    )


def _factors(entry: LowRank, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    assert entry.u is not None
    assert entry.s is not None
    return entry.u.to(device, torch.float64), entry.s.to(device, torch.float64)


def subspace_rank(entry: LowRank, spec: ProjectionSpec, module: str = "") -> tuple[int, float]:
    """j for ``spec`` (its ``rank``, or the smallest j whose ŝ² reach its ``energy``) and the
    share of ‖V‖²_F the top j hold.

    Raises:
        IncompatibleInputError: j (or the energy) is beyond the entry's stored rank k.
    """
    assert entry.s is not None
    k = entry.rank
    cumulative = torch.cumsum(entry.s.double() ** 2, 0) / entry.v_norm**2
    where = module or "a module"
    if spec.rank is not None:
        if spec.rank > k and k < min(entry.shape):
            raise IncompatibleInputError(
                f"--rank {spec.rank}: the profile stores rank {k} for {where}",
                f"use --rank {k} or less, or build the profile with --rank {spec.rank}",
            )
        j = min(spec.rank, k)
    else:
        assert spec.energy is not None
        reached = torch.nonzero(cumulative >= spec.energy - ENERGY_TOLERANCE)
        if not len(reached):
            raise IncompatibleInputError(
                f"--energy {spec.energy}: the profile stores rank {k} for {where}, "
                f"which holds {float(cumulative[-1]):.4f} of ‖V‖²",
                "lower --energy, or build the profile with a higher --rank or --max-rank",
            )
        j = int(reached[0]) + 1
    return j, min(1.0, float(cumulative[j - 1]))


def _paper(
    entry: LowRank, u: torch.Tensor, s: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """(Ĉ_k B, the bound on |cosine − exact cosine|), float64; norms through small Grams.

    Args:
        u: Û (out, k); s: ŝ (k,); a: A (r, in); b: B (out, r).
    Returns:
        The bound is sqrt(2 − 2 sqrt(1 − δ²)) with δ = β / ‖M̂ B A‖_F (``math.certificate``);
        2 when δ ≥ 1 or M̂ B A = 0 (nothing can be said).
    """
    ub = u.T @ b  # Ûᵀ B (k, r)
    w = (s**2).unsqueeze(1) * ub  # diag(ŝ²) Ûᵀ B: M̂ B = Û w
    pb = (u @ w).div_(entry.v_norm)
    gram, gamma = a @ a.T, u.T @ u  # G = A Aᵀ (r, r); Γ = ÛᵀÛ (k, k), I up to rounding
    y_sq = _weighted(b.T @ b, gram)  # ‖Y‖² with Y = B A
    inside_sq = _weighted(ub.T @ torch.linalg.solve(gamma, ub), gram)  # ‖P Y‖²
    mhat_sq = _weighted(w.T @ gamma @ w, gram)  # ‖M̂ Y‖²
    return pb, _bound(entry, y_sq, inside_sq, mhat_sq)


def _bound(entry: LowRank, y_sq: float, inside_sq: float, mhat_sq: float) -> float:
    """sqrt(2 − 2 sqrt(1 − δ²)) with δ = β / ‖M̂ Y‖_F (``certificate``), from ‖Y‖², ‖P Y‖² and
    ‖M̂ Y‖²; 2 when δ ≥ 1 or M̂ Y = 0 (nothing can be said)."""
    # ‖Q Y‖² as a difference: allow for its rounding (float64, far below this)
    y_p = math.sqrt(inside_sq)
    y_q = math.sqrt(max(0.0, y_sq - inside_sq) + 1e-12 * y_sq)
    cert = entry.certificate
    f, c, t = cert.ritz, cert.cross, cert.tail
    beta = math.hypot(f * y_p + c * y_q, c * y_p + t * y_q)
    if mhat_sq <= 0.0 or beta * beta >= mhat_sq:
        return 2.0
    delta_sq = beta * beta / mhat_sq
    return math.sqrt(max(0.0, 2.0 - 2.0 * math.sqrt(1.0 - delta_sq)))


def score_delta_entry(
    entry: LowRank,
    d: torch.Tensor,
    spec: ProjectionSpec = PAPER_SPEC,
    d_norm: float | None = None,
    module: str = "",
) -> tuple[ModuleScore, Factored | None]:
    """Score a full fine-tune's D = W_ft − W_aligned from the weight's profile entry.

    The same as ``full.score_delta`` with V's entry in place of V: subspace exactly within the
    stored rank; paper mode P D = Û diag(ŝ²) Ûᵀ D / ν with ``cosine_bound`` (Y = D in the
    certificate's notation).

    Args:
        entry: the weight's entry, in the module's (out, in) orientation; d: D, (out, in) float32.
    Returns:
        (the score, P D as factors, or None when skipped), as ``full.score_delta``.
    """
    if d_norm is None:
        d_norm = float(torch.linalg.vector_norm(d))
    if entry.kind == WHOLE:
        assert entry.v is not None
        score, pd = score_delta(entry.v.to(d.device), d, spec, entry.v_norm, d_norm)
        bound = None if spec.kind is Projection.SUBSPACE or score.cosine is None else 0.0
        return replace(score, profile_rank=entry.rank, cosine_bound=bound), pd
    skipped = UNCHANGED if d_norm == 0.0 else ZERO_V if entry.kind == ZERO else None
    if skipped is not None:  # as full.score_delta: D = 0 first, then V = 0
        empty = ModuleScore(None, None, entry.v_norm, d_norm, d_norm, 0.0, skipped)
        return replace(empty, profile_rank=entry.rank), None
    u, s = _factors(entry, d.device)
    ud = u.T @ d.double()  # Ûᵀ D (k, in)
    if spec.kind is Projection.SUBSPACE:
        j, captured = subspace_rank(entry, spec, module)
        pd = Factored(u[:, :j].float(), ud[:j].float())
        score = score_projection(pd, d, entry.v_norm, d_norm, j, captured)
        return replace(score, profile_rank=entry.rank), pd
    w = (s**2).unsqueeze(1) * ud  # diag(ŝ²) Ûᵀ D: M̂ D = Û w
    pd = Factored((u / entry.v_norm).float(), w.float())
    gamma = u.T @ u
    inside_sq = float((ud * torch.linalg.solve(gamma, ud)).sum())
    mhat_sq = float((w * (gamma @ w)).sum())
    bound = _bound(entry, d_norm * d_norm, inside_sq, mhat_sq) + DELTA_ROUNDING
    score = score_projection(pd, d, entry.v_norm, d_norm)
    return replace(score, profile_rank=entry.rank, cosine_bound=bound), pd


def _weighted(xtx: torch.Tensor, gram: torch.Tensor) -> float:
    """‖X A‖²_F from Xᵀ X (r, r) and G = A Aᵀ (both symmetric)."""
    return max(0.0, float((xtx * gram).sum()))


def uncertain_modules(
    cosines: Mapping[str, float],
    bounds: Mapping[str, float],
    selected: Collection[str],
    threshold: float | None = None,
    num_layers: int | None = None,
) -> set[str]:
    """Modules whose selection could differ with exact cosines, given each cosine's bound.

    Args:
        cosines, bounds: module -> profile cosine, and its bound (0 when exact).
        selected: the modules the profile cosines select.
        threshold: threshold mode's T; None in number mode (the K lowest).
        num_layers: K in number mode: ties at the cut beyond K are uncertain too.
    Returns:
        Empty when every exact cosine is provably on the same side of the cut: the selection
        with exact cosines is then the same.
    """
    if threshold is not None:
        return {
            m
            for m, cos in cosines.items()
            if (cos + bounds[m] > threshold if m in selected else cos - bounds[m] <= threshold)
        }
    inside = [m for m in cosines if m in selected]
    outside = [m for m in cosines if m not in selected]
    if not inside or not outside:
        return set()
    high = max(cosines[m] + bounds[m] for m in inside)
    low = min(cosines[m] - bounds[m] for m in outside)
    found = {m for m in inside if cosines[m] + bounds[m] >= low}
    found |= {m for m in outside if cosines[m] - bounds[m] <= high}
    if num_layers is not None and len(inside) > num_layers:
        cut = max(cosines[m] for m in inside)
        found |= {m for m in inside if cosines[m] == cut and bounds[m] > 0.0}
    return found

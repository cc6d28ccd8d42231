"""Low-rank profile entries: what Safe LoRA needs of V, kept small, with an honest error bound.

Pure torch, no I/O. Shapes: V (out, in) float32 in the module's orientation, ν = ‖V‖_F,
M = V Vᵀ with eigenvalues λ_1 ≥ λ_2 ≥ ... (the σ_i² of V). An entry stores Û (out, k) float32
and ŝ (k,), and paper mode uses Ĉ_k = M̂ / ν with M̂ = Û diag(ŝ²) Ûᵀ in place of Ĉ = M / ν.

Build (``decompose``). The Gram matrix of V's shorter side is formed in float64 (products of
float32 numbers are exact there) and its eigenvalues give the exact spectrum λ. The rank rule picks
k from λ; Û comes from ``torch.svd_lowrank`` (oversampled, power-iterated; AUTO uses it when k is
small against min(out, in)) or from an exact eigendecomposition of that Gram matrix (otherwise, and
whenever the randomized Û certifies worse than RANDOMIZED_SLACK x the ideal σ²_{k+1}); either way Û
is then rotated to the Ritz vectors of its span (the SVD of ÛᵀV) and stored in float32. Its
certificate (``math.certificate``, where the bound on |cosine − exact cosine| is derived)
is computed from the *stored* Û and ŝ, so neither the randomized SVD nor float32 rounding is
assumed away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from safelora_cli.errors import UsageError
from safelora_cli.math.certificate import (
    EXACT_CERTIFICATE,
    Certificate,
    certify,
    gram64,
    project_rows,
    rounding_allowance,
    row_blocks,
)
from safelora_cli.math.projection import EXACT_SVD_MAX_DIM, OVERSAMPLE
from safelora_cli.settings import PROFILE_MAX_RANK, PROFILE_TOLERANCE

LOWRANK = "lowrank"  # Û and ŝ stored
WHOLE = "whole"  # V itself stored: exact
ZERO = "zero"  # V = 0: nothing stored
EXACT = "exact"
RANDOMIZED = "randomized"
AUTO = "auto"
DEFAULT_MAX_RANK = PROFILE_MAX_RANK
DEFAULT_TOLERANCE = PROFILE_TOLERANCE
# A randomized Û is kept only when its certified tail is within this factor of the ideal σ²_{k+1};
# otherwise the exact eigendecomposition is computed instead.
RANDOMIZED_SLACK = 1.25
FLOAT32_FLOOR = 1e-6  # c and f of a float32 Û are about 1e-8 σ_1² (exact vectors included)
# AUTO: randomized when k <= min(out, in) / RANDOMIZED_MAX_SHARE (bench/profile_lowrank.py)
RANDOMIZED_MAX_SHARE = 32
POWER_ITERATIONS = 6  # torch.svd_lowrank's niter for the randomized Û


@dataclass(frozen=True)
class RankRule:
    """How many singular triplets to keep per weight: ``rank`` K, or the smallest k whose
    paper-mode error bound e / σ_1² is within ``tolerance``, up to ``max_rank``."""

    rank: int | None = None
    tolerance: float | None = DEFAULT_TOLERANCE
    max_rank: int = DEFAULT_MAX_RANK

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.tolerance is None):
            raise UsageError("give exactly one of --rank and --tolerance")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--rank {self.rank} must be at least 1")
        if self.tolerance is not None and not 0.0 < self.tolerance < 1.0:
            raise UsageError(f"--tolerance {self.tolerance} is outside (0, 1)")
        if self.max_rank < 1:
            raise UsageError(f"--max-rank {self.max_rank} must be at least 1")


@dataclass(frozen=True)
class LowRank:
    """One weight of a profile.

    ``kind`` LOWRANK: ``u`` (out, k) and ``s`` (k,) float32; WHOLE: ``v`` (out, in) float32,
    exact; ZERO: V = 0, nothing stored. ``method`` says how Û was found (EXACT or RANDOMIZED).
    """

    shape: tuple[int, int]
    v_norm: float
    kind: str
    certificate: Certificate
    u: torch.Tensor | None = None
    s: torch.Tensor | None = None
    v: torch.Tensor | None = None
    method: str = EXACT

    @property
    def rank(self) -> int:
        """k, the number of stored singular triplets (min(out, in) when stored whole)."""
        if self.kind == WHOLE:
            return min(self.shape)
        return 0 if self.s is None else int(self.s.shape[0])

    @property
    def captured_energy(self) -> float:
        """Σ ŝ² / ν², the share of ‖V‖²_F the stored triplets hold (1 when whole)."""
        if self.kind == WHOLE:
            return 1.0
        if self.s is None or self.v_norm == 0.0:
            return 0.0
        return min(1.0, float((self.s.double() ** 2).sum()) / self.v_norm**2)

    @property
    def error_bound(self) -> float:
        """e / ν: ‖Ĉ B − Ĉ_k B‖_F ≤ error_bound · ‖B‖_F for every B."""
        return 0.0 if self.v_norm == 0.0 else self.certificate.operator_bound / self.v_norm

    @property
    def relative_error(self) -> float:
        """e / σ_1²: the paper-mode error relative to ‖Ĉ‖_2 (what ``tolerance`` bounds)."""
        return self.certificate.relative_error

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this entry stores."""
        tensors = (self.u, self.s, self.v)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def decompose(
    v: torch.Tensor, v_norm: float, rule: RankRule = RankRule(), method: str = AUTO
) -> LowRank:
    """The profile entry of one weight: top singular triplets of V and their certificate.

    Args:
        v: V, (out, in) float32, in the module's orientation (transpose Conv1D weights first).
        v_norm: ‖V‖_F, finite.
        rule: the rank rule.
        method: EXACT (eigendecomposition of the float64 Gram matrix), RANDOMIZED
            (``torch.svd_lowrank``), or AUTO (randomized when k is small against min(out, in)).
    Returns:
        A LOWRANK entry, a WHOLE one (the rule's tolerance is not reached within ``max_rank``,
        or k would store as many numbers as V itself), or ZERO when V = 0.
    Example:
        >>> entry = decompose(v, float(v.norm()), RankRule(tolerance=0.01))
        >>> entry.rank, entry.relative_error <= 0.01
    """
    if method not in (EXACT, RANDOMIZED, AUTO):
        raise UsageError(f"method {method!r} is not {EXACT!r}, {RANDOMIZED!r} or {AUTO!r}")
    out, inp = v.shape
    if v_norm == 0.0:
        return LowRank((out, inp), 0.0, ZERO, EXACT_CERTIFICATE)
    full = min(out, inp)
    gram = gram64(v)
    eta = rounding_allowance(out, inp, v_norm)
    eigh: tuple[torch.Tensor, torch.Tensor] | None = None
    if method == EXACT or (method == AUTO and not _randomized_pays(rule.rank, full)):
        eigh = torch.linalg.eigh(gram)  # the spectrum and the vectors in one call
        lam = eigh[0].flip(0).clamp_min(0.0)
    else:
        lam = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
    k = _choose_rank(lam, rule, eta)
    if k is None or k >= inp:
        return _whole(v, v_norm, float(lam[0]))
    if eigh is None and (method == RANDOMIZED or _randomized_pays(k, full)):
        entry = _randomized_entry(v, v_norm, lam, eta, k, rule)
        if entry is not None:
            return entry
    if eigh is None:
        eigh = torch.linalg.eigh(gram)
    entry = _entry(v, v_norm, lam, eta, _exact_basis(v, eigh, k), EXACT)
    return entry if _meets(entry, rule) else _whole(v, v_norm, float(lam[0]))


def _randomized_entry(
    v: torch.Tensor, v_norm: float, lam: torch.Tensor, eta: float, k: int, rule: RankRule
) -> LowRank | None:
    """A randomized entry at k, or None when it certifies worse than RANDOMIZED_SLACK x the ideal.

    k is the smallest rank whose ideal bound σ²_{k+1} meets the tolerance, often by a hair; when
    only the tolerance is missed, by what the randomized Û adds (its measured excess over σ²_{k+1}),
    the k that leaves twice that room is tried once.
    """
    for attempt in range(2):
        entry = _entry(v, v_norm, lam, eta, _randomized_basis(v, k), RANDOMIZED)
        ideal = _next(lam, k)
        floor = FLOAT32_FLOOR * float(lam[0]) + 4.0 * eta  # what storing Û in float32 costs
        excess = entry.certificate.operator_bound - ideal
        if excess > (RANDOMIZED_SLACK - 1.0) * ideal + floor:
            return None
        if _meets(entry, rule):
            return entry
        assert rule.tolerance is not None
        budget = rule.tolerance * float(lam[0]) - 4.0 * eta - 2.0 * excess
        roomy = _smallest_k(lam, budget)
        if attempt or roomy is None or roomy > rule.max_rank or roomy >= v.shape[1]:
            return None
        k = roomy
    return None


def _next(lam: torch.Tensor, k: int) -> float:
    """λ_{k+1} (0 past the end)."""
    return float(lam[k]) if k < len(lam) else 0.0


def _whole(v: torch.Tensor, v_norm: float, top: float) -> LowRank:
    certificate = Certificate(math.sqrt(top), 0.0, 0.0, 0.0, 0.0, 0.0)
    shape = (int(v.shape[0]), int(v.shape[1]))
    return LowRank(shape, v_norm, WHOLE, certificate, v=v.detach().float().clone())


def _meets(entry: LowRank, rule: RankRule) -> bool:
    return rule.tolerance is None or entry.relative_error <= rule.tolerance


def _randomized_pays(k: int | None, full: int) -> bool:
    """Whether a randomized SVD (sketch 2k) is likely cheaper than a full eigendecomposition
    (k None: not known yet, decided once the spectrum is)."""
    return full > EXACT_SVD_MAX_DIM and (k is None or RANDOMIZED_MAX_SHARE * k <= full)


def _choose_rank(lam: torch.Tensor, rule: RankRule, eta: float) -> int | None:
    """k from the exact spectrum λ (descending); None when the tolerance is out of reach."""
    # directions below the rounding level carry nothing: never keep them
    numerical = max(1, int((lam > eta).sum()))
    if rule.rank is not None:
        return min(rule.rank, numerical)
    assert rule.tolerance is not None
    k = _smallest_k(lam, rule.tolerance * float(lam[0]) - 4.0 * eta)
    if k is None:
        return None
    k = min(k, numerical)
    return k if k <= rule.max_rank else None


def _smallest_k(lam: torch.Tensor, budget: float) -> int | None:
    """The smallest k >= 1 with λ_{k+1} <= budget, or None."""
    nxt = torch.cat([lam[1:], lam.new_zeros(1)])  # λ_{k+1} for k = 1..n
    ok = torch.nonzero(nxt <= budget)
    return int(ok[0]) + 1 if len(ok) else None


def _exact_basis(v: torch.Tensor, eigh: tuple[torch.Tensor, torch.Tensor], k: int) -> torch.Tensor:
    """U_k from the eigendecomposition (ascending) of the Gram matrix, float64 (out, k)."""
    lam, vecs = eigh
    top: torch.Tensor = vecs[:, -k:].flip(1)
    if v.shape[0] <= v.shape[1]:
        return top
    # Gram of the columns: U_k = V W_k / σ_k, then orthonormalised by the Ritz step
    sigma = lam[-k:].flip(0).clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    u = torch.empty(v.shape[0], k, dtype=torch.float64, device=v.device)
    for rows, block in row_blocks(v):
        u[rows] = block @ top
    return u.div_(sigma)


def _randomized_basis(v: torch.Tensor, k: int) -> torch.Tensor:
    """U_k from ``torch.svd_lowrank`` (seeded, oversampled, power-iterated), float64.

    Not ``projection``'s block Krylov basis: that one is accurate enough to score with, but its
    float32 vectors certify about twice the ideal σ²_{k+1} on the bench's pair (cross term
    c ≈ 6e-5 λ_1 against 1e-7), so every weight fell back to the exact eigendecomposition:
    57 s against 36 s for the 6-layer pair.
    """
    sketch = min(k + max(OVERSAMPLE, k), min(v.shape))
    cuda = v.device.type == "cuda"
    index = (
        (v.device.index if v.device.index is not None else torch.cuda.current_device())
        if cuda
        else 0
    )
    with torch.random.fork_rng(devices=[index] if cuda else []):  # the caller's RNG untouched
        generator = torch.cuda.default_generators[index] if cuda else torch.default_generator
        generator.manual_seed(0)  # reproducible
        u, _, _ = torch.svd_lowrank(v, q=sketch, niter=POWER_ITERATIONS)
    return u[:, :k].double()


def _entry(
    v: torch.Tensor, v_norm: float, lam: torch.Tensor, eta: float, basis: torch.Tensor, how: str
) -> LowRank:
    """Rotate ``basis`` to the Ritz vectors of its span, store in float32, certify."""
    z, _ = torch.linalg.qr(basis)
    y, s, _ = torch.linalg.svd(project_rows(v, z), full_matrices=False)
    u, s32 = (z @ y).float(), s.float()
    certificate = certify(v, u, s32, lam, eta)
    shape = (int(v.shape[0]), int(v.shape[1]))
    return LowRank(shape, v_norm, LOWRANK, certificate, u, s32, method=how)

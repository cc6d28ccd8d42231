"""Low-rank profile entries: what Safe LoRA needs of V, kept small, with an honest error bound.

Pure torch, no I/O. Shapes: V (out, in) float32 in the module's orientation, ν = ‖V‖_F,
M = V Vᵀ with eigenvalues λ_1 ≥ λ_2 ≥ ... (the σ_i² of V). An entry stores Û (out, k) float32
and ŝ (k,), and paper mode uses Ĉ_k = M̂ / ν with M̂ = Û diag(ŝ²) Ûᵀ in place of Ĉ = M / ν.

Build (``decompose``). The Gram matrix of V's shorter side is formed in float64 (products of
float32 numbers are exact there) and its eigenvalues give the exact spectrum λ. The rank rule picks
k from λ; Û comes from ``torch.svd_lowrank`` (oversampled, power-iterated; AUTO uses it when k is
small against min(out, in)) or from an exact eigendecomposition of that Gram matrix (otherwise, and
whenever the randomized Û certifies worse than RANDOMIZED_SLACK x the ideal σ²_{k+1}); either way Û
is then rotated to the Ritz vectors of its span (the SVD of ÛᵀV) and stored in float32. The
certificate below is computed from the *stored* Û and ŝ, so neither the randomized SVD nor float32
rounding is assumed away.

Certificate. Let Z be an orthonormal basis of range(Û) (Û = Z R), P = Z Zᵀ, Q = I − P and
E = M − M̂. As Q M̂ = M̂ Q = 0, E has three blocks, each measured at build time in float64:

    P E P = P M P − M̂:   F = X Xᵀ − R diag(ŝ²) Rᵀ with X = Zᵀ V (k, in)     f = ‖F‖_2
    P E Q = P M Q:       C = X (Q V)ᵀ (k, out)                              c = ‖C‖_2
    Q E Q = Q M Q:       t = ‖Q V‖_2², bounded above by t̄, the least of
        (i)   ‖Q V‖²_F, the residual energy ‖V − Z X‖²_F;
        (ii)  λ_1 + c, and λ_{j+1} + c for every j ≤ k with ρ_j > λ_{j+1} + c, where
              ρ_1 ≥ ... ≥ ρ_k are the eigenvalues of X Xᵀ (Ritz values). Proof: in the basis
              (Z, Z⊥), M = D + O with D = diag(X Xᵀ, Q M Q) and ‖O‖_2 = c, so by Weyl
              λ_{j+1}(D) ≤ λ_{j+1} + c. D has j + 1 eigenvalues ≥ min(ρ_j, t) (ρ_1..ρ_j and t),
              so min(ρ_j, t) ≤ λ_{j+1} + c, and when ρ_j exceeds the right side, t does not.

With exact singular vectors f = c = 0, ρ_j = λ_j and t̄ = λ_{k+1} = σ²_{k+1}: the bound of the
design notes. A randomized Û makes c and f non-zero and t̄ larger; the bound stays true.

Per adapter, Y = B A (out, in), a = ‖P Y‖_F, b = ‖Q Y‖_F, from small Grams: with G = A Aᵀ and
Γ = ÛᵀÛ, a² = Σ ((ÛᵀB)ᵀ Γ⁻¹ (ÛᵀB)) ∘ G and b² = ‖Y‖²_F − a².
P E Y = F·P Y + C·Q Y and Q E Y = Cᵀ·P Y + (Q M Q)·Q Y, so

    ‖E Y‖_F ≤ β = sqrt((f a + c b)² + (c a + t̄ b)²) ≤ e ‖Y‖_F,  e = ‖[[f, c], [c, t̄]]‖_2,

and ‖Ĉ B − Ĉ_k B‖_F ≤ e ‖B‖_F / ν for any B (``LowRank.error_bound`` = e / ν; the rank rule's
tolerance bounds e / λ_1, the error relative to ‖Ĉ‖_2). The cosines are cos(M Y, Y) (exact) and
cos(M̂ Y, Y) (profile), ν cancelling. With δ = β / ‖M̂ Y‖_F < 1 the angle φ between M Y = M̂ Y + E Y
and M̂ Y has sin φ ≤ δ, and |cos θ − cos θ'| = 2 |sin((θ+θ')/2) sin((θ−θ')/2)| ≤ 2 sin(φ/2), so

    |cosine − exact cosine| ≤ sqrt(2 − 2 sqrt(1 − δ²))  (≈ δ; 2 when δ ≥ 1).

Rounding: λ, ρ, c, f and the residual are float64 results from float32 data. Their errors are
within η = 8 (out + in) 2⁻⁵³ ν² (worst-case summation error of the Gram matrix, about
out·2⁻⁵³·ν², plus the eigensolver's backward error, about min(out, in)·2⁻⁵³·λ_1), which is added
to each of them; for TinyLlama's 5632 x 2048 that is 7e-12 ν².
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from safelora_cli.errors import UsageError
from safelora_cli.projection import EXACT_SVD_MAX_DIM, _top_singular

LOWRANK = "lowrank"  # Û and ŝ stored
WHOLE = "whole"  # V itself stored: exact
ZERO = "zero"  # V = 0: nothing stored
EXACT = "exact"
RANDOMIZED = "randomized"
AUTO = "auto"
DEFAULT_MAX_RANK = 256
DEFAULT_TOLERANCE = 0.01
# A randomized Û is kept only when its certified tail is within this factor of the ideal σ²_{k+1};
# otherwise the exact eigendecomposition is computed instead.
RANDOMIZED_SLACK = 1.25
FLOAT32_FLOOR = 1e-6  # c and f of a float32 Û are about 1e-8 σ_1² (exact vectors included)
# AUTO: randomized when k <= min(out, in) / RANDOMIZED_MAX_SHARE (bench/profile_lowrank.py)
RANDOMIZED_MAX_SHARE = 32
BLOCK_ELEMENTS = 1 << 21  # float64 elements per row/column block (16 MiB)
_UNIT64 = 2.0**-53


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
class Certificate:
    """What bounds M − M̂ (module docstring): all measured at build time, float64."""

    sigma_max: float  # σ_1 of V
    sigma_next: float  # σ_{k+1} of V (0 when k reaches min(out, in))
    tail_energy: float  # ‖Q V‖²_F
    cross: float  # c
    ritz: float  # f
    tail: float  # t̄ ≥ ‖Q V‖²_2

    @property
    def operator_bound(self) -> float:
        """e = ‖[[f, c], [c, t̄]]‖_2 ≥ ‖M − M̂‖_2."""
        f, c, t = self.ritz, self.cross, self.tail
        return 0.5 * (f + t + math.sqrt((f - t) ** 2 + 4.0 * c * c))

    @property
    def relative_error(self) -> float:
        """e / σ_1²: the paper-mode error relative to ‖Ĉ‖_2 (what a tolerance bounds)."""
        top = self.sigma_max**2
        return 0.0 if top == 0.0 else self.operator_bound / top


EXACT_CERTIFICATE = Certificate(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


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
    gram = _gram64(v)
    eta = 8.0 * (out + inp) * _UNIT64 * v_norm**2
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


def _row_blocks(v: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Row blocks of V in float64 (a few MiB each), so memory stays O(block)."""
    rows = max(1, BLOCK_ELEMENTS // max(1, v.shape[1]))
    for start in range(0, v.shape[0], rows):
        yield slice(start, start + rows), v[start : start + rows].double()


def _gram64(v: torch.Tensor) -> torch.Tensor:
    """The float64 Gram matrix of V's shorter side: V Vᵀ (out <= in) or Vᵀ V."""
    out, inp = v.shape
    if out > inp:
        gram = torch.zeros(inp, inp, dtype=torch.float64, device=v.device)
        for _, block in _row_blocks(v):
            gram.addmm_(block.T, block)
        return gram
    gram = torch.zeros(out, out, dtype=torch.float64, device=v.device)
    cols = max(1, BLOCK_ELEMENTS // max(1, out))
    for start in range(0, inp, cols):
        block = v[:, start : start + cols].double()
        gram.addmm_(block, block.T)
    return gram


def _exact_basis(v: torch.Tensor, eigh: tuple[torch.Tensor, torch.Tensor], k: int) -> torch.Tensor:
    """U_k from the eigendecomposition (ascending) of the Gram matrix, float64 (out, k)."""
    lam, vecs = eigh
    top: torch.Tensor = vecs[:, -k:].flip(1)
    if v.shape[0] <= v.shape[1]:
        return top
    # Gram of the columns: U_k = V W_k / σ_k, then orthonormalised by the Ritz step
    sigma = lam[-k:].flip(0).clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    u = torch.empty(v.shape[0], k, dtype=torch.float64, device=v.device)
    for rows, block in _row_blocks(v):
        u[rows] = block @ top
    return u.div_(sigma)


def _randomized_basis(v: torch.Tensor, k: int) -> torch.Tensor:
    """U_k from ``torch.svd_lowrank`` (seeded, oversampled, power-iterated), float64."""
    u, _ = _top_singular(v, k)
    return u.double()


def _project_rows(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """X = Zᵀ V, (k, in) float64, one pass over V."""
    x = torch.zeros(z.shape[1], v.shape[1], dtype=torch.float64, device=v.device)
    for rows, block in _row_blocks(v):
        x.addmm_(z[rows].T, block)
    return x


def _entry(
    v: torch.Tensor, v_norm: float, lam: torch.Tensor, eta: float, basis: torch.Tensor, how: str
) -> LowRank:
    """Rotate ``basis`` to the Ritz vectors of its span, store in float32, certify."""
    z, _ = torch.linalg.qr(basis)
    y, s, _ = torch.linalg.svd(_project_rows(v, z), full_matrices=False)
    u, s32 = (z @ y).float(), s.float()
    certificate = certify(v, u, s32, lam, eta)
    shape = (int(v.shape[0]), int(v.shape[1]))
    return LowRank(shape, v_norm, LOWRANK, certificate, u, s32, method=how)


def certify(
    v: torch.Tensor, u: torch.Tensor, s: torch.Tensor, lam: torch.Tensor, eta: float
) -> Certificate:
    """Measure f, c, the residual energy and t̄ for the stored Û, ŝ (module docstring).

    Args:
        v: V (out, in) float32; u: Û (out, k); s: ŝ (k,); lam: λ of V Vᵀ, descending, float64;
        eta: the rounding allowance η.
    """
    k = u.shape[1]
    z, r = torch.linalg.qr(u.double())
    x = _project_rows(v, z)
    f = _sym_norm(x @ x.T - (r * s.double() ** 2) @ r.T) + eta
    tail_energy, cct = 0.0, torch.zeros(k, k, dtype=torch.float64, device=v.device)
    for rows, block in _row_blocks(v):
        residual = block - z[rows] @ x
        tail_energy += float(torch.linalg.vector_norm(residual)) ** 2
        cross = x @ residual.T
        cct.addmm_(cross, cross.T)
    c = math.sqrt(max(_sym_norm(cct), 0.0)) + eta
    tail_energy += eta
    rho = torch.linalg.eigvalsh(x @ x.T).flip(0)
    nxt = torch.cat([lam[1:], lam.new_zeros(1)])[:k] + eta  # λ_{j+1}, j = 1..k
    gap_ok = rho - eta > nxt + c
    tail = min(tail_energy, float(lam[0]) + eta + c)
    if bool(gap_ok.any()):
        tail = min(tail, float(nxt[gap_ok].min()) + c)
    sigma_next = math.sqrt(float(lam[k])) if k < len(lam) else 0.0
    return Certificate(math.sqrt(float(lam[0])), sigma_next, tail_energy, c, f, tail)


def _sym_norm(m: torch.Tensor) -> float:
    """Spectral norm of a small symmetric matrix."""
    return float(torch.linalg.eigvalsh(m).abs().max())

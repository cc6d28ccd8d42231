"""Low-rank profile entries: what Safe LoRA needs of V, kept small, with an honest error bound.

Pure torch, no I/O. Shapes: V (out, in) float32 in the module's orientation, ν = ‖V‖_F,
M = V Vᵀ with eigenvalues λ_1 ≥ λ_2 ≥ ... (the σ_i² of V). An entry stores Û (out, k) float32
and ŝ (k,), and paper mode uses Ĉ_k = M̂ / ν with M̂ = Û diag(ŝ²) Ûᵀ in place of Ĉ = M / ν.

Build (``decompose``), two routes:

- Randomized (RANDOMIZED, and AUTO when k is small against min(out, in)): a sketch of V
  (``torch.svd_lowrank``, SKETCH_ITERATIONS power iterations, POWER_ITERATIONS when that basis
  certifies too loosely) gives Û and estimates σ̂; the rule picks k from σ̂ (aiming below the
  tolerance, PROBE_MARGIN); Û is rotated to the Ritz vectors of its span (the SVD of ÛᵀV in
  float64) and stored in float32, and ``certificate.certify_probed`` certifies the *stored* Û
  and ŝ without V's spectrum: f, c and ‖Q V‖²_F as below, and the tail from a randomized block
  Krylov probe of Q V (``math.probe``), a bound that holds except with probability at most
  1e-12 (recorded per weight as ``failure``). The entry is kept only when its certificate is
  within RANDOMIZED_SLACK of a proven lower bound on σ²_{k+1}, so within 1.25x of what the
  exact route would certify; otherwise, or when the tolerance is out of the sketch's reach, the
  exact route decides. Measured on the bench pair's 2048 x 5632 weight: 0.33-0.55 s against
  2.5-3.6 s for the exact route (same process, loaded host), the certificate 1.19x the exact one.
- Exact: the Gram matrix of V's shorter side in float64 (products of float32 numbers are exact
  there), its eigendecomposition giving the exact spectrum λ; the rank rule picks k from λ, U_k
  from the eigenvectors, and ``certificate.certify`` proves the bound (no probability).

Either way the certificate (``math.certificate``, where the bound on |cosine − exact cosine| is
derived) is computed from the *stored* Û and ŝ, so neither the randomized SVD nor float32
rounding is assumed away.
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
    certify_probed,
    gram64,
    project_rows,
    rounding_allowance,
    row_blocks,
)
from safelora_cli.math.probe import EPSILON
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
# A randomized entry is kept only when its certificate is within this factor of a lower bound on
# σ²_{k+1} (so of the exact route's certificate); otherwise the exact route decides.
RANDOMIZED_SLACK = 1.25
FLOAT32_FLOOR = 1e-6  # c and f of a float32 Û are about 1e-8 σ_1² (exact vectors included)
# AUTO: randomized when k <= min(out, in) / RANDOMIZED_MAX_SHARE (bench/profile_lowrank.py)
RANDOMIZED_MAX_SHARE = 32
POWER_ITERATIONS = 6  # torch.svd_lowrank's niter for the randomized Û, when 2 were too few
SKETCH_ITERATIONS = 2  # the first try (6 passes over V instead of 14; 1 was often too loose)
# Under --tolerance the sketch has SKETCH_WIDTHS[0] columns, then the next while
# RANDOMIZED_MAX_SHARE x width <= 2 min(out, in); k aims at PROBE_MARGIN (1 − ε) of the budget.
SKETCH_WIDTHS = (16, 64)
PROBE_MARGIN = 0.8 * (1.0 - EPSILON)


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
    failure: float = 0.0  # P(the certificate is not a bound): 0, or the probe's (``probe``)

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
        method: EXACT (eigendecomposition of the float64 Gram matrix), RANDOMIZED (a sketch of
            V and a probed certificate, ``certificate.certify_probed``; exact when that fails),
            or AUTO (randomized when k is small against min(out, in)).
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
    eta = rounding_allowance(out, inp, v_norm)
    if method == RANDOMIZED or (method == AUTO and _randomized_pays(rule.rank, min(out, inp))):
        entry = _sketched(v, v_norm, eta, rule, forced=method == RANDOMIZED)
        if entry is not None:
            return entry
    eigh = torch.linalg.eigh(gram64(v))  # the spectrum and the vectors in one call
    lam = eigh[0].flip(0).clamp_min(0.0)
    k = _choose_rank(lam, rule, eta)
    if k is None or k >= inp:
        return _whole(v, v_norm, float(lam[0]))
    entry = _entry(v, v_norm, lam, eta, _exact_basis(v, eigh, k), EXACT)
    return entry if _meets(entry, rule) else _whole(v, v_norm, float(lam[0]))


def _sketched(
    v: torch.Tensor, v_norm: float, eta: float, rule: RankRule, forced: bool
) -> LowRank | None:
    """A RANDOMIZED entry, or None when the exact route must decide (k out of the sketch's reach,
    the tolerance missed, or a certificate looser than RANDOMIZED_SLACK x any exact one).

    k comes from the sketch's σ̂² (estimates, not bounds), aiming at PROBE_MARGIN (1 − ε) of the
    tolerance's budget, as the probed tail may exceed ‖Q V‖²_2 by up to 1/(1 − ε); when only the
    tolerance is missed, the k that leaves room for the measured excess is tried once.
    """
    full = min(v.shape)
    if rule.rank is not None:
        widths = [min(full, rule.rank + max(OVERSAMPLE, rule.rank))]
    else:
        widths = [
            min(full, w)
            for i, w in enumerate(SKETCH_WIDTHS)
            if i == 0 or forced or RANDOMIZED_MAX_SHARE * (w - OVERSAMPLE) <= full
        ]
    for width in dict.fromkeys(widths):
        for niter in (SKETCH_ITERATIONS, POWER_ITERATIONS):
            found = _attempt(v, v_norm, eta, rule, width, niter)
            if isinstance(found, LowRank):
                return found
            if found == _NO_GAP:
                return None  # no sketch separates σ_k from σ_{k+1}: the exact route
            if found != _LOOSE:
                break  # a better basis cannot help: a wider sketch, or the exact route
    return None


_OUT_OF_REACH, _LOOSE, _NO_GAP = "out of reach", "loose", "no gap"
GAP = 1.03  # λ̂_k / λ̂_{k+1} below this: more power iterations will not make a loose basis tight


def _attempt(
    v: torch.Tensor, v_norm: float, eta: float, rule: RankRule, width: int, niter: int
) -> LowRank | str | None:
    """One sketch (``width`` columns, ``niter`` power iterations) and its entry; or why not:
    _OUT_OF_REACH (no k within the sketch meets the rule), _LOOSE (the certificate is looser than
    RANDOMIZED_SLACK x any exact one: a better basis may do), _NO_GAP (as loose, with no gap
    between λ̂_k and λ̂_{k+1}, as inside a flat noise floor: no basis will do), None (tolerance
    missed)."""
    basis, sigma = _sketch(v, width, niter)
    lam = sigma.double() ** 2
    usable = width if width == min(v.shape) else width - OVERSAMPLE // 2  # σ̂ trusted so far
    numerical = max(1, int((lam > eta).sum()))
    if rule.rank is not None:
        k: int | None = min(rule.rank, numerical, width)
    else:
        assert rule.tolerance is not None
        budget = rule.tolerance * float(lam[0]) - 4.0 * eta
        k = _estimated_k(lam, PROBE_MARGIN * budget, usable)
        k = None if k is None else min(k, numerical)
    if k is None or k >= v.shape[1] or (rule.rank is None and k > rule.max_rank):
        return _OUT_OF_REACH
    for _ in range(2):
        entry, floor = _probed_entry(v, v_norm, eta, basis[:, :k])
        bound = entry.certificate.operator_bound
        slack = FLOAT32_FLOOR * float(lam[0]) + 4.0 * eta
        if bound > RANDOMIZED_SLACK * max(floor, 0.0) + slack:
            gapless = k < width and float(lam[k - 1]) < GAP * float(lam[k])
            return _NO_GAP if gapless else _LOOSE
        if _meets(entry, rule):
            return entry
        assert rule.tolerance is not None
        budget = rule.tolerance * entry.certificate.sigma_max**2 - 4.0 * eta
        excess = bound / max(float(lam[k]) if k < width else 0.0, eta, 1e-300)
        roomy = _estimated_k(lam, budget / excess, usable)
        if roomy is None or roomy <= k or roomy > rule.max_rank:
            return None
        k = roomy
    return None


def _probed_entry(
    v: torch.Tensor, v_norm: float, eta: float, basis: torch.Tensor
) -> tuple[LowRank, float]:
    """Rotate ``basis`` to the Ritz vectors of its span, store in float32, certify with the probe;
    also returns the certificate's floor (a lower bound on λ_{k+1})."""
    z, _ = torch.linalg.qr(basis)
    y, s, _ = torch.linalg.svd(project_rows(v, z), full_matrices=False)
    u, s32 = (z @ y).float(), s.float()
    probed = certify_probed(v, u, s32, eta, salt=v_norm)
    shape = (int(v.shape[0]), int(v.shape[1]))
    entry = LowRank(
        shape, v_norm, LOWRANK, probed.certificate, u, s32, method=RANDOMIZED,
        failure=probed.failure,
    )  # fmt: skip
    return entry, probed.floor


def _estimated_k(lam: torch.Tensor, budget: float, usable: int) -> int | None:
    """The smallest k >= 1 whose estimate λ̂_{k+1} is within ``budget``, among the first
    ``usable`` estimates (past the end of a sketch of the whole space, λ = 0), or None."""
    if usable >= len(lam):
        return _smallest_k(lam, budget)
    ok = torch.nonzero(lam[1:usable] <= budget)
    return int(ok[0]) + 1 if len(ok) else None


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


def _sketch(v: torch.Tensor, width: int, niter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis (out, width) float64, σ̂ (width,) descending): ``torch.svd_lowrank`` (seeded,
    power-iterated) with ``width`` columns; σ̂ estimates σ_1..σ_width (they are not bounds).

    Not ``projection``'s block Krylov basis: that one is accurate enough to score with, but its
    float32 vectors certify about twice the ideal σ²_{k+1} on the bench's pair (cross term
    c ≈ 6e-5 λ_1 against 1e-7), so every weight fell back to the exact eigendecomposition:
    57 s against 36 s for the 6-layer pair.
    """
    cuda = v.device.type == "cuda"
    index = (
        (v.device.index if v.device.index is not None else torch.cuda.current_device())
        if cuda
        else 0
    )
    with torch.random.fork_rng(devices=[index] if cuda else []):  # the caller's RNG untouched
        generator = torch.cuda.default_generators[index] if cuda else torch.default_generator
        generator.manual_seed(0)  # reproducible
        u, sigma, _ = torch.svd_lowrank(v, q=width, niter=niter)
    return u.double(), sigma


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

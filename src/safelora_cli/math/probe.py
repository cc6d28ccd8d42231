"""A probabilistic upper bound on ‖R‖₂² from a randomized block Krylov space, for the certificate.

Pure torch, no I/O. R (p, m) float64 is the residual Q V of a profile entry (``certificate``);
t = ‖R‖₂² is the largest eigenvalue of B = Rᵀ R or R Rᵀ, whichever is smaller (n × n,
n = min(p, m)).

Theorem (Kuczyński & Woźniakowski 1992, "Estimating the largest eigenvalue by the power and
Lanczos algorithms with a random start", SIAM J. Matrix Anal. Appl. 13(4), Thm 4.2): for a
symmetric positive semi-definite B (n × n) and ω uniform on the unit sphere, the largest Rayleigh
quotient of B over the Krylov space span{ω, Bω, ..., B^(q−1) ω} is below (1 − ε) λ_1(B) with
probability at most 1.648 √n e^(−√ε (2q − 1)), where q counts the products with B (Krylov
information [ω, Bω, ..., B^q ω]: the Rayleigh quotients over a space of dimension q need the q-th
product), as here. A block of b independent Gaussian columns spans a Krylov space holding each
column's own, so all b must fail: P(failure) ≤ (1.648 √n e^(−√ε (2q − 1)))^b.
``steps`` picks q to make that at most FAILURE_PROBABILITY per weight (1e-12, so at most 1e-9
for a whole profile of up to 1000 weights, by the union bound). The probe's columns come from a
generator seeded with a hash of R (``probe_seed``), so a profile is reproducible; the probability
is over that draw, for any V not made knowing it.

Computation. The basis W = [X_1 ... X_q] (n × d, d = q b, orthonormal, float64: block
Gram–Schmidt twice) is grown from X_1 = orth(Ω) with Y_j = fl(B X_j), X_(j+1) = orth(Y_j minus its
part in span(X_1..X_j)); θ = λ_max(sym(Wᵀ Y)). R is float32 (its rounding from the float64
residual, at most 2⁻²⁴ ‖R‖_F in norm, is added by ``certify_probed``); each product with R runs
in float32 over chunks of CHUNK terms, the chunks' results summed in float64, so each entry is
within g Σ|a_i||x_i| of exact (``rounding_factor``: g ≈ 1.5e-5, x's rounding to float32
included), and for a unit x, ‖fl(B x) − B x‖ ≤ 2 g F s + g² F² with F = ‖R‖_F, s = ‖R‖_2. So
E = Y − B W has ‖E‖ ≤ √d (2 g F s + g² F²) + (the float64 steps and dropped directions). The
part E⊥_j of E_j outside span(X_1..X_(j+1)) defines the symmetric B' = B + Σ_j (E⊥_j X_jᵀ +
X_j E⊥_jᵀ), with ‖B' − B‖ ≤ 2‖E‖ and B' X_j inside span(X_1..X_(j+1)): span(W) holds the Krylov
space of B' from Ω, and the theorem applies to B' [1]. Weyl moves λ_1 and every Rayleigh quotient
by at most 2‖E‖ between B and B', and θ is within ‖E‖ of λ_max(Wᵀ B W); so, but for the failure
probability,

    t ≤ (θ + 3‖E‖) / (1 − ε) + 2‖E‖,

a quadratic inequality in s = √t, solved for the bound. ε = EPSILON = 0.11 is what the bound
gives away (up to 1/(1 − ε) ≈ 1.12 times ‖R‖₂²), the rounding allowance a few percent more when
‖R‖_F ≫ ‖R‖_2 (a flat tail): 1.18x the exact certificate on the bench pair's 2048 x 5632 weight.

[1] B' depends on the run's rounding, and so on Ω, while the theorem takes B fixed: the argument
is first order in ‖E‖ / t (about 1e-3 at most here).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch

FAILURE_PROBABILITY = 1e-12  # per weight
EPSILON = 0.11  # the bound is at most ~1/(1 − ε) = 1.12x the true ‖R‖₂² (plus rounding)
BLOCK = 16  # b, independent start columns (16 cost as much as 8 a pass: memory-bound)
KW_CONSTANT = 1.648
CHUNK = 256  # float32 terms summed before each float64 accumulation
DROP = 1e-10  # new directions smaller than this share of B x are numerically in the space
_UNIT32 = 2.0**-24
_UNIT64 = 2.0**-53


@dataclass(frozen=True)
class TailBound:
    """An upper bound on ‖R‖₂², true except with probability ``failure``."""

    bound: float  # t̄
    ritz: float  # θ, the largest Ritz value found: ‖R w‖² ≥ θ − allowance for a unit w
    allowance: float  # the bound on ‖E‖ (module docstring)
    failure: float  # P(bound < ‖R‖₂²) ≤ this
    steps: int  # q


def steps(
    n: int, block: int = BLOCK, eps: float = EPSILON, failure: float = FAILURE_PROBABILITY
) -> int:
    """The least q ≥ 2 whose failure probability (module docstring) is at most ``failure``."""
    need = math.log(KW_CONSTANT * math.sqrt(n)) - math.log(failure) / block
    return max(2, math.ceil((need / math.sqrt(eps) + 1.0) / 2.0))


def failure_probability(n: int, q: int, block: int = BLOCK, eps: float = EPSILON) -> float:
    """(1.648 √n e^(−√ε (2q − 1)))^b, the theorem's bound for a column capped at 1."""
    one = min(1.0, KW_CONSTANT * math.sqrt(n) * math.exp(-math.sqrt(eps) * (2 * q - 1)))
    return one**block


def rounding_factor(terms: int, chunk: int = CHUNK) -> float:
    """g: every entry of a ``_chunked`` product is within g Σ|a_i||x_i| of exact: γ_(c+1) for
    a float32 chunk of c terms, one more 2⁻²⁴ for x rounded to float32, and the float64 sum of
    the chunks' results (any summation order)."""
    c = min(chunk, terms) + 2
    chunks = -(-terms // chunk)
    return c * _UNIT32 / (1.0 - c * _UNIT32) + (chunks + 1) * 2.0 * _UNIT64


def probe_seed(r: torch.Tensor, salt: float) -> int:
    """A seed from R itself (a strided sample of its bytes, its shape, ``salt``): profiles are
    reproducible, and each weight draws its own probe."""
    sample = r[:: max(1, r.shape[0] // 64)].contiguous().cpu()
    digest = hashlib.sha256(struct.pack("<qqd", *r.shape, salt))
    digest.update(sample.numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)


def tail_bound(r: torch.Tensor, frobenius: float, seed: int) -> TailBound:
    """t̄ ≥ ‖R‖₂² except with probability ``failure`` (module docstring).

    Args:
        r: R (p, m) float32.
        frobenius: F ≥ ‖R‖_F.
        seed: the probe's seed (``probe_seed``).
    """
    p, m = r.shape
    n = min(p, m)
    if frobenius == 0.0:
        return TailBound(0.0, 0.0, 0.0, 0.0, 0)
    q = steps(n)
    block = min(BLOCK, n)
    rounding = 8.0 * (p + m) * _UNIT64 * frobenius**2  # as the certificate's η
    if q * block >= n:  # the Krylov space would be the whole space: B's spectrum, exactly
        r64 = r.double()
        gram = r64.T @ r64 if m <= p else r64 @ r64.T
        top = max(0.0, float(torch.linalg.eigvalsh(gram)[-1]))
        return TailBound(top + rounding, top, rounding, 0.0, 0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(n, block, generator=gen, dtype=torch.float64).to(r.device)
    basis = [torch.linalg.qr(start)[0]]
    images = []
    for j in range(q):
        images.append(_apply(r, basis[-1]))
        if j == q - 1:
            break
        fresh = _new_directions(torch.cat(basis, 1), images[-1])
        if fresh is None:
            break  # an invariant subspace: no later step can add a direction
        basis.append(fresh)
    w, y = torch.cat(basis, 1), torch.cat(images, 1)
    h = w.T @ y
    theta = max(0.0, float(torch.linalg.eigvalsh(0.5 * (h + h.T))[-1]))
    d = w.shape[1]
    g = max(rounding_factor(m), rounding_factor(p))
    gf = g * frobenius
    # float64 orthogonalisation, directions dropped below DROP, Wᵀ Y, eigvalsh
    extra = d * (4.0 * _UNIT64 + DROP) * frobenius**2 + rounding
    # ‖E‖ ≤ a s + b0 with s = √t; t ≤ (θ + 3‖E‖)/(1 − ε) + 2‖E‖ = α + β s
    a, b0 = math.sqrt(d) * 2.0 * gf, math.sqrt(d) * gf * gf + extra
    grow = 3.0 / (1.0 - EPSILON) + 2.0
    alpha, beta = theta / (1.0 - EPSILON) + grow * b0, grow * a
    s = 0.5 * (beta + math.sqrt(beta * beta + 4.0 * alpha))
    return TailBound(s * s, theta, a * s + b0, failure_probability(n, q, block), q)


def _new_directions(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """An orthonormal basis of the part of span(y) outside span(w) (Gram–Schmidt twice, then
    directions below DROP x the largest column of y left out), or None when nothing is left."""
    z = y - w @ (w.T @ y)
    z -= w @ (w.T @ z)
    left, sigma, _ = torch.linalg.svd(z, full_matrices=False)
    keep = sigma > DROP * float(torch.linalg.vector_norm(y, dim=0).max())
    if not bool(keep.any()):
        return None
    fresh = left[:, keep]
    fresh -= w @ (w.T @ fresh)
    orthonormal: torch.Tensor = torch.linalg.qr(fresh)[0]
    return orthonormal


def _apply(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """B x with B = RᵀR (m <= p) or R Rᵀ."""
    p, m = r.shape
    if m <= p:
        return _chunked(r.T, _chunked(r, x))
    return _chunked(r, _chunked(r.T, x))


def _chunked(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a @ x for a (rows, terms) float32 (any strides) and x (terms, b) float64: float32
    products over chunks of CHUNK terms, their results summed in float64."""
    x32 = x.float()
    out = torch.zeros(a.shape[0], x.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], CHUNK):
        out += (a[:, start : start + CHUNK] @ x32[start : start + CHUNK]).double()
    return out

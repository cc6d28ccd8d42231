"""The certificate of a profile entry: what bounds the paper-mode error, measured at build time.

Notation as in ``safelora_cli.math.lowrank``: V (out, in), ν = ‖V‖_F, M = V Vᵀ with eigenvalues
λ_1 ≥ λ_2 ≥ ..., the stored Û (out, k) and ŝ (k,), M̂ = Û diag(ŝ²) Ûᵀ. Pure torch, no I/O.

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

Without the spectrum (``certify_probed``, the randomized route): (ii) needs λ, so t̄ is instead
the least of (i) and the probed bound on ‖Q V‖²_2 (``math.probe``: a randomized block Krylov
space of Q V with Kuczyński–Woźniakowski's bound), which holds except with probability at most
1e-12 per weight, stated in the profile. f, c and (i) are measured as above.

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

from safelora_cli.math.probe import probe_seed, tail_bound

BLOCK_ELEMENTS = 1 << 21  # float64 elements per row/column block (16 MiB)
# the passes that only multiply by k columns: blocks that stay in cache (1 MiB; 25-60% faster
# than 16 MiB ones on a 2048 x 5632 V)
PASS_ELEMENTS = 1 << 17
_UNIT64 = 2.0**-53


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


def rounding_allowance(out: int, inp: int, v_norm: float) -> float:
    """η, the float64 rounding allowance (module docstring)."""
    return 8.0 * (out + inp) * _UNIT64 * v_norm**2


def row_blocks(
    v: torch.Tensor, elements: int | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Row blocks of V in float64 (``elements`` each, default BLOCK_ELEMENTS), so memory stays
    O(block)."""
    rows = max(1, (elements or BLOCK_ELEMENTS) // max(1, v.shape[1]))
    for start in range(0, v.shape[0], rows):
        yield slice(start, start + rows), v[start : start + rows].double()


def gram64(v: torch.Tensor) -> torch.Tensor:
    """The float64 Gram matrix of V's shorter side: V Vᵀ (out <= in) or Vᵀ V."""
    out, inp = v.shape
    if out > inp:
        gram = torch.zeros(inp, inp, dtype=torch.float64, device=v.device)
        for _, block in row_blocks(v):
            gram.addmm_(block.T, block)
        return gram
    gram = torch.zeros(out, out, dtype=torch.float64, device=v.device)
    cols = max(1, BLOCK_ELEMENTS // max(1, out))
    for start in range(0, inp, cols):
        block = v[:, start : start + cols].double()
        gram.addmm_(block, block.T)
    return gram


def project_rows(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """X = Zᵀ V, (k, in) float64, one pass over V."""
    x = torch.zeros(z.shape[1], v.shape[1], dtype=torch.float64, device=v.device)
    for rows, block in row_blocks(v, min(BLOCK_ELEMENTS, PASS_ELEMENTS)):
        x.addmm_(z[rows].T, block)
    return x


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
    x = project_rows(v, z)
    f = _sym_norm(x @ x.T - (r * s.double() ** 2) @ r.T) + eta
    tail_energy, cct = 0.0, torch.zeros(k, k, dtype=torch.float64, device=v.device)
    for rows, block in row_blocks(v):
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


@dataclass(frozen=True)
class Probed:
    """``certify_probed``'s result: the certificate, the probability that its tail is not a
    bound, and ``floor`` ≤ λ_{k+1}: min(ρ_k, θ) − c − η, since span(Z, w) with w ⊥ Z the probe's
    top direction (Rayleigh quotient ≥ θ) compresses M to a matrix whose least eigenvalue is at
    least that (Courant–Fischer). Every bound with exact vectors is ≥ λ_{k+1} ≥ floor, so
    operator_bound / floor says how much looser this certificate can be than the exact one."""

    certificate: Certificate
    failure: float
    floor: float


def certify_probed(
    v: torch.Tensor, u: torch.Tensor, s: torch.Tensor, eta: float, salt: float
) -> Probed:
    """``certify`` without V's spectrum: f, c and ‖Q V‖²_F as there, in one pass over column
    blocks of V, and t̄ from ``probe.tail_bound`` on the residual Q V (stored in float32, which
    moves ‖Q V‖_2 by at most 2⁻²⁴ ‖Q V‖_F). sigma_max is √ρ_1 (≤ σ_1, so the relative error is
    not understated); sigma_next is √θ, the probe's estimate of ‖Q V‖_2 (no bound uses it).

    Returns:
        ``Probed``: the certificate, P(t̄ is not a bound) (``probe``), a lower bound on λ_{k+1}.
    """
    out, inp = v.shape
    k = u.shape[1]
    z, r = torch.linalg.qr(u.double())
    x = torch.empty(k, inp, dtype=torch.float64, device=v.device)
    residual = torch.empty(out, inp, dtype=torch.float32, device=v.device)
    cross = torch.zeros(k, out, dtype=torch.float64, device=v.device)
    tail_energy = 0.0
    cols = max(1, min(BLOCK_ELEMENTS, PASS_ELEMENTS) // max(1, out))
    for start in range(0, inp, cols):
        block = v[:, start : start + cols].double()
        xb = z.T @ block
        block -= z @ xb  # the residual Q V, these columns
        x[:, start : start + cols] = xb
        tail_energy += float(torch.linalg.vector_norm(block)) ** 2
        cross.addmm_(xb, block.T)
        residual[:, start : start + cols] = block
    f = _sym_norm(x @ x.T - (r * s.double() ** 2) @ r.T) + eta
    c = math.sqrt(max(_sym_norm(cross @ cross.T), 0.0)) + eta
    tail_energy += eta
    rho = torch.linalg.eigvalsh(x @ x.T)
    frobenius = math.sqrt(tail_energy) * (1.0 + 2.0**-20)
    found = tail_bound(residual, frobenius, probe_seed(residual, salt))
    stored = 2.0**-24 * frobenius  # ‖R − fl32(R)‖_2 ≤ 2⁻²⁴ ‖R‖_F
    tail = (math.sqrt(found.bound) + stored) ** 2 + eta
    certificate = Certificate(
        math.sqrt(max(float(rho[-1]), 0.0)),
        math.sqrt(found.ritz),
        tail_energy,
        c,
        f,
        min(tail_energy, tail),
    )
    top = found.ritz - found.allowance - 2.0 * stored * math.sqrt(found.bound) - eta
    floor = min(float(rho[0]) - eta, top) - c - eta
    return Probed(certificate, found.failure if tail < tail_energy else 0.0, floor)

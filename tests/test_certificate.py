"""The profile's certificate and cosine bound, pinned against independent dense float64 math.

``test_profile_math`` checks that the bound *holds*; a bound that holds can still be wrong in a way
no such test sees (halved, or missing a term, it often still holds on friendly inputs). Here:

- the cosine bound ``score_entry`` reports equals sqrt(2 − 2 sqrt(1 − δ²)), δ = β / ‖M̂ Y‖_F,
  β = sqrt((f a + c b)² + (c a + t̄ b)²), with a = ‖P Y‖_F, b = ‖Q Y‖_F and ‖M̂ Y‖_F computed
  here densely from Û, ŝ, A and B (P the orthogonal projector onto range(Û));
- the certificate is sound on noisy bases, each block checked densely over many seeds: t̄ ≥
  ‖Q V‖²_2, the residual energy ≥ ‖Q V‖²_F, c ≥ ‖P M Q‖_2, f ≥ ‖P (M − M̂) P‖_2 and the operator
  bound e ≥ ‖M − M̂‖_2 (M = V Vᵀ, M̂ = Û diag(ŝ²) Ûᵀ).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from safelora_cli.math.certificate import Certificate, certify, rounding_allowance
from safelora_cli.math.lowrank import LOWRANK, LowRank
from safelora_cli.math.lowrank_score import score_entry
from tests.helpers import with_spectrum

SEEDS = range(24)
NOISES = (1e-3, 0.05, 0.5)


@functools.lru_cache(maxsize=64)
def _matrix(
    out: int, inp: int, decay: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """V (float32) with σ_i = i^-decay, its left singular vectors, λ (descending) and ‖V‖_F."""
    v = with_spectrum(out, inp, [(i + 1) ** -decay for i in range(min(out, inp))], seed=seed)
    v = v.float()
    u_full = torch.linalg.svd(v.double(), full_matrices=False)[0]
    lam = torch.linalg.eigvalsh(v.double() @ v.double().T).flip(0).clamp_min(0.0)
    return v, u_full, lam, float(torch.linalg.vector_norm(v.double()))


def noisy_entry(out: int, inp: int, k: int, decay: float, noise: float, seed: int) -> LowRank:
    """V with σ_i = i^-decay; Û its top-k singular vectors plus ``noise`` (orthonormalised),
    ŝ the Ritz values (singular values of ÛᵀV); the certificate measured as at build time."""
    v, u_full, lam, v_norm = _matrix(out, inp, decay, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    noisy = u_full[:, :k] + noise * torch.randn(out, k, generator=gen, dtype=torch.float64)
    u, _ = torch.linalg.qr(noisy)
    s = torch.linalg.svdvals(u.T @ v.double())
    cert = certify(v, u.float(), s.float(), lam, rounding_allowance(out, inp, v_norm))
    return LowRank((out, inp), v_norm, LOWRANK, cert, u.float(), s.float(), v=v)


def dense_blocks(entry: LowRank) -> dict[str, float]:
    """The certificate's quantities, computed densely in float64 from V, Û, ŝ."""
    assert entry.v is not None
    assert entry.u is not None
    assert entry.s is not None
    v, u, s = entry.v.double(), entry.u.double(), entry.s.double()
    p = u @ torch.linalg.pinv(u)  # the orthogonal projector onto range(Û)
    q = torch.eye(len(p), dtype=torch.float64) - p
    m = v @ v.T
    m_hat = (u * s**2) @ u.T
    qv = q @ v
    return {
        "tail": float(torch.linalg.matrix_norm(qv, 2)) ** 2,
        "tail_energy": float(torch.linalg.matrix_norm(qv)) ** 2,
        "cross": float(torch.linalg.matrix_norm(p @ m @ q, 2)),
        "ritz": float(torch.linalg.matrix_norm(p @ (m - m_hat) @ p, 2)),
        "operator": float(torch.linalg.matrix_norm(m - m_hat, 2)),
    }


@pytest.mark.parametrize(("out", "inp", "k"), [(24, 18, 4), (18, 24, 6), (20, 20, 1)])
@pytest.mark.parametrize("decay", [0.0, 0.5, 1.5])
def test_the_certificate_is_sound_on_noisy_bases(out: int, inp: int, k: int, decay: float) -> None:
    """Every block of the certificate bounds its dense value, for many seeds and noise levels
    (a noisy Û makes c and f large, which is where a missing term of t̄ shows)."""
    tight = 0
    for seed in SEEDS:
        for noise in NOISES:
            entry = noisy_entry(out, inp, k, decay, noise, seed)
            cert, dense = entry.certificate, dense_blocks(entry)
            slack = 1e-9 * entry.v_norm**2
            assert cert.tail + slack >= dense["tail"], (seed, noise, cert, dense)
            assert cert.tail_energy + slack >= dense["tail_energy"], (seed, noise)
            assert cert.cross + slack >= dense["cross"], (seed, noise)
            assert cert.ritz + slack >= dense["ritz"], (seed, noise)
            assert cert.operator_bound + slack >= dense["operator"], (seed, noise, cert, dense)
            tight += cert.tail < 0.999 * cert.tail_energy  # t̄ from the gap, not the residual
    assert tight > 0  # the gap argument was exercised, not only the residual energy


def dense_cosine_bound(entry: LowRank, a: torch.Tensor, b: torch.Tensor) -> float:
    """sqrt(2 − 2 sqrt(1 − δ²)) from dense float64 matrices (``math.certificate``)."""
    assert entry.u is not None
    assert entry.s is not None
    u, s = entry.u.double(), entry.s.double()
    y = b.double() @ a.double()
    p = u @ torch.linalg.pinv(u)
    inside = float(torch.linalg.matrix_norm(p @ y))
    outside = float(torch.linalg.matrix_norm(y - p @ y))
    m_hat_y = float(torch.linalg.matrix_norm((u * s**2) @ (u.T @ y)))
    cert = entry.certificate
    f, c, t = cert.ritz, cert.cross, cert.tail
    beta = math.sqrt((f * inside + c * outside) ** 2 + (c * inside + t * outside) ** 2)
    delta = beta / m_hat_y
    return 2.0 if delta >= 1.0 else math.sqrt(2.0 - 2.0 * math.sqrt(1.0 - delta**2))


def _factors(entry: LowRank, seed: int, lean: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B with B = ``lean`` of Û's span plus the rest noise (rank 3)."""
    assert entry.u is not None
    out, inp = entry.shape
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3, inp, generator=gen, dtype=torch.float64)
    inside = entry.u.double() @ torch.randn(entry.u.shape[1], 3, generator=gen, dtype=torch.float64)
    noise = torch.randn(out, 3, generator=gen, dtype=torch.float64)
    b = lean * inside / inside.norm() + (1 - lean) * noise / noise.norm()
    return a.float(), b.float()


@pytest.mark.parametrize("noise", [0.0, 1e-3, 1e-2])
@pytest.mark.parametrize("seed", range(6))
def test_the_cosine_bound_equals_its_formula_computed_densely(noise: float, seed: int) -> None:
    """The reported bound is the formula's value (relative 1e-6), not merely above the error:
    halving it, or dropping any of f·a, c·b, c·a, t̄·b from β, fails here."""
    entry = noisy_entry(48, 36, 6, 0.7, noise, seed)
    checked = 0
    for lean in (0.9, 0.99):
        a, b = _factors(entry, seed, lean)
        bound = score_entry(entry, a, b).cosine_bound
        want = dense_cosine_bound(entry, a, b)
        assert bound is not None
        assert bound == pytest.approx(want, rel=1e-6, abs=1e-12), (bound, want)
        checked += 0.0 < want < 2.0
    assert checked  # a bound that says something (not the trivial 2) was compared


def test_every_term_of_the_bound_matters_on_these_cases() -> None:
    """The cases above are strong enough to see each term: dropping any one of them moves the
    formula's value by far more than the comparison's tolerance."""
    entry = noisy_entry(48, 36, 6, 0.7, 1e-2, 0)
    a, b = _factors(entry, 0, 0.9)
    full = dense_cosine_bound(entry, a, b)
    assert full < 1.0
    cert = entry.certificate
    for field in ("ritz", "cross", "tail"):
        values = {f: getattr(cert, f) for f in ("sigma_max", "sigma_next", "tail_energy",
                                                "cross", "ritz", "tail")}  # fmt: skip
        values[field] = 0.0
        weaker = LowRank(entry.shape, entry.v_norm, LOWRANK, Certificate(**values), entry.u,
                         entry.s)  # fmt: skip
        assert dense_cosine_bound(weaker, a, b) < full * (1 - 1e-3), field

"""Profile entries (``lowrank``, ``lowrank_score``) against a dense float64 reference.

Subspace mode through a profile equals U_k U_kᵀ B built densely; in paper mode the stated bound on
|cosine − exact cosine| holds on spectra decaying as i^-1, i^-1/2, flat and exactly low-rank, with
exact and randomized singular vectors, and for any stored basis at all (the certificate is
measured, never assumed); the rank rule keeps the smallest k within the tolerance, or stores V
whole; selections from profile cosines agree with exact ones wherever the bounds separate them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safelora_cli.errors import IncompatibleInputError, UsageError
from safelora_cli.math import certificate, lowrank, probe, projection
from safelora_cli.math.certificate import certify
from safelora_cli.math.lowrank import (
    EXACT,
    LOWRANK,
    RANDOMIZED,
    WHOLE,
    ZERO,
    LowRank,
    RankRule,
    decompose,
)
from safelora_cli.math.lowrank_score import score_entry, uncertain_modules
from safelora_cli.math.projection import score_module
from safelora_cli.math.reasons import ZERO_DELTA, ZERO_V
from safelora_cli.math.selection import select_modules
from safelora_cli.settings import Projection, ProjectionSpec
from tests.helpers import dense_k, dense_subspace, factors, rel_err, with_spectrum

SUBSPACE = Projection.SUBSPACE
NUMBER, THRESHOLD = "number", "threshold"
TOL = 1e-5


def fixed(k: int) -> RankRule:
    return RankRule(rank=k, tolerance=None)


def power(n: int, p: float) -> list[float]:
    """σ_i = i^-p, i = 1..n."""
    return [(i + 1) ** -p for i in range(n)]


SPECTRA = {
    "i^-1": lambda n: power(n, 1.0),
    "i^-0.5": lambda n: power(n, 0.5),
    "flat": lambda n: [1.0] * n,
    "rank 6": lambda n: power(6, 1.0),  # exactly low rank
}


def dense_paper(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(Ĉ B, cos(Ĉ B A, B A)) with Ĉ = V Vᵀ / ‖V‖_F built in full, float64."""
    v64, a64, b64 = v.double(), a.double(), b.double()
    c = v64 @ v64.T / torch.linalg.matrix_norm(v64)
    ba = b64 @ a64
    cosine = torch.nn.functional.cosine_similarity((c @ ba).flatten(), ba.flatten(), 0)
    return c @ b64, float(cosine)


def adapters(
    v: torch.Tensor, count: int = 6, r: int = 4, seed: int = 7
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) pairs whose B leans from pure noise (0) to inside span(V) (1)."""
    gen = torch.Generator().manual_seed(seed)
    out, inp = v.shape
    found = []
    for i in range(count):
        lean = i / max(1, count - 1)
        inside = v.double() @ torch.randn(inp, r, generator=gen, dtype=torch.float64)
        noise = torch.randn(out, r, generator=gen, dtype=torch.float64)
        b = lean * inside / inside.norm() + (1 - lean) * noise / noise.norm()
        a = torch.randn(r, inp, generator=gen, dtype=torch.float64)
        found.append((a.float(), b.float()))
    return found


@pytest.fixture
def small_randomized(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the randomized path from min(out, in) > 32 on, so small matrices exercise it
    (``test_randomized_certificate_is_near_the_ideal`` keeps the real threshold)."""
    monkeypatch.setattr(projection, "EXACT_SVD_MAX_DIM", 32)
    monkeypatch.setattr(lowrank, "EXACT_SVD_MAX_DIM", 32)


def entry_of(v: torch.Tensor, rule: RankRule, method: str = EXACT) -> LowRank:
    return decompose(v, float(torch.linalg.vector_norm(v.double())), rule, method)


def assert_bound_holds(v: torch.Tensor, entry: LowRank, count: int = 6) -> list[float]:
    """For each adapter: |profile cosine − dense cosine| ≤ bound, and ‖Ĉ_k B − Ĉ B‖ within
    ``error_bound``; returns the errors."""
    errors = []
    for a, b in adapters(v, count):
        score = score_entry(entry, a, b)
        pb, cosine = dense_paper(v, a, b)
        assert score.cosine is not None
        assert score.cosine_bound is not None
        assert score.projected_b is not None
        errors.append(abs(score.cosine - cosine))
        assert errors[-1] <= score.cosine_bound + 1e-9
        b_error = float(torch.linalg.vector_norm(score.projected_b.double() - pb))
        rounding = 1e-6 * float(torch.linalg.vector_norm(pb))  # Ĉ_k B is returned in float32
        assert b_error <= entry.error_bound * float(torch.linalg.vector_norm(b)) + rounding
    return errors


# --- subspace mode: exact where the SVD is -----------------------------------------------------


def geometric(n: int, ratio: float = 0.85) -> list[float]:
    return [ratio**i for i in range(n)]


@pytest.mark.parametrize(("out", "inp"), [(64, 48), (48, 64), (96, 96)])
@pytest.mark.parametrize("j", [1, 3, 8])
def test_subspace_through_profile_equals_dense(out: int, inp: int, j: int) -> None:
    v = with_spectrum(out, inp, geometric(min(out, inp)), seed=out + inp).float()
    entry = entry_of(v, fixed(8))
    assert (entry.kind, entry.rank, entry.method) == (LOWRANK, 8, EXACT)
    a, b = factors(out, inp)
    score = score_entry(entry, a, b, ProjectionSpec(SUBSPACE, rank=j), "m")
    pb, cosine, captured = dense_subspace(v.double(), b, a, j)
    assert score.projected_b is not None
    assert score.cosine is not None
    assert rel_err(score.projected_b, pb) <= TOL
    assert score.cosine == pytest.approx(cosine, abs=TOL)
    assert score.captured_energy == pytest.approx(captured, abs=TOL)
    assert (score.subspace_rank, score.profile_rank, score.cosine_bound) == (j, 8, None)


def test_subspace_through_a_randomized_profile_with_a_gap() -> None:
    """600 x 500 (randomized path), eight strong directions then a 50x drop."""
    gap = [1.0 - 0.05 * i for i in range(8)] + [0.01 / (i + 1) for i in range(400)]
    v = with_spectrum(600, 500, gap, seed=5).float()
    entry = entry_of(v, fixed(8), RANDOMIZED)
    assert entry.method == RANDOMIZED
    a, b = factors(600, 500)
    score = score_entry(entry, a, b, ProjectionSpec(SUBSPACE, rank=8))
    assert score.projected_b is not None
    assert rel_err(score.projected_b, dense_subspace(v.double(), b, a, 8)[0]) <= 1e-4


@pytest.mark.parametrize("energy", [0.2, 0.5, 0.75, 0.9])
def test_subspace_energy_within_what_is_stored(energy: float) -> None:
    v = with_spectrum(80, 60, geometric(60, 0.8), seed=2).float()
    entry = entry_of(v, fixed(12))
    k = dense_k(v, energy)
    assert k <= 12
    a, b = factors(80, 60)
    score = score_entry(entry, a, b, ProjectionSpec(SUBSPACE, energy=energy))
    assert score.subspace_rank == k
    assert score.projected_b is not None
    assert rel_err(score.projected_b, dense_subspace(v.double(), b, a, k)[0]) <= TOL


@pytest.mark.parametrize(
    ("spec", "said"),
    [(ProjectionSpec(SUBSPACE, rank=13), "--rank 13"),
     (ProjectionSpec(SUBSPACE, energy=0.999), "--energy 0.999")],
)  # fmt: skip
def test_subspace_beyond_the_stored_rank_is_exit_4(spec: ProjectionSpec, said: str) -> None:
    v = with_spectrum(80, 60, geometric(60, 0.8), seed=2).float()
    entry = entry_of(v, fixed(12))
    a, b = factors(80, 60)
    with pytest.raises(IncompatibleInputError) as caught:
        score_entry(entry, a, b, spec, "model.layers.3.mlp.up_proj")
    assert caught.value.exit_code == 4
    for part in (said, "model.layers.3.mlp.up_proj", "rank 12"):
        assert part in caught.value.message


# --- paper mode: the bound holds ---------------------------------------------------------------


@pytest.mark.usefixtures("small_randomized")
@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("method", [EXACT, RANDOMIZED])
@pytest.mark.parametrize(("out", "inp"), [(160, 120), (120, 160)])
def test_paper_bound_holds(spectrum: str, method: str, out: int, inp: int) -> None:
    v = with_spectrum(out, inp, SPECTRA[spectrum](min(out, inp)), seed=out).float()
    entry = entry_of(v, fixed(16), method)
    assert entry.method == method or spectrum == "flat"  # flat: no gap, randomized is redone
    errors = assert_bound_holds(v, entry)
    if spectrum == "rank 6":  # k > rank: the profile is exact
        assert max(errors) <= 1e-6
        assert entry.relative_error <= 1e-6


def test_bound_is_not_trivial_on_a_decaying_spectrum() -> None:
    """The bound must say something: below 0.05 for every adapter at k = 32 on i^-1."""
    v = with_spectrum(160, 120, power(120, 1.0), seed=1).float()
    entry = entry_of(v, fixed(32))
    for a, b in adapters(v):
        bound = score_entry(entry, a, b).cosine_bound
        assert bound is not None
        assert bound < 0.05


@pytest.mark.parametrize("wrong_values", [False, True])
def test_bound_holds_for_any_stored_basis(wrong_values: bool) -> None:
    """A random Û (what a badly converged randomized SVD could give), with its Ritz values or
    with values twice too large: the certificate measures how bad it is, the bound still holds."""
    v = with_spectrum(120, 90, power(90, 0.7), seed=3).float()
    v_norm = float(torch.linalg.vector_norm(v.double()))
    gen = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(120, 10, generator=gen, dtype=torch.float64))
    s = torch.linalg.svdvals(u.T @ v.double()) * (2.0 if wrong_values else 1.0)
    lam = torch.linalg.eigvalsh(v.double() @ v.double().T).flip(0).clamp_min(0.0)
    cert = certify(v, u.float(), s.float(), lam, eta=1e-12)
    entry = LowRank((120, 90), v_norm, LOWRANK, cert, u.float(), s.float())
    assert cert.tail > float(lam[10])  # the tail is not the ideal σ²_11 here
    assert_bound_holds(v, entry)


@settings(derandomize=True, max_examples=25, deadline=None)
@given(
    decay=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]),
    shape=st.sampled_from([(40, 30), (30, 40), (36, 36)]),
    k=st.integers(1, 12),
    noise=st.sampled_from([0.0, 1e-3, 0.1, 0.5]),
    seed=st.integers(0, 1000),
)
def test_bound_holds_property(
    decay: float, shape: tuple[int, int], k: int, noise: float, seed: int
) -> None:
    """Exact top-k vectors perturbed by ``noise`` (then orthonormalised), any decay and k."""
    out, inp = shape
    v = with_spectrum(out, inp, power(min(shape), decay), seed=seed).float()
    gen = torch.Generator().manual_seed(seed)
    u_exact = torch.linalg.svd(v.double(), full_matrices=False)[0][:, :k]
    u, _ = torch.linalg.qr(
        u_exact + noise * torch.randn(out, k, generator=gen, dtype=torch.float64)
    )
    s = torch.linalg.svdvals(u.T @ v.double())
    lam = torch.linalg.eigvalsh(v.double() @ v.double().T).flip(0).clamp_min(0.0)
    cert = certify(v, u.float(), s.float(), lam, eta=1e-12)
    v_norm = float(torch.linalg.vector_norm(v.double()))
    assert_bound_holds(v, LowRank(shape, v_norm, LOWRANK, cert, u.float(), s.float()), count=3)


# --- the rank rule -----------------------------------------------------------------------------


@pytest.mark.usefixtures("small_randomized")
@pytest.mark.parametrize("tolerance", [0.1, 0.01, 0.001])
@pytest.mark.parametrize("method", [EXACT, RANDOMIZED])
def test_tolerance_keeps_the_smallest_k_within_it(tolerance: float, method: str) -> None:
    v = with_spectrum(200, 150, power(150, 1.0), seed=8).float()
    entry = entry_of(v, RankRule(tolerance=tolerance), method)
    s2 = torch.linalg.svdvals(v.double()) ** 2 / float(torch.linalg.svdvals(v.double())[0] ** 2)
    k = entry.rank
    assert entry.kind == LOWRANK
    assert entry.relative_error <= tolerance
    assert float(s2[k]) <= tolerance  # σ²_{k+1} within
    if method == EXACT:
        assert tolerance < float(s2[k - 1])  # the smallest such k
    else:  # k aims below the budget, as the probed tail may exceed σ²_{k+1} by 1/(1 − ε)
        assert entry.method == RANDOMIZED
        aim = lowrank.PROBE_MARGIN * tolerance
        assert k <= int(torch.nonzero(s2 <= 0.9 * aim)[0])  # but not much further
    assert_bound_holds(v, entry, count=3)


@pytest.mark.parametrize(
    ("spectrum", "max_rank"), [("flat", 256), ("i^-0.5", 16)]
)  # i^-0.5 needs k = 99 for 0.01, beyond 16
def test_tolerance_out_of_reach_stores_v_whole(spectrum: str, max_rank: int) -> None:
    v = with_spectrum(160, 120, SPECTRA[spectrum](120), seed=9).float()
    entry = entry_of(v, RankRule(tolerance=0.01, max_rank=max_rank), lowrank.AUTO)
    assert entry.kind == WHOLE
    assert entry.v is not None
    assert torch.equal(entry.v, v)
    assert (entry.rank, entry.relative_error, entry.captured_energy) == (120, 0.0, 1.0)
    for a, b in adapters(v, 3):
        whole, pair = score_entry(entry, a, b), score_module(v, a, b, v_norm=entry.v_norm)
        assert whole.cosine == pair.cosine
        assert whole.projected_b is not None
        assert pair.projected_b is not None
        assert torch.equal(whole.projected_b, pair.projected_b)
        assert (whole.cosine_bound, whole.profile_rank) == (0.0, 120)


def test_rank_reaching_in_stores_whole_and_reaching_out_is_exact() -> None:
    tall = with_spectrum(64, 48, power(48, 1.0), seed=10).float()
    assert entry_of(tall, fixed(48)).kind == WHOLE  # U_48 would be as big as V
    wide = with_spectrum(48, 64, power(48, 1.0), seed=10).float()
    entry = entry_of(wide, fixed(100))
    assert (entry.kind, entry.rank) == (LOWRANK, 48)  # U is 48 x 48: M = U S² Uᵀ exactly
    assert entry.relative_error <= 1e-6
    assert max(assert_bound_holds(wide, entry)) <= 1e-6


def test_randomized_certificate_is_near_the_ideal() -> None:
    """With oversampling and power iterations the certified tail is within 25% of σ²_{k+1}."""
    v = with_spectrum(600, 500, power(500, 1.0), seed=11).float()
    entry = entry_of(v, fixed(12), lowrank.AUTO)
    assert entry.method == RANDOMIZED  # k = 12 is small against 500
    ideal = float(torch.linalg.svdvals(v.double())[12] ** 2)
    assert entry.certificate.operator_bound <= lowrank.RANDOMIZED_SLACK * ideal


@pytest.mark.usefixtures("small_randomized")
def test_a_poor_randomized_basis_is_replaced_by_the_exact_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sketch whose σ̂ are right but whose vectors are random: the probed certificate is far
    above its floor (a lower bound on σ²_{k+1}), so the exact route decides."""
    v = with_spectrum(200, 150, power(150, 1.0), seed=12).float()
    gen = torch.Generator().manual_seed(0)
    poor = torch.randn(200, 40, generator=gen, dtype=torch.float64)
    sigma = torch.linalg.svdvals(v.double())
    monkeypatch.setattr(lowrank, "_sketch", lambda v, width, niter: (poor[:, :width], sigma))
    entry = entry_of(v, fixed(16), lowrank.AUTO)
    assert entry.method == EXACT
    ideal = float(torch.linalg.svdvals(v.double())[16] ** 2)
    assert entry.certificate.operator_bound <= ideal + 1e-6  # float32 storage of Û


@pytest.mark.usefixtures("small_randomized")
def test_a_randomized_entry_missing_the_tolerance_gets_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """σ̂ that understate the tail (as a sketch's do) pick a k that misses T; k then grows by the
    measured excess, once per sketch (the first sketch is too narrow for it, the second is not),
    and the entry meets T."""
    v = with_spectrum(200, 150, power(150, 0.5), seed=14).float()
    exact_u, sigma, _ = torch.linalg.svd(v.double(), full_matrices=False)
    understated = torch.cat([sigma[:1], 0.6 * sigma[1:]])
    monkeypatch.setattr(
        lowrank, "_sketch", lambda v, width, niter: (exact_u[:, :width], understated)
    )
    calls: list[int] = []
    probed = lowrank._probed_entry

    def spy(*args: object) -> tuple[LowRank, float]:
        calls.append(args[3].shape[1])  # type: ignore[attr-defined]
        return probed(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(lowrank, "_probed_entry", spy)
    tolerance = 1 / 21 + 1e-6
    entry = entry_of(v, RankRule(tolerance=tolerance), RANDOMIZED)
    assert entry.method == RANDOMIZED
    assert calls[0] == calls[-2] < calls[-1] == entry.rank  # the first k, then the roomy one
    assert entry.relative_error <= tolerance
    assert_bound_holds(v, entry, count=3)


@pytest.mark.usefixtures("small_randomized")
def test_randomized_entries_are_deterministic() -> None:
    v = with_spectrum(200, 150, power(150, 0.5), seed=13).float()
    first, second = entry_of(v, fixed(8), RANDOMIZED), entry_of(v, fixed(8), RANDOMIZED)
    assert first.u is not None
    assert second.u is not None
    assert torch.equal(first.u, second.u)
    assert first.certificate == second.certificate


@pytest.mark.parametrize(
    "kwargs",
    [{"rank": 4, "tolerance": 0.1}, {"rank": None, "tolerance": None},
     {"rank": 0, "tolerance": None}, {"tolerance": 0.0}, {"tolerance": 1.0},
     {"tolerance": 0.1, "max_rank": 0}],
)  # fmt: skip
def test_rank_rule_refuses_what_cannot_work(kwargs: dict[str, float | None]) -> None:
    with pytest.raises(UsageError):
        RankRule(**kwargs)  # type: ignore[arg-type]


def test_an_unknown_method_is_refused() -> None:
    with pytest.raises(UsageError, match="svd"):
        decompose(torch.ones(4, 4), 4.0, fixed(1), "svd")


def test_zero_v_and_zero_delta_are_skipped() -> None:
    zero = entry_of(torch.zeros(20, 30), fixed(4))
    assert (zero.kind, zero.rank) == (ZERO, 0)
    a, b = factors(20, 30)
    assert score_entry(zero, a, b).skipped == ZERO_V
    v = with_spectrum(20, 30, power(20, 1.0)).float()
    score = score_entry(entry_of(v, fixed(4)), a, torch.zeros_like(b))
    assert (score.skipped, score.cosine) == (ZERO_DELTA, None)


# --- bf16-derived V, as the synthetic pair and a realistic slow one ----------------------------


def bf16_v(out: int, inp: int, sigmas: list[float], seed: int = 0) -> torch.Tensor:
    """V = bf16(W + Δ) − bf16(W) in float32, Δ with these σ's scaled to 2% of ‖W‖_F."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) / math.sqrt(inp)
    delta = with_spectrum(out, inp, sigmas, seed=seed + 1).float()
    delta *= 0.02 * float(w.norm()) / float(delta.norm())
    return (w + delta).bfloat16().float() - w.bfloat16().float()


@pytest.mark.parametrize(("sigmas", "most_k"), [([1.0] * 4, 4), (power(96, 0.5), 96)])
def test_default_rule_on_bf16_derived_v(sigmas: list[float], most_k: int) -> None:
    """The synthetic pair's rank-4 update (k = 4: the bf16 floor is far below 1%), and a
    realistic slowly decaying one: the default tolerance is met and the bound holds."""
    v = bf16_v(128, 96, sigmas)
    entry = entry_of(v, RankRule(), lowrank.AUTO)
    assert entry.relative_error <= lowrank.DEFAULT_TOLERANCE
    assert entry.kind == WHOLE or entry.rank <= most_k
    if most_k == 4:
        assert entry.rank == 4
    assert_bound_holds(v, entry)


def synthetic_v(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """V of ``synthetic.make_pair`` (the bench's pair): a rank-4 update of 2% over a random W,
    both rounded to bf16."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) / math.sqrt(inp)
    delta = torch.randn(out, 4, generator=gen) @ torch.randn(4, inp, generator=gen)
    delta *= 0.02 / math.sqrt(4 * inp)
    return (w + delta).bfloat16().float() - w.bfloat16().float()


def test_the_randomized_basis_certifies_near_the_ideal_on_the_synthetic_pair() -> None:
    """The randomized Û of a rank-4 update over the bf16 floor, with the probed tail: within
    RANDOMIZED_SLACK of the ideal σ²_{k+1}, the exact certificate at the same k (1.14x measured:
    the probe's 1/(1 − ε) with ε = 0.1, and its float32 rounding allowance)."""
    v = synthetic_v(1024, 512)
    entry = entry_of(v, RankRule(), lowrank.AUTO)
    assert (entry.method, entry.rank) == (RANDOMIZED, 4)
    assert 0.0 < entry.failure <= probe.FAILURE_PROBABILITY
    ideal = float(torch.linalg.svdvals(v.double())[4] ** 2)
    assert ideal <= entry.certificate.operator_bound <= lowrank.RANDOMIZED_SLACK * ideal
    assert_bound_holds(v, entry)


# --- selection ---------------------------------------------------------------------------------


def selection_flags(spectra: list[str]) -> tuple[int, int]:
    """Score 6 adapters per spectrum through rank-8 profiles; for every threshold and every K,
    check that each module whose selection differs between profile and exact cosines is flagged
    uncertain. Returns (cuts with nothing uncertain, cuts where a selection really differs)."""
    cosines, exact, bounds = {}, {}, {}
    for s, spectrum in enumerate(spectra):
        v = with_spectrum(60, 50, SPECTRA[spectrum](50), seed=20 + s).float()
        entry = entry_of(v, fixed(8))
        for i, (a, b) in enumerate(adapters(v, 6, seed=s)):
            name = f"{spectrum}.{i}"
            score = score_entry(entry, a, b)
            assert score.cosine is not None
            assert score.cosine_bound is not None
            cosines[name], bounds[name] = score.cosine, score.cosine_bound
            exact[name] = dense_paper(v, a, b)[1]
    separated = flipped = 0
    cuts = [(THRESHOLD, 0, i / 40) for i in range(41)]
    cuts += [(NUMBER, k, 0.0) for k in range(1, len(cosines))]
    for mode, k, threshold in cuts:
        selected, _ = select_modules(cosines, mode, k, threshold)
        truth, _ = select_modules(exact, mode, k, threshold)
        if mode == THRESHOLD:
            uncertain = uncertain_modules(cosines, bounds, selected, threshold)
        else:
            uncertain = uncertain_modules(cosines, bounds, selected, num_layers=k)
        assert selected ^ truth <= uncertain
        separated += not uncertain
        flipped += bool(selected ^ truth)
    return separated, flipped


def test_selections_agree_wherever_the_bounds_separate_the_cosines() -> None:
    separated, _ = selection_flags(["i^-1", "rank 6"])
    assert separated  # some cuts are provably the exact ones


def test_selections_that_differ_are_all_flagged() -> None:
    """Flat spectra at rank 8 of 50: the profile cosines are far off, and every flip is flagged."""
    _, flipped = selection_flags(list(SPECTRA))
    assert flipped


@pytest.mark.parametrize(("out", "inp"), [(50, 30), (30, 50)])
def test_blocked_passes_equal_one_block(
    out: int, inp: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gram, projections and residuals run over row/column blocks (memory O(block)): blocks of
    7 elements give what one block gives."""
    v = with_spectrum(out, inp, power(min(out, inp), 1.0), seed=30).float()
    whole = entry_of(v, fixed(5))
    monkeypatch.setattr(certificate, "BLOCK_ELEMENTS", 7)
    blocked = entry_of(v, fixed(5))
    assert blocked.u is not None
    assert whole.u is not None
    assert torch.allclose(blocked.u.abs(), whole.u.abs(), atol=1e-5)
    for key in ("sigma_max", "sigma_next", "tail_energy", "tail"):
        got, want = getattr(blocked.certificate, key), getattr(whole.certificate, key)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


# --- a full fine-tune's D through a profile ------------------------------------------------------


def deltas(v: torch.Tensor, count: int = 5, seed: int = 11) -> list[torch.Tensor]:
    """D's (out, in) leaning from pure noise (0) to Ĉ's range (1), float32."""
    gen = torch.Generator().manual_seed(seed)
    out, inp = v.shape
    found = []
    for i in range(count):
        lean = i / max(1, count - 1)
        inside = (
            v.double() @ v.double().T @ torch.randn(out, inp, generator=gen, dtype=torch.float64)
        )
        noise = torch.randn(out, inp, generator=gen, dtype=torch.float64)
        d = lean * inside / inside.norm() + (1 - lean) * noise / noise.norm()
        found.append(d.float())
    return found


@pytest.mark.usefixtures("small_randomized")
@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("method", [EXACT, RANDOMIZED])
def test_a_delta_through_a_profile_stays_within_its_bound(spectrum: str, method: str) -> None:
    from safelora_cli.math.lowrank_score import score_delta_entry

    v = with_spectrum(160, 120, SPECTRA[spectrum](120), seed=3).float()
    entry = entry_of(v, fixed(16), method)
    v64 = v.double()
    c_hat = v64 @ v64.T / v64.norm()
    for d in deltas(v):
        score, pd = score_delta_entry(entry, d)
        assert pd is not None
        assert score.cosine is not None
        assert score.cosine_bound is not None
        d64 = d.double()
        exact = float(
            torch.nn.functional.cosine_similarity((c_hat @ d64).flatten(), d64.flatten(), 0)
        )
        assert abs(score.cosine - exact) <= score.cosine_bound + 1e-9
        # P D itself: Ĉ_k D = Û diag(ŝ²) Ûᵀ D / ν, and within error_bound · ‖D‖ of Ĉ D
        pd_dense = pd.left.double() @ pd.right.double()
        assert entry.u is not None
        assert entry.s is not None
        u, s = entry.u.double(), entry.s.double()
        want = u @ ((s**2)[:, None] * (u.T @ d64)) / entry.v_norm
        assert rel_err(pd_dense, want) <= 1e-5
        distance = float((pd_dense - c_hat @ d64).norm())
        assert distance <= entry.error_bound * float(d64.norm()) + 1e-6 * float(want.norm())


def test_a_delta_in_subspace_mode_is_exact_within_the_stored_rank() -> None:
    from safelora_cli.math.lowrank_score import score_delta_entry

    v = with_spectrum(120, 90, power(90, 1.0), seed=4).float()
    entry = entry_of(v, fixed(12))
    [d] = deltas(v, 1)
    score, pd = score_delta_entry(entry, d, ProjectionSpec(SUBSPACE, rank=5))
    assert pd is not None
    u = torch.linalg.svd(v.double(), full_matrices=False)[0][:, :5]
    want = u @ (u.T @ d.double())
    assert rel_err(pd.left.double() @ pd.right.double(), want) <= 1e-5
    assert score.subspace_rank == 5
    with pytest.raises(IncompatibleInputError, match="stores rank 12"):
        score_delta_entry(entry, d, ProjectionSpec(SUBSPACE, rank=20))

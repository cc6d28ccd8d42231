"""Closed-form and property tests of the Safe LoRA math (projection.py) and of selection.py.

The reference everywhere is the paper's formulas built densely in float64: Ĉ = V Vᵀ / ‖V‖_F (out x
out), the update B A (out x in), and torch's cosine similarity over the flattened matrices. The code
under test never builds either matrix; these tests show its factored form gives the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safelora_cli.math.projection import (
    ModuleScore,
    alignment_matrix,
    factored_cosine,
    paper_project,
    score_module,
)
from safelora_cli.math.reasons import ZERO_DELTA, ZERO_V
from safelora_cli.math.selection import select_modules
from safelora_cli.settings import Projection, ProjectionSpec, Select
from tests.helpers import rel_err

NUMBER, THRESHOLD = Select.NUMBER, Select.THRESHOLD
SUBSPACE = Projection.SUBSPACE

RTOL = 1e-5  # fp32 compute against a float64 dense reference
HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Dense:
    """The paper's quantities, built densely in float64."""

    cosine: float
    projected_b: torch.Tensor
    v_norm: float
    b_norm: float
    distance: float


def dense_reference(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Dense:
    """Ĉ = V Vᵀ/‖V‖_F, s = cos(Ĉ B A, B A) over flattened matrices, B' = Ĉ B; all float64."""
    v64, a64, b64 = v.double(), a.double(), b.double()
    c_hat = v64 @ v64.T / torch.linalg.matrix_norm(v64)
    ba = b64 @ a64
    cosine = F.cosine_similarity((c_hat @ ba).flatten(), ba.flatten(), dim=0)
    pb = c_hat @ b64
    return Dense(
        cosine=float(cosine),
        projected_b=pb,
        v_norm=float(torch.linalg.matrix_norm(v64)),
        b_norm=float(torch.linalg.matrix_norm(b64)),
        distance=float(torch.linalg.matrix_norm(b64 - pb)),
    )


def random_factors(
    out: int, inp: int, rank: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V (out, in), A (r, in), B (out, r), float32, seeded."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(out, inp, generator=gen) * 0.01
    a = torch.randn(rank, inp, generator=gen) / math.sqrt(inp)
    b = torch.randn(out, rank, generator=gen) * 0.1
    return v, a, b


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A (rows, cols) float64 matrix with orthonormal columns."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def scored(score: ModuleScore) -> tuple[float, torch.Tensor]:
    assert score.skipped is None
    assert score.cosine is not None
    assert score.projected_b is not None
    return score.cosine, score.projected_b


# --- factored form == dense paper formulas ------------------------------------------------------

SHAPES = [
    pytest.param(32, 32, 4, id="square-r4"),
    pytest.param(48, 48, 16, id="square-r16"),
    pytest.param(96, 24, 8, id="tall-r8"),
    pytest.param(160, 64, 1, id="tall-r1"),
    pytest.param(16, 80, 2, id="wide-r2"),
    pytest.param(24, 120, 16, id="wide-r16"),
    pytest.param(7, 5, 3, id="tiny-odd"),
]


@pytest.mark.parametrize(("out", "inp", "rank"), SHAPES)
def test_score_module_equals_dense_paper_formulas(out: int, inp: int, rank: int) -> None:
    v, a, b = random_factors(out, inp, rank, seed=out * 1000 + inp * 10 + rank)
    dense = dense_reference(v, a, b)

    score = score_module(v, a, b)
    cosine, pb = scored(score)

    assert pb.shape == (out, rank)
    assert pb.dtype == torch.float32
    assert abs(cosine - dense.cosine) <= RTOL * abs(dense.cosine)
    assert rel_err(pb, dense.projected_b) <= RTOL
    assert score.v_norm == pytest.approx(dense.v_norm, rel=RTOL)
    assert score.b_norm == pytest.approx(dense.b_norm, rel=RTOL)
    assert score.projected_b_norm == pytest.approx(
        float(torch.linalg.matrix_norm(dense.projected_b)), rel=RTOL
    )
    assert score.distance == pytest.approx(dense.distance, rel=RTOL)


@pytest.mark.parametrize(("out", "inp", "rank"), SHAPES)
def test_factored_cosine_equals_flattened_cosine_for_any_pb(out: int, inp: int, rank: int) -> None:
    """The r x r Gram form of cos(X A, B A) holds for any X, not only X = Ĉ B."""
    gen = torch.Generator().manual_seed(rank)
    _, a, b = random_factors(out, inp, rank, seed=rank + 7)
    x = torch.randn(out, rank, generator=gen)
    want = F.cosine_similarity(
        (x.double() @ a.double()).flatten(), (b.double() @ a.double()).flatten(), dim=0
    )

    cosine, ba_norm = factored_cosine(x, b, a)

    assert abs(cosine - float(want)) <= 1e-9 + RTOL * abs(float(want))
    assert ba_norm == pytest.approx(
        float(torch.linalg.matrix_norm(b.double() @ a.double())), rel=RTOL
    )


def test_paper_project_does_not_build_out_by_out_but_matches_it() -> None:
    v, _, b = random_factors(64, 40, 4, seed=3)
    v_norm = float(torch.linalg.vector_norm(v))
    got = paper_project(v, b, v_norm)
    want = (v.double() @ v.double().T / v_norm) @ b.double()
    assert rel_err(got, want) <= RTOL


@HYPOTHESIS
@given(
    out=st.integers(1, 40),
    inp=st.integers(1, 40),
    rank=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_factored_equals_dense(out: int, inp: int, rank: int, seed: int) -> None:
    v, a, b = random_factors(out, inp, rank, seed)
    dense = dense_reference(v, a, b)
    cosine, pb = scored(score_module(v, a, b))
    # Ĉ is positive semi-definite, so the paper's cosine lies in [0, 1]
    assert -1e-12 <= cosine <= 1.0
    assert abs(cosine - dense.cosine) <= 1e-6 + RTOL * abs(dense.cosine)
    assert rel_err(pb, dense.projected_b) <= 1e-4  # tiny shapes can be ill-conditioned


# --- closed-form cases --------------------------------------------------------------------------


def scaled_isometry(out: int, inp: int, k: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """V = σ U Wᵀ with orthonormal U (out, k), W (in, k): then Ĉ = (σ/√k) U Uᵀ. Returns (V, U)."""
    u, w = orthonormal(out, k, seed=1), orthonormal(inp, k, seed=2)
    return (sigma * u @ w.T).float(), u


@pytest.mark.parametrize(("out", "inp", "k"), [(32, 32, 4), (48, 20, 3), (12, 40, 1)])
def test_b_inside_span_of_v_has_cosine_one(out: int, inp: int, k: int) -> None:
    sigma = 0.05
    v, u = scaled_isometry(out, inp, k, sigma)
    gen = torch.Generator().manual_seed(0)
    rank = 3
    b = (u @ torch.randn(k, rank, generator=gen, dtype=torch.float64)).float()
    a = torch.randn(rank, inp, generator=gen)

    cosine, pb = scored(score_module(v, a, b))

    assert cosine == pytest.approx(1.0, abs=1e-6)
    # Ĉ acts on span(U) as the scalar σ²/‖V‖_F = σ/√k: B is shrunk, not kept
    assert rel_err(pb, b.double() * (sigma / math.sqrt(k))) <= RTOL


@pytest.mark.parametrize(("out", "inp", "k"), [(32, 32, 4), (48, 20, 3), (12, 40, 1)])
def test_b_orthogonal_to_span_of_v_has_cosine_zero(out: int, inp: int, k: int) -> None:
    v, u = scaled_isometry(out, inp, k, sigma=0.05)
    gen = torch.Generator().manual_seed(1)
    raw = torch.randn(out, 2, generator=gen, dtype=torch.float64)
    b = (raw - u @ (u.T @ raw)).float()
    a = torch.randn(2, inp, generator=gen)

    cosine, pb = scored(score_module(v, a, b))

    assert abs(cosine) <= 1e-5
    assert float(torch.linalg.vector_norm(pb)) <= 1e-5 * float(torch.linalg.vector_norm(b))


def test_mixed_b_cosine_is_share_of_update_inside_span() -> None:
    """B = U X + U⊥ Y: Ĉ B A = c U X A, so cos = ‖X A‖_F / ‖B A‖_F (U, U⊥ orthonormal)."""
    out, inp, k, rank = 40, 30, 5, 4
    full = orthonormal(out, out, seed=1)
    u, u_perp = full[:, :k], full[:, k:]
    v = (0.3 * u @ orthonormal(inp, k, seed=2).T).float()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(k, rank, generator=gen, dtype=torch.float64)
    y = torch.randn(out - k, rank, generator=gen, dtype=torch.float64) * 0.5
    a = torch.randn(rank, inp, generator=gen, dtype=torch.float64)
    b = u @ x + u_perp @ y
    want = float(torch.linalg.matrix_norm(x @ a) / torch.linalg.matrix_norm(b @ a))

    cosine, _ = scored(score_module(v, a.float(), b.float()))

    assert 0.05 < want < 0.95  # a case that tells 1 and 0 apart
    assert cosine == pytest.approx(want, rel=RTOL)


def test_c_hat_scales_each_singular_direction_by_sigma_squared_over_norm() -> None:
    """Ĉ is not an orthogonal projection: Ĉ u_j = σ_j² / ‖V‖_F · u_j."""
    out, inp = 24, 18
    sigmas = torch.tensor([0.9, 0.5, 0.2, 0.05], dtype=torch.float64)
    u, w = orthonormal(out, 4, seed=3), orthonormal(inp, 4, seed=4)
    v = (u * sigmas) @ w.T
    v_norm = float(torch.linalg.vector_norm(sigmas))
    a = torch.randn(1, inp, generator=torch.Generator().manual_seed(0))
    for j in range(4):
        b = u[:, j : j + 1].float()
        cosine, pb = scored(score_module(v.float(), a, b))
        assert cosine == pytest.approx(1.0, abs=1e-6)
        assert rel_err(pb, b.double() * float(sigmas[j]) ** 2 / v_norm) <= RTOL


# --- skipped modules ----------------------------------------------------------------------------


def test_zero_v_is_skipped_as_identical() -> None:
    _, a, b = random_factors(16, 12, 2, seed=0)
    score = score_module(torch.zeros(16, 12), a, b)
    assert score.skipped == ZERO_V == "base and aligned identical"
    assert score.cosine is None
    assert score.projected_b is None
    assert score.v_norm == 0.0
    assert score.b_norm == pytest.approx(float(torch.linalg.vector_norm(b)))


@pytest.mark.parametrize("zero", ["A", "B", "BA"])
def test_zero_delta_is_skipped(zero: str) -> None:
    v, a, b = random_factors(16, 12, 2, seed=0)
    if zero == "A":
        a = torch.zeros_like(a)
    elif zero == "B":
        b = torch.zeros_like(b)
    else:  # both factors non-zero, their product zero
        b[:, 1] = 0.0
        a[0, :] = 0.0
        assert float(torch.linalg.vector_norm(b @ a)) == 0.0
    score = score_module(v, a, b)
    assert score.skipped == ZERO_DELTA == "LoRA delta is zero"
    assert score.cosine is None
    assert score.projected_b is None
    assert score.v_norm > 0.0


def test_non_finite_v_is_flagged_not_scored() -> None:
    v, a, b = random_factors(8, 8, 2, seed=0)
    v[3, 3] = float("inf")
    score = score_module(v, a, b)
    assert not math.isfinite(score.v_norm)
    assert score.cosine is None
    assert score.projected_b is None


# --- invariances (hypothesis) -------------------------------------------------------------------

scales = st.floats(min_value=1e-2, max_value=1e2).flatmap(lambda x: st.sampled_from([x, -x]))


@HYPOTHESIS
@given(seed=st.integers(0, 2**31 - 1), sa=scales, sb=scales)
def test_property_cosine_invariant_to_scaling_a_and_b(seed: int, sa: float, sb: float) -> None:
    v, a, b = random_factors(20, 14, 3, seed)
    cosine, _ = scored(score_module(v, a, b))
    scaled, _ = scored(score_module(v, a * sa, b * sb))
    assert scaled == pytest.approx(cosine, rel=1e-5, abs=1e-7)


@HYPOTHESIS
@given(seed=st.integers(0, 2**31 - 1), t=st.floats(min_value=1e-3, max_value=1e3))
def test_property_scaling_v_scales_projection_and_keeps_cosine(seed: int, t: float) -> None:
    """Ĉ(tV) = t Ĉ(V) for t > 0."""
    v, a, b = random_factors(18, 22, 4, seed)
    cosine, pb = scored(score_module(v, a, b))
    cosine_t, pb_t = scored(score_module(v * t, a, b))
    assert cosine_t == pytest.approx(cosine, rel=1e-5, abs=1e-7)
    assert rel_err(pb_t, pb.double() * t) <= 1e-5


@HYPOTHESIS
@given(seed=st.integers(0, 2**31 - 1))
def test_property_cosine_invariant_to_lora_reparametrization(seed: int) -> None:
    """B A = (B M)(M⁻¹ A): the same update, so the same cosine (the Gram form must see that)."""
    v, a, b = random_factors(16, 20, 3, seed)
    gen = torch.Generator().manual_seed(seed)
    m = torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(
        3, 3, generator=gen, dtype=torch.float64
    )
    cosine, _ = scored(score_module(v, a, b))
    b2 = (b.double() @ m).float()
    a2 = torch.linalg.solve(m, a.double()).float()
    cosine2, _ = scored(score_module(v, a2, b2))
    assert cosine2 == pytest.approx(cosine, rel=1e-4, abs=1e-6)


# --- alignment matrix and subspace --------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
def test_alignment_matrix_subtracts_in_float32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)

    def weights() -> torch.Tensor:  # |w| in [0.5, 4): a difference of two fp16/bf16 fits fp32
        magnitude = torch.rand(12, 10, generator=gen) * 3.5 + 0.5
        sign = torch.randint(0, 2, (12, 10), generator=gen) * 2 - 1
        return (magnitude * sign).to(dtype)

    w_base, w_aligned = weights(), weights()
    before = w_base.clone(), w_aligned.clone()
    exact = w_aligned.double() - w_base.double()
    want = exact.float()  # correctly rounded to fp32; a no-op for fp16/bf16 inputs

    v = alignment_matrix(w_base, w_aligned, torch.device("cpu"))

    assert v.dtype == torch.float32
    assert torch.equal(v, want)
    if dtype != torch.float32:  # the case tells fp32 from subtracting in the stored dtype
        assert torch.equal(want.double(), exact)
        assert not torch.equal((w_aligned - w_base).double(), exact)
    assert torch.equal(w_base, before[0])
    assert torch.equal(w_aligned, before[1])


def test_subspace_projection_is_idempotent_and_orthogonal() -> None:
    v, a, b = random_factors(40, 30, 4, seed=11)
    spec = ProjectionSpec(SUBSPACE, rank=5)
    score = score_module(v, a, b, spec)
    _, pb = scored(score)
    assert score.subspace_rank == 5
    _, ppb = scored(score_module(v, a, pb, spec))
    assert rel_err(ppb, pb) <= 1e-5
    u = torch.linalg.svd(v.double(), full_matrices=False)[0][:, :5]
    assert rel_err(pb, u @ (u.T @ b.double())) <= 1e-5
    # the residual is orthogonal to what was kept
    residual = b.double() - pb.double()
    assert float((residual * pb.double()).sum().abs()) <= 1e-6 * float(b.double().norm()) ** 2


# --- selection ----------------------------------------------------------------------------------


def test_number_mode_picks_k_lowest() -> None:
    cosines = {"a": 0.9, "b": 0.2, "c": 0.7, "d": 0.4, "e": -0.1}
    selected, used = select_modules(cosines, NUMBER, 2, 0.5)
    assert selected == {"e", "b"}
    assert used == 0.2


def test_number_mode_includes_ties_at_kth_value() -> None:
    cosines = {"a": 0.1, "b": 0.5, "c": 0.5, "d": 0.9, "e": 0.5}
    selected, used = select_modules(cosines, NUMBER, 2, 0.0)
    assert selected == {"a", "b", "c", "e"}
    assert used == 0.5


def test_number_mode_with_fewer_scored_than_k_takes_all() -> None:
    """K is checked against all modules; skipped ones leave fewer cosines than K."""
    cosines = {"a": 0.3, "b": 0.6}
    selected, used = select_modules(cosines, NUMBER, 5, 0.5)
    assert selected == {"a", "b"}
    assert used == 0.6


def test_threshold_mode_is_inclusive() -> None:
    cosines = {"a": 0.3, "b": 0.5, "c": 0.50001, "d": -0.2}
    selected, used = select_modules(cosines, THRESHOLD, 10, 0.5)
    assert selected == {"a", "b", "d"}
    assert used == 0.5


@pytest.mark.parametrize("mode", [NUMBER, THRESHOLD])
def test_nothing_scored_selects_nothing(mode: str) -> None:
    assert select_modules({}, mode, 3, 0.5) == (set(), None)


cosine_maps = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=4),
    # few distinct values, so ties are common
    st.sampled_from([-1.0, -0.5, 0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]),
    min_size=1,
    max_size=20,
)


@HYPOTHESIS
@given(cosines=cosine_maps, data=st.data())
def test_property_number_mode(cosines: dict[str, float], data: st.DataObject) -> None:
    k = data.draw(st.integers(1, len(cosines)))
    selected, used = select_modules(cosines, NUMBER, k, 0.5)
    kth = sorted(cosines.values())[k - 1]
    assert used == kth
    assert selected == {n for n, c in cosines.items() if c <= kth}
    assert len(selected) >= k
    # nothing left out is lower than anything picked, and ties with a pick are picked
    rest = set(cosines) - selected
    assert all(cosines[r] > cosines[s] for r in rest for s in selected)
    assert len({n for n, c in cosines.items() if c < kth}) < k


@HYPOTHESIS
@given(cosines=cosine_maps, t=st.floats(min_value=-1.0, max_value=1.0))
def test_property_threshold_mode(cosines: dict[str, float], t: float) -> None:
    selected, used = select_modules(cosines, THRESHOLD, 10, t)
    assert used == t
    assert selected == {n for n, c in cosines.items() if c <= t}

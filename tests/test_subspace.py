"""``--projection subspace``: B' = U_k U_kᵀ B with U_k the top-k left singular vectors of V.

Checked against a dense float64 reference (``torch.linalg.svd`` in float64, the out x out projector
and the out x in B A built in full): projected B and cosine within 1e-4 relative, on the exact
SVD path and on the randomized one (block Krylov, ``projection._block_krylov``, used when
min(out, in) is above ``projection.EXACT_SVD_MAX_DIM``); k from ``--energy`` is the smallest k
whose σ² reach E; the projection is idempotent and orthogonal; runs are deterministic; usage
errors exit 2.
(``--projection subspace`` without --rank/--energy, ``--rank 0`` and ``--energy 1.5`` are in
test_numbers.py.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from safelora_cli.errors import ExitCode
from safelora_cli.math import projection
from safelora_cli.math.projection import ModuleScore, score_module, subspace_basis
from safelora_cli.settings import Projection, ProjectionSpec
from safelora_cli.synthetic import LlamaShape, PairSpec, make_adapter, make_pair
from tests.conftest import Trio, TrioFactory
from tests.helpers import (
    PROJECT_ALL,
    REPORT,
    WEIGHTS,
    Cli,
    dense_k,
    dense_subspace,
    expect_error,
    factors,
    lora_key,
    read_tensors,
    rel_err,
    with_spectrum,
)

SUBSPACE = Projection.SUBSPACE
TOL = 1e-4


# --- the dense float64 reference ---------------------------------------------------------------


def check_against_dense(
    v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int, spec: ProjectionSpec
) -> ModuleScore:
    """Score with ``spec`` and compare with the dense reference at k."""
    score = score_module(v.float(), a, b, spec)
    assert score.subspace_rank == k
    assert score.projected_b is not None
    assert score.cosine is not None
    pb, cosine, captured = dense_subspace(v, b, a, k)
    b_err, cos_err = rel_err(score.projected_b, pb), abs(score.cosine - cosine) / abs(cosine)
    assert b_err <= TOL
    assert cos_err <= TOL
    assert score.captured_energy == pytest.approx(captured, abs=1e-5)
    return score


@pytest.fixture
def svd_lowrank_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the randomized decompositions (the sketch size of each call)."""
    calls: list[int] = []
    real = projection._block_krylov

    def spy(v: torch.Tensor, q: int, sketch: int) -> Any:
        calls.append(sketch)
        return real(v, q, sketch)

    monkeypatch.setattr(projection, "_block_krylov", spy)
    return calls


def geometric(n: int, ratio: float = 0.85) -> list[float]:
    return [ratio**i for i in range(n)]


# --- the numerics ------------------------------------------------------------------------------


@pytest.mark.parametrize(("out", "inp"), [(64, 48), (48, 64), (160, 64), (64, 160), (96, 96)])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_exact_path_matches_dense_float64(out: int, inp: int, k: int) -> None:
    v = with_spectrum(out, inp, geometric(min(out, inp)), seed=out + inp)
    a, b = factors(out, inp)
    check_against_dense(v, a, b, k, ProjectionSpec(SUBSPACE, rank=k))


@pytest.mark.parametrize("energy", [0.2, 0.5, 0.75, 0.9, 0.99])
def test_energy_picks_the_smallest_k_reaching_it(energy: float) -> None:
    v = with_spectrum(80, 60, geometric(60, 0.8), seed=2)
    k = dense_k(v, energy)
    u, captured = subspace_basis(v.float(), float(torch.linalg.matrix_norm(v)), energy=energy)
    assert u.shape == (80, k)
    assert captured >= energy - 1e-6
    s2 = torch.linalg.svdvals(v) ** 2
    assert float(s2[: k - 1].sum() / s2.sum()) < energy  # k - 1 directions fall short
    a, b = factors(80, 60)
    check_against_dense(v, a, b, k, ProjectionSpec(SUBSPACE, energy=energy))


def test_energy_one_picks_the_numerical_rank() -> None:
    """V = aligned − base in float32 is rank 4 plus rounding: E = 1 means those 4 directions."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 48, generator=gen)
    v = (w + 0.01 * torch.randn(64, 4, generator=gen) @ torch.randn(4, 48, generator=gen)) - w
    u, captured = subspace_basis(v, float(torch.linalg.vector_norm(v)), energy=1.0)
    assert u.shape[1] == 4
    assert captured == pytest.approx(1.0, abs=1e-6)


def test_rank_above_the_matrix_rank_is_clamped() -> None:
    """k > min(out, in) is clamped; for a wide full-rank V, U_k U_kᵀ is the identity."""
    v = with_spectrum(48, 64, geometric(48), seed=4)
    a, b = factors(48, 64)
    score = score_module(v.float(), a, b, ProjectionSpec(SUBSPACE, rank=1000))
    assert score.subspace_rank == 48
    assert score.projected_b is not None
    assert rel_err(score.projected_b, b.double()) <= 1e-5
    assert score.cosine == pytest.approx(1.0, abs=1e-6)
    assert score.captured_energy == pytest.approx(1.0, abs=1e-6)


GAP = [1.0 - 0.05 * i for i in range(8)] + [0.01 / (i + 1) for i in range(400)]


@pytest.mark.parametrize("k", [4, 8])
def test_randomized_path_matches_exact_with_a_spectral_gap(
    k: int, svd_lowrank_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 x 500, eight strong directions then a 50x drop: the randomized and the exact SVD
    agree with each other and with float64 to 1e-4."""
    v = with_spectrum(600, 500, GAP, seed=5)
    assert min(v.shape) > projection.EXACT_SVD_MAX_DIM
    a, b = factors(600, 500)
    spec = ProjectionSpec(SUBSPACE, rank=k)
    randomized = check_against_dense(v, a, b, k, spec)
    assert svd_lowrank_calls == [k + max(projection.OVERSAMPLE, k)]

    monkeypatch.setattr(projection, "EXACT_SVD_MAX_DIM", 10**6)
    exact = check_against_dense(v, a, b, k, spec)
    assert len(svd_lowrank_calls) == 1  # the exact SVD this time
    assert randomized.projected_b is not None
    assert exact.projected_b is not None
    assert rel_err(randomized.projected_b, exact.projected_b.double()) <= TOL
    assert randomized.cosine == pytest.approx(exact.cosine, rel=TOL)


def test_randomized_path_on_a_slowly_decaying_spectrum(svd_lowrank_calls: list[int]) -> None:
    """σ_i = 1/sqrt(i), no gap anywhere: U_16 U_16ᵀ B within 1e-2 of float64 (measured 2e-3 with 3
    Krylov steps; torch.svd_lowrank with 6 power iterations gave 4e-3, and with k + 10 sketch
    columns and 3 power iterations 9e-2)."""
    v = with_spectrum(600, 500, [1 / math.sqrt(i + 1) for i in range(500)], seed=6)
    a, b = factors(600, 500)
    score = score_module(v.float(), a, b, ProjectionSpec(SUBSPACE, rank=16))
    assert svd_lowrank_calls
    assert score.projected_b is not None
    assert rel_err(score.projected_b, dense_subspace(v, b, a, 16)[0]) <= 1e-2


def test_randomized_path_is_deterministic_and_leaves_the_rng_alone(
    svd_lowrank_calls: list[int],
) -> None:
    v = with_spectrum(400, 300, GAP[:300], seed=7).float()
    a, b = factors(400, 300)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = score_module(v, a, b, ProjectionSpec(SUBSPACE, rank=6))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)  # a different global state changes nothing
    second = score_module(v, a, b, ProjectionSpec(SUBSPACE, rank=6))
    assert len(svd_lowrank_calls) == 2
    assert first.projected_b is not None
    assert second.projected_b is not None
    assert torch.equal(first.projected_b, second.projected_b)
    assert first.cosine == second.cosine


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_randomized_path_is_deterministic_on_cuda() -> None:
    """The randomized basis draws its sketch from a seeded CUDA generator of its own."""
    v = with_spectrum(400, 300, GAP[:300], seed=7).float().cuda()
    a, b = (t.cuda() for t in factors(400, 300))
    state = torch.cuda.get_rng_state()
    first = score_module(v, a, b, ProjectionSpec(SUBSPACE, rank=6))
    assert torch.equal(torch.cuda.get_rng_state(), state)
    second = score_module(v, a, b, ProjectionSpec(SUBSPACE, rank=6))
    assert first.projected_b is not None
    assert second.projected_b is not None
    assert torch.equal(first.projected_b, second.projected_b)
    pb = dense_subspace(v.cpu().double(), b.cpu(), a.cpu(), 6)[0]
    assert rel_err(first.projected_b.cpu(), pb) <= TOL


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(2, 40),
    inp=st.integers(2, 40),
    r=st.integers(1, 4),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_projection_is_idempotent_and_orthogonal(
    out: int, inp: int, r: int, k: int, seed: int
) -> None:
    """P (P B) = P B, P B is the dense float64 U_k U_kᵀ B, and B − P B is orthogonal to span U_k
    (so to P B). Draws where σ_k and σ_(k+1) nearly tie are left out: U_k is then ill-defined."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(out, inp, generator=gen)
    a, b = torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen)
    u, sigmas, _ = torch.linalg.svd(v.double(), full_matrices=False)
    kept = min(k, out, inp)
    if kept < len(sigmas):
        assume(float(sigmas[kept - 1] - sigmas[kept]) >= 1e-2 * float(sigmas[0]))
    spec = ProjectionSpec(SUBSPACE, rank=k)
    once = score_module(v, a, b, spec).projected_b
    assert once is not None
    twice = score_module(v, a, once, spec).projected_b
    assert twice is not None
    scale = float(torch.linalg.vector_norm(b))
    assert float(torch.linalg.vector_norm(twice - once)) <= 1e-5 * scale
    u_k = u[:, :kept]
    assert rel_err(once, u_k @ (u_k.T @ b.double())) <= TOL
    residual = b.double() - once.double()
    assert float(torch.linalg.vector_norm(u_k.T @ residual)) <= TOL * scale
    assert abs(float((residual * once.double()).sum())) <= 1e-5 * scale**2


# --- through the CLI ---------------------------------------------------------------------------


def run(cli: Cli, trio: Trio, out: Path, *extra: str) -> dict[str, Any]:
    result = cli(trio.patch_args(out, *PROJECT_ALL, "--projection", "subspace", *extra))
    assert result.exit_code == ExitCode.OK, result.stderr
    report: dict[str, Any] = json.loads((out / REPORT).read_text())
    return report


def check_modules(
    trio: Trio, out: Path, report: dict[str, Any], k_of: Callable[[torch.Tensor], int]
) -> float:
    """Every module against the dense reference; returns the largest relative error seen."""
    base, aligned = read_tensors(trio.base), read_tensors(trio.aligned)
    before, after = load_file(trio.adapter / WEIGHTS), load_file(out / WEIGHTS)
    assert len(report["modules"]) == len(trio.modules)
    worst = 0.0
    for entry in report["modules"]:
        name = entry["module"]
        v = aligned[f"{name}.weight"].double() - base[f"{name}.weight"].double()
        a, b = before[lora_key(name, "lora_A")], before[lora_key(name, "lora_B")]
        k = k_of(v)
        pb, cosine, captured = dense_subspace(v, b, a, k)
        assert entry["projected"] is True
        assert entry["subspace_rank"] == k
        assert entry["captured_energy"] == pytest.approx(captured, abs=1e-5)
        b_err = rel_err(after[lora_key(name, "lora_B")], pb)
        cos_err = abs(entry["cosine"] - cosine) / abs(cosine)
        assert b_err <= TOL, (name, b_err)
        assert cos_err <= TOL, (name, cos_err)
        worst = max(worst, b_err, cos_err)
    return worst


def test_cli_rank_matches_dense_reference(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run(cli, trio, out, "--rank", "3")
    assert (report["settings"]["projection"], report["settings"]["rank"]) == ("subspace", 3)
    check_modules(trio, out, report, lambda v: 3)


def test_cli_energy_matches_dense_reference(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    """The synthetic alignment has rank 4: E = 0.9 needs 2 to 4 directions, module by module."""
    out = tmp_path / "out"
    report = run(cli, trio, out, "--energy", "0.9")
    assert report["settings"]["energy"] == 0.9
    check_modules(trio, out, report, lambda v: dense_k(v, 0.9))
    assert len({m["subspace_rank"] for m in report["modules"]}) > 1


def test_cli_large_module_randomized_and_deterministic(
    tmp_path: Path, cli: Cli, svd_lowrank_calls: list[int]
) -> None:
    """gate_proj (600 x 500) and down_proj (500 x 600) go through the randomized SVD; two runs
    write the same bytes."""
    shape = LlamaShape(hidden=500, intermediate=600, layers=1, heads=4, kv_heads=2, vocab=16)
    base, aligned = make_pair(tmp_path / "pair", PairSpec(shape=shape, seed=8, alignment_rank=12))
    modules = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"]
    adapter = make_adapter(tmp_path / "adapter", base, aligned, modules, rank=4, seed=9)
    trio = Trio(tmp_path, base, aligned, adapter, shape, modules)
    first, second = tmp_path / "first", tmp_path / "second"
    report = run(cli, trio, first, "--rank", "8")
    assert len(svd_lowrank_calls) == 2
    check_modules(trio, first, report, lambda v: 8)
    again = run(cli, trio, second, "--rank", "8")
    assert (first / WEIGHTS).read_bytes() == (second / WEIGHTS).read_bytes()
    assert again["modules"] == report["modules"]


# --- usage errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        pytest.param(["--projection", "subspace", "--rank", "2", "--energy", "0.9"], "--rank",
                     id="rank-and-energy"),
        pytest.param(["--projection", "subspace", "--energy", "0"], "--energy", id="energy-0"),
        pytest.param(["--projection", "subspace", "--energy", "-0.5"], "--energy",
                     id="energy-negative"),
        pytest.param(["--projection", "subspace", "--energy", "1.0001"], "--energy",
                     id="energy-above-1"),
        pytest.param(["--projection", "subspace", "--rank", "-2"], "--rank", id="rank-negative"),
        pytest.param(["--projection", "paper", "--rank", "4"], "--rank", id="paper-rank"),
        pytest.param(["--projection", "paper", "--energy", "0.9"], "--energy", id="paper-energy"),
        pytest.param(["--rank", "4"], "--rank", id="default-projection-rank"),
    ],
)  # fmt: skip
def test_subspace_flags_that_cannot_be_used_are_usage_errors(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, flags: list[str], named: str
) -> None:
    trio = make_trio(projs=("q_proj",))
    out = tmp_path / "out"
    expect_error(cli(trio.patch_args(out, *flags)), ExitCode.USAGE, named, output=out)

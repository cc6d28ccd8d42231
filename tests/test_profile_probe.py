"""The probed certificate (``math.probe``, ``certificate.certify_probed``) against dense float64.

The probe's t̄ bounds ‖R‖₂² (true except with the stated probability, at most 1e-12 a weight) and
stays within 1.25x of it; a randomized entry's certificate bounds ‖M − M̂‖₂ computed densely, and
is within RANDOMIZED_SLACK (1.25) of the exact certificate at the same k, on spectra decaying as
i^-1, i^-1/2, flat, exactly low-rank and low-rank plus noise, over many seeds; the profile file
records the probability, and a profile written before it reads as exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safelora_cli.math import lowrank, probe, projection
from safelora_cli.math.lowrank import EXACT, LOWRANK, RANDOMIZED, LowRank, RankRule, decompose
from safelora_cli.runs.profile_build import build_profile, write_profile
from safelora_cli.sources.profile import read_profile
from safelora_cli.sources.profile_summary import describe, provenance
from tests.helpers import with_spectrum


def power(n: int, p: float) -> list[float]:
    return [(i + 1) ** -p for i in range(n)]


def noisy(out: int, inp: int, seed: int) -> torch.Tensor:
    """Rank 6 plus a flat noise floor 1% as strong (the bench pair's shape of spectrum)."""
    gen = torch.Generator().manual_seed(seed + 100)
    floor = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    low = with_spectrum(out, inp, [1.0] * 6, seed=seed)
    return low + 0.01 * floor / math.sqrt(max(out, inp))


def matrix(spectrum: str, out: int, inp: int, seed: int) -> torch.Tensor:
    n = min(out, inp)
    if spectrum == "noisy":
        return noisy(out, inp, seed).float()
    sigmas = {
        "i^-1": power(n, 1.0),
        "i^-0.5": power(n, 0.5),
        "flat": [1.0] * n,
        "rank 6": power(6, 1.0),
    }[spectrum]
    return with_spectrum(out, inp, sigmas, seed=seed).float()


SPECTRA = ["i^-1", "i^-0.5", "flat", "rank 6", "noisy"]


@pytest.fixture
def small_randomized(monkeypatch: pytest.MonkeyPatch) -> None:
    """The randomized route from min(out, in) > 32 on, so small matrices exercise it."""
    monkeypatch.setattr(projection, "EXACT_SVD_MAX_DIM", 32)
    monkeypatch.setattr(lowrank, "EXACT_SVD_MAX_DIM", 32)


def dense_top(r: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(r.double())[0]) ** 2


# --- the probe alone ----------------------------------------------------------------------------


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize(("out", "inp"), [(300, 260), (260, 300)])
def test_the_probe_bounds_the_top_eigenvalue_over_many_seeds(
    spectrum: str, out: int, inp: int
) -> None:
    """n = 260 is more than the Krylov space (q b = 160): the randomized route. Every seed's t̄ is
    at least ‖R‖₂² and within 1.25x of it; θ is a Rayleigh quotient (≤ ‖R‖₂² up to rounding)."""
    ratios = []
    for seed in range(6):
        r = matrix(spectrum, out, inp, seed)
        top = dense_top(r)
        found = probe.tail_bound(r.contiguous(), float(r.double().norm()), seed=seed)
        assert found.steps * min(probe.BLOCK, min(out, inp)) < min(out, inp) or found.steps == 0
        assert top <= found.bound
        assert found.bound <= 1.25 * top
        assert found.ritz <= top + found.allowance  # a Rayleigh quotient, up to rounding
        assert 0.0 < found.failure <= probe.FAILURE_PROBABILITY
        ratios.append(found.bound / top)
    assert max(ratios) <= 1.0 / (1.0 - probe.EPSILON) + 0.1


def test_a_small_space_is_covered_exactly() -> None:
    """When q b reaches n the Krylov space would be the whole space: B's spectrum is computed
    exactly instead, and nothing is left to chance."""
    r = matrix("i^-1", 60, 40, 0)
    found = probe.tail_bound(r.contiguous(), float(r.double().norm()), seed=0)
    assert found.failure == 0.0
    assert found.bound == pytest.approx(dense_top(r), rel=1e-9)
    assert found.bound >= dense_top(r)


def test_a_zero_residual_is_zero() -> None:
    found = probe.tail_bound(torch.zeros(300, 300), 0.0, seed=0)
    assert (found.bound, found.failure) == (0.0, 0.0)


@pytest.mark.parametrize("n", [257, 2048, 4096, 11008, 28672, 10**6])
def test_the_failure_probability_is_within_the_stated(n: int) -> None:
    """q is the least step count with P(failure) ≤ 1e-12 a weight (≤ 1e-9 for 1000 weights)."""
    q = probe.steps(n)
    assert probe.failure_probability(n, q) <= probe.FAILURE_PROBABILITY
    assert probe.failure_probability(n, q - 1) > probe.FAILURE_PROBABILITY
    assert 1000 * probe.FAILURE_PROBABILITY <= 1e-9


def test_the_failure_probability_is_kuczynski_wozniakowski_to_the_block() -> None:
    """(1.648 √n e^(−√ε (2q − 1)))^b, capped at 1 per column."""
    n, q = 2048, 10
    one = 1.648 * math.sqrt(n) * math.exp(-math.sqrt(probe.EPSILON) * (2 * q - 1))
    assert probe.failure_probability(n, q) == pytest.approx(one**probe.BLOCK, rel=1e-12)
    assert probe.failure_probability(n, 2) == 1.0


def test_the_rounding_factor_is_the_chunks() -> None:
    """γ_(c+2) in float32 for a chunk of c = CHUNK terms, plus the float64 sum of the chunks."""
    g = probe.rounding_factor(5632)
    c = probe.CHUNK + 2
    assert c * 2.0**-24 < g < 1.01 * c * 2.0**-24 / (1 - c * 2.0**-24) + 1e-12
    assert probe.rounding_factor(10) < g  # fewer terms than a chunk


def test_the_seed_follows_the_matrix() -> None:
    r = matrix("i^-1", 300, 260, 0)
    assert probe.probe_seed(r, 1.0) == probe.probe_seed(r.clone(), 1.0)
    assert probe.probe_seed(r, 1.0) != probe.probe_seed(r, 2.0)
    assert probe.probe_seed(r, 1.0) != probe.probe_seed(2 * r, 1.0)


# --- randomized entries against the dense reference --------------------------------------------


def dense_error(v: torch.Tensor, entry: LowRank) -> float:
    """‖M − M̂‖₂ in float64, M = V Vᵀ, M̂ = Û diag(ŝ²) Ûᵀ."""
    assert entry.u is not None
    assert entry.s is not None
    v64, u, s = v.double(), entry.u.double(), entry.s.double()
    return float(torch.linalg.matrix_norm(v64 @ v64.T - (u * s**2) @ u.T, 2))


@pytest.mark.usefixtures("small_randomized")
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize(("out", "inp"), [(160, 120), (120, 160)])
def test_randomized_certificates_bound_the_dense_error(spectrum: str, out: int, inp: int) -> None:
    """Six seeds at k = 8: wherever the randomized route is taken, e ≥ ‖M − M̂‖₂, and e is within
    RANDOMIZED_SLACK of the exact route's certificate at the same k (today's bound)."""
    taken = 0
    for seed in range(6):
        v = matrix(spectrum, out, inp, seed)
        norm = float(v.double().norm())
        entry = decompose(v, norm, RankRule(rank=8, tolerance=None), RANDOMIZED)
        exact = decompose(v, norm, RankRule(rank=entry.rank, tolerance=None), EXACT)
        assert entry.kind == exact.kind == LOWRANK
        assert dense_error(v, entry) <= entry.certificate.operator_bound * (1 + 1e-9) + 1e-12
        bound, today = entry.certificate.operator_bound, exact.certificate.operator_bound
        assert bound <= lowrank.RANDOMIZED_SLACK * today + 1e-6 * float(v.double().norm()) ** 2
        taken += entry.method == RANDOMIZED
    assert taken or spectrum == "flat"  # flat: no gap to find, the exact route decides


@pytest.mark.usefixtures("small_randomized")
@pytest.mark.parametrize("tolerance", [0.1, 0.01])
@pytest.mark.parametrize("spectrum", ["i^-1", "noisy"])
def test_the_tolerance_rule_on_the_randomized_route(tolerance: float, spectrum: str) -> None:
    """Under --tolerance the randomized entry meets T, its certificate bounds the dense error,
    and its k is no more than what T at 60% would need."""
    for seed in range(4):
        v = matrix(spectrum, 200, 150, seed)
        entry = decompose(v, float(v.double().norm()), RankRule(tolerance=tolerance), RANDOMIZED)
        s2 = torch.linalg.svdvals(v.double()) ** 2
        s2 = s2 / s2[0]
        assert entry.relative_error <= tolerance
        assert dense_error(v, entry) <= entry.certificate.operator_bound * (1 + 1e-9) + 1e-12
        assert entry.rank <= int(torch.nonzero(s2 <= 0.6 * tolerance)[0])


@pytest.mark.usefixtures("small_randomized")
def test_a_k_inside_a_flat_floor_goes_exact_after_one_sketch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rank 6 over a flat noise floor, k = 16: directions 7..16 are noise, no basis of them is
    close to invariant, so the certificate is loose; with no gap between σ̂_16 and σ̂_17 more
    power iterations cannot help, and the exact route decides after a single sketch."""
    calls: list[int] = []
    sketch = lowrank._sketch

    def spy(v: torch.Tensor, width: int, niter: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(niter)
        return sketch(v, width, niter)

    monkeypatch.setattr(lowrank, "_sketch", spy)
    v = noisy(200, 150, 0).float()
    entry = decompose(v, float(v.double().norm()), RankRule(rank=16, tolerance=None), RANDOMIZED)
    assert entry.method == EXACT
    assert calls == [lowrank.SKETCH_ITERATIONS]


def bench_v(out: int, inp: int, flavour: str, seed: int = 0) -> torch.Tensor:
    """bench/profile_lowrank.py's V: a rank-4 update of 2% (``lowrank4``) or σ_i ∝ i^-1/2 over
    every direction (``slow``), over a random W, both rounded to bf16."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) / math.sqrt(inp)
    n = 4 if flavour == "lowrank4" else min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, n, generator=gen))
    r, _ = torch.linalg.qr(torch.randn(inp, n, generator=gen))
    sigma = torch.ones(n) if flavour == "lowrank4" else torch.arange(1, n + 1) ** -0.5
    delta = (u * sigma) @ r.T
    delta *= 0.02 * float(w.norm()) / float(delta.norm())
    return (w + delta).bfloat16().float() - w.bfloat16().float()


@pytest.mark.parametrize(
    ("shape", "flavour", "rule"),
    [((2048, 5632), "lowrank4", RankRule()),  # the bench pair's down_proj, default tolerance
     ((1024, 768), "slow", RankRule(rank=24, tolerance=None))],
)  # fmt: skip
def test_bench_shaped_weights_stay_within_the_slack_of_today(
    shape: tuple[int, int], flavour: str, rule: RankRule
) -> None:
    """The bench pair's weight (2048 x 5632, default rule: k = 4, randomized) and the slowly
    decaying spectrum at a fixed rank: the probed certificate is within 1.25x of the exact one."""
    v = bench_v(*shape, flavour)
    norm = float(v.double().norm())
    entry = decompose(v, norm, rule, lowrank.AUTO)
    exact = decompose(v, norm, RankRule(rank=entry.rank, tolerance=None), EXACT)
    assert entry.method == RANDOMIZED
    assert entry.rank == (4 if flavour == "lowrank4" else 24)
    ratio = entry.certificate.operator_bound / exact.certificate.operator_bound
    assert 1.0 <= ratio <= lowrank.RANDOMIZED_SLACK


# --- the file ---------------------------------------------------------------------------------


def test_the_profile_records_the_failure_probability(tmp_path: Path) -> None:
    v = noisy(400, 300, 0).float()
    exact = with_spectrum(40, 30, power(30, 1.0)).float()
    items = [("a.weight", v, float(v.double().norm())), ("b.weight", exact, float(exact.norm()))]
    rule = RankRule(rank=6, tolerance=None)
    entries = build_profile(items, rule)
    assert entries["a.weight"].method == RANDOMIZED
    assert entries["b.weight"].failure == 0.0
    path = tmp_path / "p.safetensors"
    write_profile(path, entries, {"base": {}, "aligned": {}}, rule)
    info = read_profile(path)
    assert info.weights["a.weight"].failure_probability == entries["a.weight"].failure > 0.0
    assert info.weights["b.weight"].failure_probability == 0.0
    summary = describe(info)
    assert summary["totals"]["failure_probability"] == pytest.approx(entries["a.weight"].failure)
    assert provenance(info)["failure_probability"] == summary["totals"]["failure_probability"]
    assert info.weights["a.weight"].entry().failure == entries["a.weight"].failure


def test_a_profile_without_the_field_reads_as_exact(tmp_path: Path) -> None:
    """Profiles written before the probe have no ``failure_probability``: every bound was exact."""
    v = with_spectrum(40, 30, power(30, 1.0)).float()
    rule = RankRule(rank=4, tolerance=None)
    path = tmp_path / "p.safetensors"
    write_profile(path, build_profile([("w", v, float(v.norm()))], rule), {}, rule)
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    body = json.loads(metadata["profile"])
    del body["weights"]["w"]["failure_probability"]
    metadata["profile"] = json.dumps(body, sort_keys=True)
    save_file(tensors, str(path), metadata)
    info = read_profile(path)
    assert info.weights["w"].failure_probability == 0.0
    assert describe(info)["totals"]["failure_probability"] == 0.0

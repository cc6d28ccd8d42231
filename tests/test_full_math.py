"""Full fine-tunes: the math of ``full.py`` against dense float64 references, and the whole flow
(score, select, write) on seeded synthetic fine-tunes, single file and sharded.

The references build the out x out Ĉ = V Vᵀ / ‖V‖_F (or U_k from a float64 SVD) and the out x in
P D densely; safelora never does.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from safelora_cli.errors import NumericalError
from safelora_cli.inputs.index import index_folder
from safelora_cli.math import delta
from safelora_cli.math.full import (
    UNCHANGED,
    merged_weight,
    project_delta,
    score_delta,
    score_projection,
    weight_delta_into,
)
from safelora_cli.math.reasons import ZERO_V
from safelora_cli.math.selection import select_modules
from safelora_cli.settings import Projection, ProjectionSpec
from safelora_cli.synthetic import FineTuneSpec, PairSpec, make_full_finetune, make_pair
from tests.full_helpers import (
    byte_ranges,
    cosine,
    dense_paper,
    dense_subspace,
    folder_tensors,
    header_bytes,
    load_in_transformers,
    masked_bytes,
    patch_full,
    same_bytes,
)
from tests.helpers import CARD, REPORT

SUBSPACE = Projection.SUBSPACE
PAPER = ProjectionSpec()


def low_rank(out: int, inp: int, rank: int, seed: int) -> torch.Tensor:
    """A V with a decaying spectrum of ``rank`` directions (as aligned − base is)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(out, rank, generator=gen)
    w = torch.randn(rank, inp, generator=gen)
    return (u * torch.linspace(1.0, 0.1, rank)) @ w / math.sqrt(inp)


def fine_tune_delta(v: torch.Tensor, lean: float, seed: int) -> torch.Tensor:
    """D with a share ``lean`` along V and the rest noise."""
    noise = torch.randn(v.shape, generator=torch.Generator().manual_seed(seed))
    return lean * v / v.norm() + (1 - lean) * noise / noise.norm()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def dense_pd(pd: delta.Factored) -> torch.Tensor:
    return pd.left.double() @ pd.right.double()


# --- the math against dense float64 ----------------------------------------------------------


@pytest.mark.parametrize(
    ("out", "inp"), [(48, 80), (80, 48), (64, 64)], ids=["out<in", "out>in", "square"]
)
@pytest.mark.parametrize("lean", [0.2, 0.8])
def test_paper_score_and_pd_equal_the_dense_float64_reference(
    out: int, inp: int, lean: float
) -> None:
    v = low_rank(out, inp, 6, seed=out + inp)
    d = fine_tune_delta(v, lean, seed=1)
    score, pd = score_delta(v, d, PAPER)
    want = dense_paper(v, d)
    assert pd is not None
    assert rel_err(dense_pd(pd), want) <= 1e-5
    assert score.cosine == pytest.approx(cosine(want, d.double()), abs=1e-6)
    assert score.v_norm == pytest.approx(float(v.double().norm()), rel=1e-6)
    assert score.b_norm == pytest.approx(float(d.double().norm()), rel=1e-6)
    assert score.projected_b_norm == pytest.approx(float(want.norm()), rel=1e-5)
    assert score.distance == pytest.approx(float((d.double() - want).norm()), rel=1e-5)
    assert score.skipped is None
    assert score.projected_b is None


@pytest.mark.parametrize(("out", "inp"), [(48, 80), (80, 48), (64, 64)])
def test_the_cheaper_association_is_chosen(out: int, inp: int) -> None:
    """(V Vᵀ) D when out < in: the left factor is the out x out Gram; else V (Vᵀ D)."""
    v = low_rank(out, inp, 4, seed=3)
    pd, k, captured = project_delta(v, fine_tune_delta(v, 0.5, 2), PAPER, float(v.norm()))
    inner = out if out < inp else inp
    assert pd.left.shape == (out, inner)
    assert pd.right.shape == (inner, inp)
    assert (k, captured) == (None, None)


@pytest.mark.parametrize("rank", [2, 5])
def test_subspace_score_and_pd_equal_the_dense_float64_reference(rank: int) -> None:
    v = low_rank(70, 50, 8, seed=4)
    d = fine_tune_delta(v, 0.4, seed=5)
    score, pd = score_delta(v, d, ProjectionSpec(SUBSPACE, rank=rank))
    want = dense_subspace(v, d, rank)
    assert pd is not None
    assert rel_err(dense_pd(pd), want) <= 1e-5
    assert score.cosine == pytest.approx(cosine(want, d.double()), abs=1e-6)
    assert score.subspace_rank == rank
    s = torch.linalg.svdvals(v.double())
    assert score.captured_energy == pytest.approx(float((s[:rank] ** 2).sum() / (s**2).sum()))


def test_subspace_keeps_a_delta_inside_the_subspace_and_paper_drops_an_orthogonal_one() -> None:
    v = low_rank(60, 40, 3, seed=6)
    u = torch.linalg.svd(v.double(), full_matrices=False)[0]
    inside = (u[:, :3] @ torch.randn(3, 40, dtype=torch.float64)).float()
    score, pd = score_delta(v, inside, ProjectionSpec(SUBSPACE, rank=3))
    assert pd is not None
    assert score.cosine == pytest.approx(1.0, abs=1e-6)
    assert score.distance <= 1e-5 * score.b_norm
    outside = (u[:, 3:10] @ torch.randn(7, 40, dtype=torch.float64)).float()
    score, pd = score_delta(v, outside, PAPER)
    assert pd is not None
    assert abs(score.cosine or 0.0) <= 1e-5
    assert score.projected_b_norm <= 1e-5 * score.b_norm


def test_row_blocks_give_the_same_result_as_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    v = low_rank(90, 70, 5, seed=7)
    d = fine_tune_delta(v, 0.6, seed=8)
    w = torch.randn(90, 70).to(torch.bfloat16)
    one_score, one_pd = score_delta(v, d, PAPER)
    assert one_pd is not None
    one_w = merged_weight(w, one_pd, torch.bfloat16, "w")
    monkeypatch.setattr(delta, "BLOCK_ELEMENTS", 7 * 70 + 3)  # 7 rows: 13 blocks, a short last
    blocks = list(one_pd.row_blocks())
    assert [len(blocks), blocks[-1][1].shape[0]] == [13, 6]
    score, pd = score_delta(v, d, PAPER)
    assert pd is not None
    assert score.cosine == pytest.approx(one_score.cosine, abs=1e-6)
    assert score.distance == pytest.approx(one_score.distance, rel=1e-5)
    assert torch.equal(merged_weight(w, pd, torch.bfloat16, "w"), one_w)


def test_a_profiles_factors_score_as_the_paper_projection() -> None:
    """With V = U Σ Wᵀ stored as a profile, Ĉ D = (U Σ² / ‖V‖) (Uᵀ D): the same score."""
    v = low_rank(50, 70, 5, seed=17)
    d = fine_tune_delta(v, 0.5, seed=18)
    v_norm, d_norm = float(v.norm()), float(d.norm())
    u, sigma, _ = torch.linalg.svd(v, full_matrices=False)
    profile = delta.Factored(u * sigma**2 / v_norm, u.T @ d)
    want, _ = score_delta(v, d, PAPER, v_norm, d_norm)
    got = score_projection(profile, d, v_norm, d_norm)
    assert got.cosine == pytest.approx(want.cosine, abs=1e-6)
    assert got.distance == pytest.approx(want.distance, rel=1e-5)
    assert got.projected_b_norm == pytest.approx(want.projected_b_norm, rel=1e-5)


def test_a_frozen_weight_and_a_zero_alignment_are_skipped_with_the_reason() -> None:
    v = low_rank(20, 30, 2, seed=9)
    score, pd = score_delta(v, torch.zeros(20, 30), PAPER)
    assert (score.skipped, score.cosine, pd) == (UNCHANGED, None, None)
    score, pd = score_delta(torch.zeros(20, 30), fine_tune_delta(v, 0.5, 1), PAPER)
    assert (score.skipped, score.cosine, pd) == (ZERO_V, None, None)


def test_a_non_finite_weight_is_left_for_the_caller_to_name() -> None:
    v = low_rank(20, 30, 2, seed=9)
    d = fine_tune_delta(v, 0.5, 1)
    d[3, 4] = float("nan")
    score, pd = score_delta(v, d, PAPER)
    assert not math.isfinite(score.b_norm)
    assert (score.skipped, pd) == (None, None)


def test_the_difference_is_taken_in_float32_after_conversion() -> None:
    """bf16 weights differing in their last bits: subtracting in bf16 would lose D."""
    gen = torch.Generator().manual_seed(10)
    w_aligned = (torch.randn(32, 48, generator=gen) * 4).to(torch.bfloat16)
    bump = torch.randint(-3, 4, (32, 48), generator=gen).float() * 1e-3
    w_ft = (w_aligned.float() + bump).to(torch.bfloat16)
    out, scratch = torch.empty(32, 48), torch.empty(32 * 48)
    d, d_norm = weight_delta_into(w_aligned, w_ft, out, scratch)
    want = w_ft.double() - w_aligned.double()
    assert torch.equal(d.double(), want)  # exact: both bf16 values are exact in float32
    assert d_norm == pytest.approx(float(want.norm()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merged_weight_is_w_aligned_plus_pd_cast_once(dtype: torch.dtype) -> None:
    v = low_rank(40, 24, 3, seed=11)
    d = fine_tune_delta(v, 0.5, 12) * 50
    w = torch.randn(40, 24).to(dtype)
    _, pd = score_delta(v, d, PAPER)
    assert pd is not None
    got = merged_weight(w, pd, dtype, "w")
    assert got.dtype == dtype
    assert got.is_contiguous()
    # summed in float32, rounded once to dtype
    assert torch.equal(got, (w.float() + pd.left @ pd.right).to(dtype))
    eps = max(torch.finfo(dtype).eps, 1e-5)  # one rounding of dtype, or float32 P D error
    want = (w.double() + dense_paper(v, d)).to(dtype).double()
    torch.testing.assert_close(got.double(), want, rtol=eps, atol=eps)
    # a weight stored (in, out) takes P D transposed
    stored = torch.randn(24, 40).to(dtype)
    got = merged_weight(stored, pd.T, dtype, "w")
    want = (stored.double() + dense_paper(v, d).T).to(dtype).double()
    torch.testing.assert_close(got.double(), want, rtol=eps, atol=eps)


def test_an_fp16_overflow_is_refused_naming_the_weight() -> None:
    v = low_rank(16, 16, 2, seed=13)
    d = fine_tune_delta(v, 1.0, 1)
    _, pd = score_delta(v, d * 1e3, PAPER)
    assert pd is not None
    w = torch.full((16, 16), 65000.0, dtype=torch.float16)
    with pytest.raises(NumericalError, match=r"model\.layers\.0\.q_proj\.weight") as caught:
        merged_weight(w, pd, torch.float16, "model.layers.0.q_proj.weight")
    assert caught.value.exit_code == 5
    assert "float16" in caught.value.one_line()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_sum_is_refused_exactly_when_its_cast_is_not_finite(dtype: torch.dtype) -> None:
    """The check on the float32 sum agrees with isfinite on the cast, at the rounding boundary
    (for float16, 65519.996 rounds to 65504 and 65520 to Inf) and for NaN/Inf."""
    limit = torch.tensor(delta.finite_limit(dtype))
    below = float(torch.nextafter(limit, torch.tensor(0.0)))
    zero = delta.Factored(torch.zeros(2, 1), torch.zeros(1, 2))
    for value in (below, -below, float(limit), -float(limit), math.inf, math.nan, 1.0):
        w = torch.full((2, 2), value)
        finite = bool(torch.isfinite(w.to(dtype)).all())
        if finite:
            got = delta.add_delta(w, zero, dtype, "w")
            assert torch.equal(got, w.to(dtype))
        else:
            with pytest.raises(NumericalError):
                delta.add_delta(w, zero, dtype, "w")


def test_shapes_that_do_not_match_are_refused() -> None:
    v = low_rank(16, 24, 2, seed=14)
    with pytest.raises(ValueError, match="differ in shape"):
        project_delta(v, torch.randn(24, 16), PAPER, float(v.norm()))
    _, pd = score_delta(v, fine_tune_delta(v, 0.5, 1), PAPER)
    assert pd is not None
    with pytest.raises(ValueError, match="update"):
        merged_weight(torch.zeros(24, 16), pd, torch.float32, "w")


# --- the whole flow on synthetic fine-tunes ------------------------------------------------


def build(tmp_path: Path, dtype: torch.dtype, shards: int) -> tuple[Path, Path, Path]:
    base, aligned = make_pair(tmp_path, PairSpec(dtype=dtype, shards=2, seed=21))
    frozen = ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj")
    ft = make_full_finetune(tmp_path / "ft", base, aligned, FineTuneSpec(frozen, shards=shards))
    return ft, base, aligned


@pytest.mark.parametrize(
    ("dtype", "shards", "spec", "select"),
    [
        (torch.float32, 1, PAPER, "number"),
        (torch.bfloat16, 3, PAPER, "threshold"),
        (torch.float32, 2, ProjectionSpec(SUBSPACE, rank=3), "number"),
    ],
    ids=["fp32-single-paper-number", "bf16-sharded-paper-threshold", "sharded-subspace"],
)
def test_full_flow_matches_the_dense_reference_and_copies_the_rest(
    tmp_path: Path, dtype: torch.dtype, shards: int, spec: ProjectionSpec, select: str
) -> None:
    ft, base, aligned = build(tmp_path, dtype, shards)
    out = tmp_path / "out"
    run = patch_full(ft, base, aligned, out, spec, select, num_layers=5, threshold=0.7)
    t_base, t_aligned, t_ft = folder_tensors(base), folder_tensors(aligned), folder_tensors(ft)

    # targets: every block matrix, nothing else (embeddings, lm_head and norms untouched)
    want_targets = {n for n, t in t_ft.items() if t.dim() == 2 and ".layers." in n}
    assert {p.name for p in run.pairs} == want_targets
    # scores and selection against dense float64
    dense = {}
    for name in want_targets:
        v = t_aligned[name].double() - t_base[name].double()
        d = t_ft[name].double() - t_aligned[name].double()
        if float(d.norm()) == 0:
            assert run.scores[name].skipped == UNCHANGED
            continue
        k = spec.rank or 0
        pd = dense_subspace(v, d, k) if spec.kind == SUBSPACE else dense_paper(v, d)
        dense[name] = pd
        assert run.scores[name].cosine == pytest.approx(cosine(pd, d), abs=1e-5), name
    cosines = {n: cosine(pd, t_ft[n].double() - t_aligned[n].double()) for n, pd in dense.items()}
    assert run.selected == select_modules(cosines, select, 5, 0.7)[0]
    assert 0 < len(run.selected) < len(dense)

    # outputs: selected = W_aligned + P D in the fine-tune's dtype; everything else the
    # fine-tune's bytes; headers, index and sidecars identical
    got = folder_tensors(out)
    assert got.keys() == t_ft.keys()
    for name, tensor in got.items():
        if name in run.selected:
            want = (t_aligned[name].double() + dense[name]).to(dtype)
            assert tensor.dtype == dtype
            assert rel_err(tensor, want.double()) <= (1e-6 if dtype == torch.float32 else 4e-3)
        else:
            assert same_bytes(tensor, t_ft[name]), name
    ft_index = index_folder(ft)
    ranges = byte_ranges(ft_index, run.selected)
    for path in ft_index.files:
        target = out / path.name
        assert header_bytes(target) == header_bytes(path)
        assert masked_bytes(target, ranges.get(path, [])) == masked_bytes(
            path, ranges.get(path, [])
        )
    copied = sorted(p.name for p in ft.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted([*copied, CARD, REPORT])
    assert run.report["kind"] == "full"
    for name in copied:
        if not name.endswith(".safetensors"):
            assert (out / name).read_bytes() == (ft / name).read_bytes(), name


def test_named_targets_reach_embeddings_and_the_head(tmp_path: Path) -> None:
    ft, base, aligned = build(tmp_path, torch.float32, 1)
    run = patch_full(ft, base, aligned, tmp_path / "out", targets=("embed_tokens,lm_head",))
    assert {p.name for p in run.pairs} == {"model.embed_tokens.weight", "lm_head.weight"}
    # the synthetic pair's alignment also moves these, so both are scored and, at T = 1, patched
    assert run.selected == {"model.embed_tokens.weight", "lm_head.weight"}


@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 3])
def test_the_patched_fine_tune_loads_in_transformers_with_every_key(
    tmp_path: Path, shards: int
) -> None:
    ft, base, aligned = build(tmp_path, torch.float32, shards)
    out = tmp_path / "out"
    run = patch_full(ft, base, aligned, out, select="number", num_layers=4)
    state = load_in_transformers(out).state_dict()
    written = folder_tensors(out)
    for name in run.selected:
        assert torch.equal(state[name], written[name])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_score_and_the_merged_weight_match_the_cpu() -> None:
    v = low_rank(300, 200, 6, seed=15)
    d = fine_tune_delta(v, 0.5, seed=16)
    w = torch.randn(300, 200).to(torch.bfloat16)
    cuda = torch.device("cuda")
    cpu_score, cpu_pd = score_delta(v, d, PAPER)
    gpu_score, gpu_pd = score_delta(v.to(cuda), d.to(cuda), PAPER)
    assert cpu_pd is not None
    assert gpu_pd is not None
    assert gpu_score.cosine == pytest.approx(cpu_score.cosine, abs=1e-5)
    got = merged_weight(w, gpu_pd, torch.bfloat16, "w")
    assert got.device.type == "cpu"
    want = merged_weight(w, cpu_pd, torch.bfloat16, "w")
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=8e-3)  # bf16 ulp

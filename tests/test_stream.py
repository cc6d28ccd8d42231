"""The hot path's machinery: ``stream.map_alignment`` (V of every weight, in worker threads),
``projection.paper_projections`` (the paper products over row blocks of V) and the block Krylov
basis's fallback for a V of low rank.

References are float64: V = W_aligned − W_base and Ĉ B = V Vᵀ B / ‖V‖_F built densely.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from safelora_cli.errors import CorruptFileError
from safelora_cli.inputs.adapter import load_adapter
from safelora_cli.inputs.index import index_folder
from safelora_cli.inputs.pairing import ModulePair, pair_modules
from safelora_cli.math import projection
from safelora_cli.math.projection import paper_projections, subspace_basis
from safelora_cli.sources.stream import map_alignment, worker_plan
from tests.conftest import TrioFactory
from tests.helpers import read_tensors, rel_err, truncate

CPU = torch.device("cpu")


def weights(make_trio: TrioFactory) -> tuple[list[ModulePair], dict[str, torch.Tensor]]:
    """The pairs of a bf16 trio, in shard order, and V in float64 for each base weight."""
    trio = make_trio(dtype=torch.bfloat16, shards=2)
    found = pair_modules(
        load_adapter(trio.adapter), index_folder(trio.base), index_folder(trio.aligned)
    )
    pairs = sorted(found, key=lambda p: p.base.location)
    base, aligned = read_tensors(trio.base), read_tensors(trio.aligned)
    dense = {p.base.name: aligned[p.base.name].double() - base[p.base.name].double() for p in pairs}
    return pairs, dense


def test_every_v_in_order_equals_the_float64_difference(make_trio: TrioFactory) -> None:
    pairs, dense = weights(make_trio)
    seen: list[tuple[str, float, float, str]] = []

    def check(pair: ModulePair, v: torch.Tensor, v_norm: float) -> str:
        want = dense[pair.base.name]
        assert v.dtype == torch.float32
        seen.append((pair.base.name, rel_err(v, want), abs(v_norm / float(want.norm()) - 1),
                     threading.current_thread().name))  # fmt: skip
        return pair.base.name

    threads = torch.get_num_threads()
    assert list(map_alignment(pairs, CPU, check)) == [p.base.name for p in pairs]
    assert sorted(name for name, *_ in seen) == sorted(p.base.name for p in pairs)
    assert max(err for _, err, _, _ in seen) <= 1e-6
    assert max(norm_err for _, _, norm_err, _ in seen) <= 1e-6
    assert all(name.startswith("safelora-weights") for *_, name in seen)
    assert torch.get_num_threads() == threads  # the workers' setting does not leak


def test_workers_share_out_the_threads(make_trio: TrioFactory) -> None:
    pairs, _ = weights(make_trio)
    workers, each = worker_plan(CPU, len(pairs))
    assert 1 <= workers <= 2
    assert workers * each <= max(torch.get_num_threads(), workers)
    counts = set(map_alignment(pairs, CPU, lambda p, v, n: torch.get_num_threads()))
    assert counts == {each}
    assert worker_plan(CPU, 1)[0] == 1  # one weight: one worker


def test_an_error_in_a_worker_is_raised_in_order(make_trio: TrioFactory) -> None:
    pairs, _ = weights(make_trio)
    bad = pairs[3].base.name

    def fail_on_bad(pair: ModulePair, v: torch.Tensor, v_norm: float) -> str:
        if pair.base.name == bad:
            raise ValueError(bad)
        return pair.base.name

    results = map_alignment(pairs, CPU, fail_on_bad)
    assert [next(results) for _ in range(3)] == [p.base.name for p in pairs[:3]]
    with pytest.raises(ValueError, match=bad):
        next(results)


def test_a_file_cut_short_is_a_corrupt_file_error(make_trio: TrioFactory) -> None:
    pairs, _ = weights(make_trio)
    last = pairs[-1].aligned.path
    truncate(Path(last))
    with pytest.raises(CorruptFileError, match="size changed"):
        list(map_alignment(pairs, CPU, lambda p, v, n: None))


# --- paper products over row blocks ------------------------------------------------------------


def dense_paper(v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    v64 = v.double()
    return (v64 @ v64.T @ b.double()) / float(torch.linalg.matrix_norm(v64))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("block", [64, 1000, 1 << 19])
def test_blocked_paper_products_match_float64(
    transposed: bool, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row blocks of 1 to all rows of V as stored, either layout, B's of several ranks."""
    monkeypatch.setattr(projection, "BLOCK_ELEMENTS", block)
    gen = torch.Generator().manual_seed(block)
    stored = torch.randn(96, 70, generator=gen)
    v = stored.T if transposed else stored  # (70, 96) as a transposed view, or (96, 70)
    bs = [torch.randn(v.shape[0], r, generator=gen) for r in (1, 4, 3)]
    v_norm = float(torch.linalg.vector_norm(v))
    for got, b in zip(paper_projections(v, bs, v_norm), bs, strict=True):
        assert got.shape == b.shape
        assert got.is_contiguous()  # written to safetensors as it is
        assert rel_err(got, dense_paper(v, b)) <= 1e-5


@pytest.mark.parametrize("transposed", [False, True])
def test_each_b_gets_the_same_bits_alone_as_in_a_batch(
    transposed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(projection, "BLOCK_ELEMENTS", 500)
    gen = torch.Generator().manual_seed(3)
    stored = torch.randn(120, 90, generator=gen)
    v = stored.T if transposed else stored
    bs = [torch.randn(v.shape[0], r, generator=gen) for r in (4, 2, 8, 4)]
    v_norm = float(torch.linalg.vector_norm(v))
    together = paper_projections(v, bs, v_norm)
    for b, got in zip(bs, together, strict=True):
        assert torch.equal(paper_projections(v, [b], v_norm)[0], got)


# --- block Krylov on a V of low rank -----------------------------------------------------------


def test_krylov_basis_of_a_low_rank_v_stays_orthonormal() -> None:
    """V of rank 4 (600 x 500), k = 16: the Krylov blocks run out of directions; U_16 is still
    orthonormal and its first 4 columns span V's column space."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(600, 4, generator=gen, dtype=torch.float64) @ torch.randn(
        4, 500, generator=gen, dtype=torch.float64
    )
    assert min(v.shape) > projection.EXACT_SVD_MAX_DIM  # the randomized path
    u, captured = subspace_basis(v.float(), float(torch.linalg.matrix_norm(v)), rank=16)
    assert u.shape == (600, 16)
    assert float((u.T @ u - torch.eye(16)).abs().max()) <= 1e-5
    exact = torch.linalg.svd(v)[0][:, :4]
    top = u[:, :4].double()
    assert float((top @ top.T - exact @ exact.T).abs().max()) <= 1e-5
    assert captured == pytest.approx(1.0, abs=1e-6)

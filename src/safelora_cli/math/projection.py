"""Projection: the Safe LoRA math on one module, in factored form. Pure torch, no I/O.

Shapes: V (out, in), B = lora_B (out, r), A = lora_A (r, in). The out x out projector and the
out x in update B A are never built:

    Ĉ B = V (Vᵀ B) / ‖V‖_F                       (paper projection)
    U_k U_kᵀ B                                    (subspace: top-k left singular vectors of V)
    G = A Aᵀ,  ⟨P B A, B A⟩ = Σ ((P B)ᵀ B) ∘ G,   ‖X A‖² = Σ (Xᵀ X) ∘ G   (G is symmetric)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from safelora_cli.math.reasons import ZERO_DELTA, ZERO_V
from safelora_cli.settings import Projection, ProjectionSpec

EXACT_SVD_MAX_DIM = 256  # up to this min(out, in), an exact decomposition is used
# The randomized basis has blocks of k + max(OVERSAMPLE, k) columns and KRYLOV_STEPS steps
# (``_block_krylov``, 2 passes over V a step, plus 2): on a slowly decaying spectrum (600 x 500,
# σ_i = 1/sqrt(i), k = 16) U_k U_kᵀ B is then within 2e-3 of the exact SVD's, where 6 power
# iterations of subspace iteration (``torch.svd_lowrank``, 14 passes) were within 4e-3; 4 steps
# give 8e-5 for 2 more passes (tests/test_subspace.py).
OVERSAMPLE = 10
KRYLOV_STEPS = 3
# σ² of a float32 V are known to about this share of ‖V‖²_F: --energy 1 picks V's numerical rank
# rather than min(out, in).
ENERGY_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ModuleScore:
    """Everything Safe LoRA knows about one module before selection.

    ``projected_b`` is P B in float32, (out, r); None when the module is skipped.
    ``distance`` is ‖B − P B‖_F, from which the report's Pdst follows.
    """

    cosine: float | None
    projected_b: torch.Tensor | None
    v_norm: float
    b_norm: float
    projected_b_norm: float
    distance: float
    skipped: str | None = None
    subspace_rank: int | None = None
    captured_energy: float | None = None
    profile_rank: int | None = None  # k of the profile entry (min(out, in) when stored whole)
    cosine_bound: float | None = None  # |cosine − exact cosine| ≤ this (paper mode, profile)


def alignment_matrix(
    w_base: torch.Tensor, w_aligned: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """V = W_aligned − W_base in float32 on ``device``, whatever the stored dtype.

    Args:
        w_base, w_aligned: the stored weights, same shape (never written).
    Returns:
        V, float32, in the stored layout (the caller transposes fan_in_fan_out weights).
    """
    out = torch.empty(w_aligned.shape, dtype=torch.float32, device=device)
    scratch = torch.empty(out.numel(), dtype=torch.float32, device=device)
    return alignment_matrix_into(w_base, w_aligned, out, scratch)[0]


BLOCK_ELEMENTS = 1 << 19  # 2 MiB of float32: a row block stays in cache while it is worked on


def alignment_matrix_into(
    w_base: torch.Tensor, w_aligned: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """V = W_aligned − W_base into ``out``, and ‖V‖_F, in one pass over the weights.

    Both weights are converted to float32 before subtracting (never bf16/fp16, where the small
    difference cancels). Row blocks small enough to stay in cache make this one read of each
    weight and one write of V (about 1.7x faster than whole-matrix steps on CPU), and ‖V‖² is
    summed per block (in float64 across blocks) while the block is still in cache.

    Args:
        w_base, w_aligned: the stored weights, same 2-D shape, any float dtype, any device.
        out: float32 buffer of that shape on the compute device.
        scratch: float32 buffer of at least one block (``BLOCK_ELEMENTS``) on that device.
    Returns:
        (``out`` holding V, ‖V‖_F; NaN or Inf if either weight holds one).
    """
    rows = max(1, min(out.shape[0], BLOCK_ELEMENTS // max(1, out.shape[1])))
    sum_sq = torch.zeros((), dtype=torch.float64, device=out.device)  # one sync, at the end
    for start in range(0, out.shape[0], rows):
        block = out[start : start + rows]
        tmp = scratch[: block.numel()].view(block.shape)
        block.copy_(w_aligned[start : start + rows], non_blocking=True)
        tmp.copy_(w_base[start : start + rows], non_blocking=True)
        block.sub_(tmp)
        flat = block.view(-1)
        sum_sq += torch.dot(flat, flat)
    return out, math.sqrt(float(sum_sq))


def _top_singular(v: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q left singular vectors and values of V: exact when cheap, else randomized."""
    full = min(v.shape)
    if v.shape[0] <= min(EXACT_SVD_MAX_DIM, v.shape[1]):
        # few rows: eigenvectors of the small Gram matrix V Vᵀ, in float64 (exact for a float32
        # V; 27 ms against the SVD's 83 ms on a 256 x 2048 k_proj, single-threaded)
        v64 = v.double()
        eigenvalues, vectors = torch.linalg.eigh(v64 @ v64.T)  # ascending
        s = eigenvalues.flip(0)[:q].clamp_min(0.0).sqrt()
        return vectors.flip(1)[:, :q].to(v.dtype), s
    sketch = q + max(OVERSAMPLE, q)
    if full <= EXACT_SVD_MAX_DIM or sketch * (KRYLOV_STEPS + 1) > full:
        u, s, _ = torch.linalg.svd(v, full_matrices=False)
        return u[:, :q], s[:q]
    return _block_krylov(v, q, sketch)


Product = Callable[[torch.Tensor], torch.Tensor]


def _products(v: torch.Tensor) -> tuple[Product, Product]:
    """(Z -> V Z, Y -> Vᵀ Y), the skinny factor on the left of a row-major V where it can be
    (MKL runs those products faster)."""
    if v.is_contiguous():
        return (lambda z: v @ z), (lambda y: (y.T @ v).T)
    stored = v.T
    return (lambda z: (z.T @ stored).T), (lambda y: stored @ y)


def _block_krylov(v: torch.Tensor, q: int, sketch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q left singular vectors and values of V by randomized block Krylov iteration.

    The basis spans V Ω, (V Vᵀ) V Ω, ..., (V Vᵀ)^s V Ω (Ω: ``sketch`` seeded Gaussian columns,
    s = ``KRYLOV_STEPS``), each block orthonormalized against the ones before; the singular
    vectors come from V projected onto it (Rayleigh-Ritz), reusing the Vᵀ Q_j of the iteration
    unless a block vanished (V of low rank). Every block is kept, where subspace iteration
    (``torch.svd_lowrank``) keeps only the last: with 3 steps (8 passes over V) it was about as
    accurate as 6 power iterations (14 passes) on slowly decaying spectra, with 4 steps 5-40x more
    accurate (Musco & Musco, NeurIPS 2015). The seed is fixed, on the generator of V's device:
    runs are reproducible and the caller's random state is untouched.
    """
    mul, tmul = _products(v)
    generator = torch.Generator(device=v.device)
    generator.manual_seed(0)
    omega = torch.randn(v.shape[1], sketch, generator=generator, device=v.device, dtype=v.dtype)
    blocks = [torch.linalg.qr(mul(omega)).Q]
    images = []  # Vᵀ Q_j of each block: the Rayleigh-Ritz step reuses them
    for _ in range(KRYLOV_STEPS):
        images.append(tmul(blocks[-1]))
        y = mul(images[-1])
        previous = torch.cat(blocks, dim=1)
        for _ in range(2):  # Gram-Schmidt twice: once loses orthogonality in float32
            y -= previous @ (previous.T @ y)
        blocks.append(torch.linalg.qr(y).Q)
    images.append(tmul(blocks[-1]))
    basis = torch.cat(blocks, dim=1)
    identity = torch.eye(basis.shape[1], dtype=v.dtype, device=v.device)
    if not torch.allclose(basis.T @ basis, identity, atol=1e-4):  # a block vanished: low rank
        basis = torch.linalg.qr(basis).Q
        images = [tmul(basis)]
    projected = torch.cat(images, dim=1).T.double()  # (L, in) = basisᵀ V
    eigenvalues, vectors = torch.linalg.eigh(projected @ projected.T)  # σ² and V's U in the basis
    s = eigenvalues.flip(0)[:q].clamp_min(0.0).sqrt()
    return basis @ vectors.flip(1)[:, :q].to(v.dtype), s


def subspace_basis(
    v: torch.Tensor, v_norm: float, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, float]:
    """U_k, the top-k left singular vectors of V, and the share of ‖V‖²_F they capture.

    Args:
        v: (out, in) float32; v_norm: ‖V‖_F > 0.
        rank: k (clamped to min(out, in)); or
        energy: the smallest k whose σ² cover this share of ‖V‖²_F (0 < E <= 1).
    Returns:
        (U_k (out, k), captured energy in [0, 1]).
    """
    full = min(v.shape)
    total = v_norm * v_norm
    if rank is not None:
        u, s = _top_singular(v, min(rank, full))
        return u, min(1.0, float((s.double() ** 2).sum()) / total)
    assert energy is not None
    q = min(32, full)
    while True:
        u, s = _top_singular(v, q)
        cumulative = torch.cumsum(s.double() ** 2, 0) / total
        reached = torch.nonzero(cumulative >= energy - ENERGY_TOLERANCE)
        if len(reached) or q == full:
            k = int(reached[0]) + 1 if len(reached) else q
            return u[:, :k], min(1.0, float(cumulative[k - 1]))
        q = min(2 * q, full)


def paper_project(v: torch.Tensor, b: torch.Tensor, v_norm: float) -> torch.Tensor:
    """Ĉ B = V (Vᵀ B) / ‖V‖_F, the paper's (and the official code's) projection.

    Args:
        v: (out, in) float32, either memory layout; b: (out, r) float32; v_norm: ‖V‖_F > 0.
    Returns:
        (out, r) float32.
    """
    return paper_projections(v, [b], v_norm)[0]


def paper_projections(
    v: torch.Tensor, bs: Sequence[torch.Tensor], v_norm: float
) -> list[torch.Tensor]:
    """Ĉ B_i for several B's on one V (the adapters of a batch), each as ``paper_project``.

    On CPU, in two passes over row blocks of V as stored (S = V, or S = Vᵀ for a transposed
    module), every product of a pass working on a block while it is in cache: a batch of 8
    reads V twice instead of 16 times (25% faster on TinyLlama's MLP shapes, single-threaded).
    Each B goes through the same operations whether alone or with others, so every adapter of a
    batch gets the bits it gets alone. The skinny factor stands on the left of the first product
    (Bᵀ V, not Vᵀ B): MKL runs it 1.2-1.5x faster.

    Args:
        v: (out, in) float32, either memory layout; bs: (out, r_i) float32; v_norm: ‖V‖_F > 0.
    Returns:
        (out, r_i) float32, contiguous, for each B, in order.
    """
    stored = v if v.is_contiguous() else v.T
    if v.device.type != "cpu" or not stored.is_contiguous():  # whole products suit a GPU
        cts = [b.T @ v for b in bs]  # (r, in) = (Vᵀ B)ᵀ
        return [(v @ ct.T).div_(v_norm) for ct in cts]
    rows = max(1, BLOCK_ELEMENTS // stored.shape[1])
    blocks = [(i, stored[i : i + rows]) for i in range(0, stored.shape[0], rows)]
    if stored is v:  # (Vᵀ B)ᵀ = Σ B_kᵀ S_k over row blocks k; then (Ĉ B)_k = S_k (Vᵀ B)
        cts = [torch.zeros(b.shape[1], v.shape[1], dtype=v.dtype) for b in bs]
        for i, block in blocks:
            for b, ct in zip(bs, cts, strict=True):
                ct.addmm_(b[i : i + rows].T, block)
        projected = [torch.empty(b.shape, dtype=v.dtype) for b in bs]
        for i, block in blocks:
            for pb, ct in zip(projected, cts, strict=True):
                torch.mm(block, ct.T, out=pb[i : i + rows])
        return [pb.div_(v_norm) for pb in projected]
    # V = Sᵀ: (Vᵀ B)ᵀ_k = Bᵀ S_kᵀ per block; then (Ĉ B)ᵀ = Σ (Vᵀ B)ᵀ_k S_k
    cts = [torch.empty(b.shape[1], v.shape[1], dtype=v.dtype) for b in bs]
    for i, block in blocks:
        for b, ct in zip(bs, cts, strict=True):
            torch.mm(b.T, block.T, out=ct[:, i : i + rows])
    pts = [torch.zeros(b.shape[1], v.shape[0], dtype=v.dtype) for b in bs]
    for i, block in blocks:
        for pt, ct in zip(pts, cts, strict=True):
            pt.addmm_(ct[:, i : i + rows], block)
    return [pt.div_(v_norm).T.contiguous() for pt in pts]  # row-major, as B is stored


def factored_cosine(pb: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[float, float]:
    """cos(P B A, B A) over the flattened (out, in) matrices, and ‖B A‖_F, via r x r Grams.

    Computed in float64 (the inputs are skinny, so this is cheap).

    Args:
        pb: P B, (out, r); b: B, (out, r); a: A, (r, in).
    Returns:
        (cosine, ‖B A‖_F); the cosine is 0 when P B A = 0.
    """
    pb64, b64, a64 = pb.double(), b.double(), a.double()
    gram = a64 @ a64.T
    inner = float(((pb64.T @ b64) * gram).sum())
    ba_sq = float(((b64.T @ b64) * gram).sum())
    pba_sq = float(((pb64.T @ pb64) * gram).sum())
    if pba_sq <= 0.0 or ba_sq <= 0.0:
        return 0.0, math.sqrt(max(ba_sq, 0.0))
    return max(-1.0, min(1.0, inner / math.sqrt(ba_sq * pba_sq))), math.sqrt(ba_sq)


def score_module(
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    spec: ProjectionSpec = ProjectionSpec(),
    v_norm: float | None = None,
) -> ModuleScore:
    """Score one module: project B, and the cosine between P B A and B A.

    Args:
        v: V, (out, in) float32; a: lora_A, (r, in); b: lora_B, (out, r), any float dtype, on
            the same device as ``v``.
        spec: the projector (paper by default).
        v_norm: ‖V‖_F when already known (``alignment_matrix_into`` computes it).
    Returns:
        The score; ``skipped`` says why when V = 0 or B A = 0 (the cosine is then undefined).
        A non-finite ``v_norm`` means V (so a weight) holds NaN or Inf: the caller must check.
    """
    return score_modules(v, [(a, b)], spec, v_norm)[0]


def score_modules(
    v: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    spec: ProjectionSpec = ProjectionSpec(),
    v_norm: float | None = None,
) -> list[ModuleScore]:
    """``score_module`` for several modules on the same V (the adapters of a batch), as
    ``projector(v, spec, v_norm)(factors)``.

    Args:
        v: V, (out, in) float32; factors: (lora_A (r_i, in), lora_B (out, r_i)) of each module.
        spec, v_norm: as for ``score_module``.
    Returns:
        One score per module, in order.
    """
    return projector(v, spec, v_norm)(factors)


Scorer = Callable[[Sequence[tuple[torch.Tensor, torch.Tensor]]], list[ModuleScore]]
"""Scores modules on one V: (lora_A, lora_B) of each -> one score each, in order."""


def projector(
    v: torch.Tensor, spec: ProjectionSpec = ProjectionSpec(), v_norm: float | None = None
) -> Scorer:
    """What scores modules on one V, called as often as the caller likes (a batch scored a part
    at a time, to hold few factors at once): the subspace basis is found once, here, and each B
    is projected on its own, so that every adapter's result is the same, bit for bit, whatever
    the modules it is scored with. (Stacking the B's into one product would be faster, but BLAS
    then rounds differently: measured with MKL, for r = 4.)

    Args:
        v: V, (out, in) float32, valid as long as the scorer is used.
        spec, v_norm: as for ``score_module``.
    """
    if v_norm is None:
        v_norm = float(torch.linalg.vector_norm(v))
    norm = v_norm
    if not math.isfinite(norm) or norm == 0.0:
        reason = ZERO_V if norm == 0.0 else None

        def skipped(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[ModuleScore]:
            norms = [float(torch.linalg.vector_norm(b.float())) for _, b in factors]
            return [ModuleScore(None, None, norm, n, n, 0.0, reason) for n in norms]

        return skipped
    basis = (
        subspace_basis(v, norm, spec.rank, spec.energy)
        if spec.kind is Projection.SUBSPACE
        else None
    )

    def scores(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[ModuleScore]:
        bs = [b.float() for _, b in factors]
        b_norms = [float(torch.linalg.vector_norm(b)) for b in bs]
        if basis is not None:
            u, captured = basis
            return [
                _module_score(u @ (u.T @ b), b, a.float(), b_norm, norm, u.shape[1], captured)
                for b, (a, _), b_norm in zip(bs, factors, b_norms, strict=True)
            ]
        return [
            _module_score(pb, b, a.float(), b_norm, norm, None, None)
            for pb, b, (a, _), b_norm in zip(
                paper_projections(v, bs, norm), bs, factors, b_norms, strict=True
            )
        ]

    return scores


def _module_score(
    pb: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    b_norm: float,
    v_norm: float,
    k: int | None,
    captured: float | None,
) -> ModuleScore:
    pb = pb.contiguous()
    cosine, ba_norm = factored_cosine(pb, b, a)
    if ba_norm == 0.0:
        return ModuleScore(None, None, v_norm, b_norm, b_norm, 0.0, ZERO_DELTA)
    return ModuleScore(
        cosine=cosine,
        projected_b=pb,
        v_norm=v_norm,
        b_norm=b_norm,
        projected_b_norm=float(torch.linalg.vector_norm(pb)),
        distance=float(torch.linalg.vector_norm(b - pb)),
        subspace_rank=k,
        captured_energy=captured,
    )

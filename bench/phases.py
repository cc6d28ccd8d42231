"""Phase breakdown of safelora's hot path, one step at a time, on one fixture.

py-spy (profiling.py) shows where the real run spends its time, spread over threads. This script
replays the per-module work serially with the library's own functions (``sources.stream`` /
``projection``), with torch single-threaded as in each of the stream's workers, and times each
step apart:

    read      both weights' bytes into reused buffers (``TensorReader.read_into``)
    align     V = W_a − W_b in fp32 and ‖V‖_F (``alignment_matrix_into``: blocked convert,
              subtract and norm)
    matmul    ``paper_project``: V (Vᵀ B) / ‖V‖_F
    cosine    ``factored_cosine`` and the small norms of ``score_module``

and, to size changes, some alternatives (the ``alt_*`` keys):

    alt_matmul_whole     V (Vᵀ B) / ‖V‖_F as two whole-matrix products (the code before)
    alt_matmul_2threads  ``paper_project`` with torch's intra-op threads (all cores)
    alt_batch_*          8 adapters on the first layers: 8 whole-matrix calls, the shipped
                         ``paper_projections`` on all 8, one call on the stacked [B_1 .. B_8]
    alt_subspace         the first layers with --projection subspace --rank 16, as shipped
    alt_subspace_*       4 Krylov steps; the code before (full SVD up to 256 wide, else
                         ``torch.svd_lowrank`` with 6 power iterations)

Usage: python bench/phases.py FIXTURE_DIR [--sample-layers 2]; prints JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from safelora_cli.inputs.adapter import load_adapter
from safelora_cli.inputs.index import index_folder
from safelora_cli.inputs.loader import TensorReader
from safelora_cli.inputs.pairing import ModulePair, pair_modules
from safelora_cli.math import projection
from safelora_cli.math.projection import (
    factored_cosine,
    paper_project,
    paper_projections,
    subspace_basis,
)
from safelora_cli.sources import stream

BATCH = 8
THREADS = torch.get_num_threads()  # all cores, before the replay goes single-threaded


class Clock:
    """Accumulates seconds per phase name."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    def time(self, phase: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = fn()
        self.seconds[phase] += time.perf_counter() - started
        return result


class Buffers:
    """Reused buffers, as each of ``stream.map_alignment``'s workers keeps them: raw bytes, V, a
    scratch block."""

    def __init__(self, pairs: list[ModulePair]) -> None:
        nbytes = max(max(p.base.nbytes, p.aligned.nbytes) for p in pairs)
        numel = max(p.shape[0] * p.shape[1] for p in pairs)
        self.raw = (torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8))
        self.v = torch.empty(numel, dtype=torch.float32)
        block = max(projection.BLOCK_ELEMENTS, *(p.base.shape[-1] for p in pairs))
        self.scratch = torch.empty(min(block, numel), dtype=torch.float32)


def read(reader: TensorReader, buffers: Buffers, pair: ModulePair) -> tuple[torch.Tensor, ...]:
    return reader.read_into(pair.base, buffers.raw[0]), reader.read_into(
        pair.aligned, buffers.raw[1]
    )


def align(
    buffers: Buffers, w_base: torch.Tensor, w_aligned: torch.Tensor
) -> tuple[torch.Tensor, float]:
    out = buffers.v[: w_base.numel()].view(w_base.shape)
    v, v_norm = projection.alignment_matrix_into(w_base, w_aligned, out, buffers.scratch)
    return v, float(v_norm)


def module_phases(
    clock: Clock, reader: TensorReader, adapters: TensorReader, buffers: Buffers, pair: ModulePair
) -> None:
    w_base, w_aligned = clock.time("read", lambda: read(reader, buffers, pair))
    v, v_norm = clock.time("align", lambda: align(buffers, w_base, w_aligned))
    a, b = adapters.read(pair.lora.a).float(), adapters.read(pair.lora.b).float()
    pb = clock.time("matmul", lambda: paper_project(v, b, v_norm))

    def rest() -> None:
        factored_cosine(pb, b, a)
        float(torch.linalg.vector_norm(pb))
        float(torch.linalg.vector_norm(b - pb))

    clock.time("cosine", rest)
    clock.time("alt_matmul_whole", lambda: (v @ (v.T @ b)).div_(v_norm))
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        clock.time("alt_matmul_2threads", lambda: paper_project(v, b, v_norm))
    finally:
        torch.set_num_threads(threads)


def sample_phases(
    clock: Clock, reader: TensorReader, adapters: TensorReader, buffers: Buffers, pair: ModulePair
) -> None:
    """Batch and subspace costs on one module (the caller limits these to a few layers)."""
    v, v_norm = align(buffers, *read(reader, buffers, pair))
    b = adapters.read(pair.lora.b).float()
    gen = torch.Generator().manual_seed(0)
    bs = [b] + [torch.randn(b.shape, generator=gen) for _ in range(BATCH - 1)]
    clock.time("alt_batch_paper_1", lambda: paper_project(v, b, v_norm))
    clock.time("alt_batch_paper_8_separate", lambda: [(v @ (v.T @ x)).div_(v_norm) for x in bs])
    clock.time("alt_batch_paper_8_blocked", lambda: paper_projections(v, bs, v_norm))
    clock.time("alt_batch_paper_8_stacked", lambda: paper_project(v, torch.cat(bs, 1), v_norm))

    def subspace() -> None:
        u, _ = subspace_basis(v, v_norm, rank=16)
        u @ (u.T @ b)

    def before() -> None:  # the code before: a full SVD up to 256 wide, else torch.svd_lowrank
        if min(v.shape) <= projection.EXACT_SVD_MAX_DIM:
            u = torch.linalg.svd(v, full_matrices=False)[0]
        else:
            u = torch.svd_lowrank(v, q=32, niter=6)[0]
        u[:, :16] @ (u[:, :16].T @ b)

    clock.time("alt_subspace", subspace)
    shipped = projection.KRYLOV_STEPS
    projection.KRYLOV_STEPS = 4  # the module reads it at call time
    try:
        clock.time("alt_subspace_krylov4", subspace)
    finally:
        projection.KRYLOV_STEPS = shipped
    clock.time("alt_subspace_before", before)


def run(root: Path, sample_layers: int) -> dict[str, Any]:
    found = pair_modules(
        load_adapter(root / "adapter"), index_folder(root / "base"), index_folder(root / "aligned")
    )
    pairs = sorted(found, key=lambda p: (str(p.base.path), p.base.offset))
    sampled = [p for p in pairs if int(p.name.split(".")[2]) < sample_layers]
    buffers = Buffers(pairs)
    clock = Clock()
    workers, threads = stream.worker_plan(torch.device("cpu"), len(pairs))
    torch.set_num_threads(threads)  # as in each worker
    with torch.inference_mode(), TensorReader() as reader, TensorReader() as adapters:
        for pair in pairs:
            module_phases(clock, reader, adapters, buffers, pair)
        for pair in sampled:
            sample_phases(clock, reader, adapters, buffers, pair)
    return {
        "fixture": str(root),
        "modules": len(pairs),
        "sampled_modules": len(sampled),
        "sample_layers": sample_layers,
        "threads": torch.get_num_threads(),
        "workers": workers,
        "krylov_steps": projection.KRYLOV_STEPS,
        "targeted_bytes": sum(p.base.nbytes + p.aligned.nbytes for p in pairs),
        "elements": sum(p.shape[0] * p.shape[1] for p in pairs),
        "seconds": dict(clock.seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Phase breakdown of the hot path.")
    parser.add_argument("fixture", type=Path, help="folder with base/, aligned/, adapter/")
    parser.add_argument("--sample-layers", type=int, default=2)
    args = parser.parse_args(argv)
    json.dump(run(args.fixture, args.sample_layers), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

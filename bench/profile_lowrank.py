"""Alignment profiles on TinyLlama-1.1B shapes: build time, size and paper-mode accuracy.

Usage: .venv/bin/python bench/profile_lowrank.py [--repeats N] [--quick] [--json PATH]

Pure library calls (``lowrank.decompose``, ``lowrank_score.score_entry``), nothing read from disk:
the V's are made in memory, as ``safelora_cli.synthetic`` makes a pair, in two flavours:

- ``lowrank4``: W random, aligned = W + a rank-4 update of 2% of ‖W‖ (the synthetic pair), both
  rounded to bf16, V = aligned − base in float32: rank 4 plus a flat bf16 rounding floor.
- ``slow``: the same, but the update has σ_i ∝ i^-1/2 over every direction (random singular
  vectors): a slowly decaying spectrum, as fine-tuning deltas have, plus the bf16 floor.

Times are wall and CPU seconds of ``decompose`` (the least of N runs; torch's intra-op threads as
set, see the header line), so they exclude reading the weights; each row records the load average,
as other processes on the machine inflate both. Cosine errors compare the profile's paper
cosine with the model-pair one (``projection.score_module`` on the same V) for rank-16 adapters
whose lora_B leans towards span(V) by 0..1 (as ``synthetic.make_adapter``), next to the bound.
Last, one layer's rank-32 profile is written, read back (checked) and used to score an adapter:
x 22 is what scoring a TinyLlama adapter through a profile costs, after Python and torch start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from safelora_cli.inputs.loader import TensorReader
from safelora_cli.math.lowrank import AUTO, EXACT, RANDOMIZED, LowRank, RankRule, decompose
from safelora_cli.math.lowrank_score import score_entry
from safelora_cli.math.projection import score_module
from safelora_cli.runs.profile_build import build_profile, write_profile
from safelora_cli.sources.profile import load_entry, read_profile

SHAPES = {"q/o_proj": (2048, 2048), "k/v_proj": (256, 2048),
          "gate/up_proj": (5632, 2048), "down_proj": (2048, 5632)}  # fmt: skip
# per layer: q, k, v, o, gate, up, down
LAYER = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048),
         (5632, 2048), (5632, 2048), (2048, 5632)]  # fmt: skip
LAYERS, HIDDEN, VOCAB = 22, 2048, 32000


def pair_bytes() -> int:
    """Base + aligned in bf16: embeddings, lm_head, 22 blocks (+ their two norms), final norm."""
    params = 2 * VOCAB * HIDDEN + LAYERS * (sum(o * i for o, i in LAYER) + 2 * HIDDEN) + HIDDEN
    return 2 * 2 * params


def make_v(shape: tuple[int, int], flavour: str, seed: int = 0) -> torch.Tensor:
    """V = bf16(W + Δ) − bf16(W) in float32, ‖Δ‖_F = 2% of ‖W‖_F."""
    out, inp = shape
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) / math.sqrt(inp)
    n = 4 if flavour == "lowrank4" else min(shape)
    u, _ = torch.linalg.qr(torch.randn(out, n, generator=gen))
    r, _ = torch.linalg.qr(torch.randn(inp, n, generator=gen))
    sigma = torch.ones(n) if flavour == "lowrank4" else torch.arange(1, n + 1) ** -0.5
    delta = (u * sigma) @ r.T
    delta *= 0.02 * float(w.norm()) / float(delta.norm())
    return (w + delta).bfloat16().float() - w.bfloat16().float()


def timed(
    v: torch.Tensor, rule: RankRule, method: str, repeats: int
) -> tuple[LowRank, float, float]:
    """The entry, and the least wall and CPU seconds of ``repeats`` runs."""
    norm = float(v.double().norm())
    walls, cpus, entry = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        entry = decompose(v, norm, rule, method)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    assert entry is not None
    return entry, min(walls), min(cpus)


def adapter(v: torch.Tensor, lean: float, seed: int, r: int = 16) -> tuple[torch.Tensor, ...]:
    """(A, B) as ``synthetic.make_adapter``: B = lean · (inside span V) + (1 − lean) · noise."""
    gen = torch.Generator().manual_seed(seed)
    out, inp = v.shape
    inside = v.double() @ torch.randn(inp, r, generator=gen, dtype=torch.float64)
    noise = torch.randn(out, r, generator=gen, dtype=torch.float64)
    b = lean * inside / float(inside.norm()) + (1 - lean) * noise / float(noise.norm())
    a = torch.randn(r, inp, generator=gen, dtype=torch.float64) / math.sqrt(inp)
    return a.float(), b.float()


def accuracy(v: torch.Tensor, entry: LowRank, adapters: int) -> dict[str, float]:
    errors, bounds = [], []
    for seed in range(adapters):
        a, b = adapter(v, lean=seed / max(1, adapters - 1), seed=100 + seed)
        exact = score_module(v, a, b)
        profiled = score_entry(entry, a, b)
        assert exact.cosine is not None
        assert profiled.cosine is not None
        assert profiled.cosine_bound is not None
        errors.append(abs(profiled.cosine - exact.cosine))
        bounds.append(profiled.cosine_bound)
        assert errors[-1] <= bounds[-1] + 1e-6, (errors[-1], bounds[-1])
    return {"max_error": max(errors), "median_error": statistics.median(errors),
            "max_bound": max(bounds), "median_bound": statistics.median(bounds)}  # fmt: skip


def scoring(repeats: int) -> dict[str, float]:
    """One TinyLlama layer at rank 32 written, read back and scored (rank-16 adapters); the
    22-layer figure is 22 x one layer."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    rule = RankRule(rank=32, tolerance=None)
    vs = [make_v(shape, "lowrank4", seed=i) for i, shape in enumerate(LAYER)]
    items = [
        (f"layer.{n}.weight", v, float(v.double().norm())) for n, v in zip(names, vs, strict=True)
    ]
    factors = [adapter(v, lean=0.5, seed=i) for i, v in enumerate(vs)]
    entries = build_profile(items, rule)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "layer.safetensors"
        size = write_profile(path, entries, {}, rule)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            profile = read_profile(path)
            with TensorReader() as reader:
                for (name, _, _), (a, b) in zip(items, factors, strict=True):
                    score_entry(load_entry(profile, name, reader), a, b)
            best = min(best, time.perf_counter() - start)
    return {"layer_file_bytes": size, "layer_read_and_score_seconds": best,
            "model_read_and_score_seconds": LAYERS * best}  # fmt: skip


def layer_bytes(k: int) -> int:
    return sum((out * min(k, out, inp) + min(k, out, inp)) * 4 for out, inp in LAYER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2048x2048 and 256x2048 only")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-accuracy", action="store_true", help="times and sizes only")
    parser.add_argument(
        "--flavour", choices=["lowrank4", "slow"], action="append", help="default: both"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    rows: list[dict[str, Any]] = []
    shapes = dict(list(SHAPES.items())[:2]) if args.quick else SHAPES
    rules = {"rank 32": RankRule(rank=32, tolerance=None),
             **{f"tol {t}": RankRule(tolerance=t) for t in (0.05, 0.02, 0.01, 0.005)}}  # fmt: skip
    with torch.inference_mode():
        for flavour in args.flavour or ("lowrank4", "slow"):
            for label, shape in shapes.items():
                v = make_v(shape, flavour)
                for rule_name, rule in rules.items():
                    methods = (
                        (EXACT, RANDOMIZED, AUTO) if rule_name == "rank 32" else (RANDOMIZED, AUTO)
                    )
                    for method in methods:
                        entry, seconds, cpu = timed(v, rule, method, args.repeats)
                        row = {"v": flavour, "shape": label, "rule": rule_name, "method": method,
                               "used": entry.method, "kind": entry.kind, "k": entry.rank,
                               "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                               "bytes": entry.nbytes, "load": round(os.getloadavg()[0], 2),
                               "relative_error": entry.relative_error,
                               "captured": entry.captured_energy}  # fmt: skip
                        if method == AUTO and not args.no_accuracy:
                            row.update(accuracy(v, entry, adapters=6))
                        rows.append(row)
                        print(json.dumps(row))
    timing = scoring(args.repeats)
    print(json.dumps(timing))
    size32, pair = LAYERS * layer_bytes(32), pair_bytes()
    print(f"rank-32 profile of the 22-layer model: {size32 / 1e6:.1f} MB tensor data, "
          f"{100 * size32 / pair:.2f}% of the pair ({pair / 1e9:.2f} GB)")  # fmt: skip
    if args.json:
        result = {"rows": rows, "rank32_bytes": size32, "pair_bytes": pair, **timing}
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

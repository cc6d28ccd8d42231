"""Cost of P D for a full fine-tune, per weight: both associations of Ĉ D, and safelora's path.

Usage: python bench/full_projection.py [--runs N] [--threads T] [--shapes OUTxIN ...]

For each shape (TinyLlama-1.1B's by default) it times, on random float32 V and D:

    (V Vᵀ) D      the out x out Gram first: 2·out²·in multiply-adds
    V (Vᵀ D)      the in x in Gram first:   2·out·in² multiply-adds
    score         ``full.score_delta`` (cheaper association, blocked, with cos / norms)
    write         ``full.project_delta`` + ``full.merged_weight`` to bf16 (the selected weights)

and prints seconds (median and min of ``runs``) and GFLOP/s (2 flops per multiply-add). Then it
extrapolates a Llama-2-7B fine-tune (32 layers; q/k/v/o 4096², gate/up 11008x4096, down
4096x11008) from the slowest measured GFLOP/s of the largest shapes: an extrapolation, not a
measurement. The numbers do not depend on the values, only on the shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from safelora_cli.math.full import merged_weight, project_delta, score_delta
from safelora_cli.math.projection import ProjectionSpec

TINYLLAMA = ["2048x2048", "256x2048", "5632x2048", "2048x5632"]
LLAMA7B_LAYER = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}  # shape -> count per layer
LLAMA7B_LAYERS = 32


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    fn()  # warm-up: allocator, MKL threads
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def macs(out: int, inp: int, gram_first: bool) -> int:
    return 2 * out * out * inp if gram_first else 2 * out * inp * inp


def cheapest(out: int, inp: int) -> int:
    return 2 * out * inp * min(out, inp)


def measure(out: int, inp: int, runs: int, gen: torch.Generator) -> dict[str, tuple[float, ...]]:
    """label -> (median s, min s, GFLOP/s at the median) for one shape."""
    v = torch.randn(out, inp, generator=gen)
    d = torch.randn(out, inp, generator=gen)
    w = torch.randn(out, inp, generator=gen).to(torch.bfloat16)
    v_norm, spec = float(v.norm()), ProjectionSpec()

    def write() -> object:
        return merged_weight(w, project_delta(v, d, spec, v_norm)[0], w.dtype, "w")

    cases: dict[str, tuple[Callable[[], object], int]] = {
        "(VVt)D": (lambda: (v @ v.T) @ d, macs(out, inp, True)),
        "V(VtD)": (lambda: v @ (v.T @ d), macs(out, inp, False)),
        "score": (lambda: score_delta(v, d, spec, v_norm), cheapest(out, inp)),
        "write": (write, cheapest(out, inp)),
    }
    rows = {}
    for label, (fn, work) in cases.items():
        with torch.inference_mode():
            median, best = timed(fn, runs)
        rows[label] = (median, best, 2 * work / median / 1e9)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shapes", nargs="*", default=TINYLLAMA)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':>10} {'path':>8} {'median s':>9} {'min s':>7} {'GFLOP/s':>8}")
    rates = []
    for text in args.shapes:
        out, inp = map(int, text.split("x"))
        for label, (median, best, rate) in measure(out, inp, args.runs, gen).items():
            print(f"{text:>10} {label:>8} {median:9.3f} {best:7.3f} {rate:8.1f}")
            if label == "score" and min(out, inp) >= 2048:
                rates.append(rate)
    flops = 2 * LLAMA7B_LAYERS * sum(n * cheapest(*s) for s, n in LLAMA7B_LAYER.items())
    slow = min(rates)
    print(
        f"Llama-2-7B, every block matrix scored once: {flops / 1e12:.0f} TFLOP; at the slowest "
        f"measured score rate ({slow:.0f} GFLOP/s) that is {flops / slow / 1e9 / 60:.0f} min "
        "(extrapolated), plus one write pass per selected weight"
    )


if __name__ == "__main__":
    main()

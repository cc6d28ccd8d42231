"""Interleaved A/B of source trees on the bench's cases: did a change help, on a noisy machine?

Usage: python bench/compare.py [--runs N] CASES LABEL=SRC [LABEL=SRC ...]

    git archive HEAD~1 src | tar -x -C /tmp/before        # the source before the change
    python bench/compare.py patch-22,batch-6 before=/tmp/before/src after=src

CASES are bench/run.py's case keys, comma-separated; SRC is a folder holding ``safelora_cli``
(put first on PYTHONPATH). Each round runs every (case, source) pair once, in turn, after waiting
for the machine to go quiet; a run during which the rest of the machine used more than 0.3 cores
is repeated (up to 4 times). Consecutive runs see about the same machine, which one `make bench`
after another does not: on a shared host the same build measured 4.1 s and 5.4 s an hour apart.
Prints every run, then per pair the median, min and max wall time, and the per-round ratio to
the first source on the same case.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

from fixtures import FULL, SLICE, ensure, ensure_finetune
from measure import IDLE_CORES, Sample, log, run_once, wait_for_idle
from run import CACHE, REPO, cases

RETRIES = 4


def measure_pair(command: list[str], src: Path, output: Path | None, settle: bool) -> Sample:
    """One quiet run of ``command`` with ``src`` first on PYTHONPATH (``settle``: sync first)."""
    os.environ["PYTHONPATH"] = str(src.resolve())
    for _ in range(RETRIES + 1):
        if output is not None:
            shutil.rmtree(output, ignore_errors=True)
        if settle:
            os.sync()
        wait_for_idle(120.0)
        sample = run_once(command)
        if sample.rc != 0:
            raise SystemExit(f"{src}: exit {sample.rc}: {sample.stderr_tail}")
        if sample.other_cores < IDLE_CORES:
            break
    return sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("cases", help="comma-separated case keys of bench/run.py")
    parser.add_argument("sources", nargs="+", metavar="LABEL=SRC")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    full, part = ensure(CACHE, FULL), ensure(CACHE, SLICE)
    known = {case.key: case for case in cases(full, part, ensure_finetune(part))}
    wanted = args.cases.split(",")
    if unknown := [key for key in wanted if key not in known]:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(known)}")
    sources = [(label, Path(src)) for label, _, src in (s.partition("=") for s in args.sources)]
    pairs = [(f"{key}/{label}", known[key], src) for key in wanted for label, src in sources]
    samples: dict[str, list[Sample]] = {name: [] for name, _, _ in pairs}
    for k in range(args.runs):
        for name, case, src in pairs:
            sample = measure_pair(case.command, src, case.output, case.settle)
            samples[name].append(sample)
            log(
                f"round {k + 1}: {name}: {sample.wall_s:.2f} s, cpu {sample.cpu_s:.2f} s, "
                f"other load {sample.other_cores:.2f}"
            )
    for name, got in samples.items():
        first = samples[f"{name.split('/')[0]}/{sources[0][0]}"]  # this case, the first source
        walls = [s.wall_s for s in got]
        ratios = [s.wall_s / f.wall_s for s, f in zip(got, first, strict=True)]
        print(
            f"{name}: median {statistics.median(walls):.2f} s (min {min(walls):.2f}, max "
            f"{max(walls):.2f}), peak RSS {max(s.peak_rss_kib for s in got) / 1024:.0f} MiB, "
            f"other load ≤ {max(s.other_cores for s in got):.2f}; / {sources[0][0]} per round: "
            + " ".join(f"{r:.2f}" for r in ratios)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make bench``: whole-process wall time and peak RSS of ``safelora patch`` on synthetic
TinyLlama-1.1B-shaped models, against the read floor and a dense implementation of the paper's
algorithm.

Usage: python bench/run.py [--runs N] [--no-profile] [--wait-idle S] [--results PATH]

Builds its fixtures once into bench/cache/ (see fixtures.py), measures every case (one warm-up run,
then N runs: median, min, max, peak RSS), checks the targets, profiles the 22-layer job, and writes
bench/RESULTS.md. Exits 1 when a case that must work fails (a target missed is reported, not fatal).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fixtures import FULL, SLICE, Built, ensure, ensure_finetune, ensure_linked_batch
from measure import Measurement, log, measure
from more_cases import case_specs, profile_check, render_check, target_specs
from profiling import profile
from results import Context, Target, render

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CACHE = Path("bench/cache")  # relative to REPO: commands in RESULTS.md read as typed
OUT = CACHE / "out"
LINKED = 100  # the flat-memory batch: hard-linked copies of the 6-layer adapter


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    command: list[str]
    optional: bool = False  # a feature being built: a rejected invocation is "not available"
    output: Path | None = None
    runs: int | None = None  # None: --runs; fewer for the cases that take minutes
    settle: bool = False  # sync before each run (cases that write a whole model)


def _rel(path: str | Path) -> str:
    return os.path.relpath(path, REPO)


def safelora_command() -> list[str]:
    """The installed console script, else ``python -m safelora_cli``."""
    script = Path(sys.executable).parent / "safelora"
    return [_rel(script)] if script.exists() else [_rel(sys.executable), "-m", "safelora_cli"]


def patch_command(fixture: Built, adapters: list[Path], output: Path, *extra: str) -> list[str]:
    return [*safelora_command(), "patch", *map(str, adapters), "--base", str(fixture.base),
            "--aligned", str(fixture.aligned), "--output", str(output), *extra]  # fmt: skip


def cases(full: Built, part: Built, finetune: Path) -> list[Case]:
    python = _rel(sys.executable)
    dense_out = OUT / "dense-6"
    more = [
        Case(key, label + (f" ({runs} run)" if runs == 1 else ""), command, output=output,
             runs=runs, settle=settle)
        for key, label, command, output, runs, settle in case_specs(safelora_command(), full,
                                                                    part, finetune)
    ]  # fmt: skip
    return [
        Case("help", "`safelora --help`", [*safelora_command(), "--help"]),
        Case("import", "`import safelora_cli.api` (torch)",
             [python, "-c", "import safelora_cli.api"]),
        Case("floor-22", "read floor 22-layer: `cat` base+aligned shards",
             ["cat", *map(str, full.shards())]),
        Case("patch-22", "patch 22-layer (154 modules, r16)",
             patch_command(full, [full.adapter], OUT / "patch-22"), output=OUT / "patch-22"),
        Case("subspace-22", "patch 22-layer `--projection subspace --rank 16`",
             patch_command(full, [full.adapter], OUT / "subspace-22", "--projection", "subspace",
                           "--rank", "16"), optional=True, output=OUT / "subspace-22"),
        Case("floor-6", "read floor 6-layer: `cat` base+aligned shards",
             ["cat", *map(str, part.shards())]),
        Case("patch-6", "patch 6-layer slice (42 modules, r16)",
             patch_command(part, [part.adapter], OUT / "patch-6"), output=OUT / "patch-6"),
        Case("batch-6", f"batch: {len(part.batch)} adapters on the 6-layer slice, one run",
             patch_command(part, part.batch, OUT / "batch-6"), optional=True,
             output=OUT / "batch-6"),
        Case("batch-100-6", f"batch: {LINKED} hard-linked copies of the adapter, 6-layer slice",
             patch_command(part, ensure_linked_batch(part, LINKED), OUT / "batch-100-6"),
             output=OUT / "batch-100-6"),
        Case("dense-6", "dense reference (bench/dense_reference.py), 6-layer slice",
             [python, "bench/dense_reference.py", str(part.adapter), "--base", str(part.base),
              "--aligned", str(part.aligned), "--output", str(dense_out)], output=dense_out),
        *more,
    ]  # fmt: skip


def targets(m: dict[str, Measurement], full: Built) -> list[Target]:
    """Every target of the issue, measured (None: a case it needs did not run)."""

    def wall(key: str) -> float | None:
        return m[key].median_s if key in m and m[key].ok else None

    def rss(key: str) -> float | None:
        return m[key].peak_rss_mb if key in m and m[key].ok else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None else None

    def per_extra(batch: float | None, one: float | None) -> float | None:
        return (batch - one) / (LINKED - 1) if batch is not None and one is not None else None

    return [
        Target("patch-22", "wall ≤ 5 s", wall("patch-22"), 5.0, "s"),
        Target("patch-22", "wall ≤ 4 s (the next step)", wall("patch-22"), 4.0, "s"),
        Target("patch-22", "peak RSS ≤ 1000 MB", rss("patch-22"), 1000.0, "MB"),
        Target("patch-22", "peak RSS ≤ 1.3× the 6-layer job's",
               ratio(rss("patch-22"), rss("patch-6")), 1.3, "×"),
        Target("patch-6", "≥ 15× faster than dense (same run)",
               ratio(wall("dense-6"), wall("patch-6")), 15.0, "×", at_least=True),
        Target("batch-6", "≤ 1.5× one adapter (patch-6)", ratio(wall("batch-6"), wall("patch-6")),
               1.5, "×"),
        Target("batch-100-6", "peak RSS ≤ 800 MB", rss("batch-100-6"), 800.0, "MB"),
        Target("batch-100-6", f"≤ 0.15 s per extra adapter ((batch − patch-6) / {LINKED - 1})",
               per_extra(wall("batch-100-6"), wall("patch-6")), 0.15, "s"),
        Target("subspace-22", "≤ 3× paper mode (patch-22)",
               ratio(wall("subspace-22"), wall("patch-22")), 3.0, "×"),
        *(Target(*spec) for spec in target_specs(wall, full)),
    ]  # fmt: skip


def selection_check(patch_report: Path, dense_report: Path) -> dict[str, Any]:
    """Do safelora and the dense reference project the same modules (and agree on cosines)?"""
    if not patch_report.is_file() or not dense_report.is_file():
        return {"ok": False, "detail": "a report is missing (did patch-6 or dense-6 fail?)"}
    ours = json.loads(patch_report.read_text())
    dense = json.loads(dense_report.read_text())
    mine = {row["module"] for row in ours["modules"] if row["projected"]}
    theirs = set(dense["selected"])
    diffs = [
        abs(row["cosine"] - dense["cosines"][row["module"]])
        for row in ours["modules"]
        if row["cosine"] is not None and row["module"] in dense["cosines"]
    ]
    return {
        "ok": mine == theirs,
        "safelora": sorted(mine),
        "dense": sorted(theirs),
        "only_safelora": sorted(mine - theirs),
        "only_dense": sorted(theirs - mine),
        "max_cosine_diff": max(diffs) if diffs else None,
        "compared": len(diffs),
        "dense_timings": dense.get("timings", {}),
    }


def phase_breakdown(fixture: Built) -> dict[str, Any]:
    command = [sys.executable, str(BENCH / "phases.py"), str(fixture.root)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _without_notes(argv: list[str] | None) -> list[str]:
    """The command line as typed, less the --note texts (they are in the Notes section)."""
    given = list(sys.argv[1:] if argv is None else argv)
    kept = []
    while given:
        arg = given.pop(0)
        if arg == "--note":
            given = given[1:]
        elif not arg.startswith("--note="):
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measured runs per case (≥ 3)")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy and phases")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        metavar="S",
        help="before each run, wait up to S s for other processes to go quiet",
    )
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--only", nargs="*", help="measure these cases only (a quick look)")
    parser.add_argument(
        "--note", action="append", default=[], help="a line for the Notes section (repeatable)"
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.runs < 3:
        parser.error("--runs must be at least 3 (the median of fewer says little)")
    os.chdir(REPO)
    # An installed package has its bytecode compiled (pip does it at install time); where
    # PYTHONDONTWRITEBYTECODE is set (as on the machine the bench was written on) every run would
    # compile safelora's sources again: 0.2-0.26 s of each run, measured.
    compileall.compile_dir(str(REPO / "src" / "safelora_cli"), quiet=1)
    full, part = ensure(CACHE, FULL), ensure(CACHE, SLICE)
    finetune = ensure_finetune(part)
    OUT.mkdir(parents=True, exist_ok=True)
    measured: dict[str, Measurement] = {}
    todo = [c for c in cases(full, part, finetune) if not args.only or c.key in args.only]
    for case in todo:
        log(f"{case.key}: {shlex.join(case.command)}")
        measured[case.key] = measure(
            case.label, case.command, case.runs or args.runs, optional=case.optional,
            output=case.output, settle=case.settle,
            wait_idle_s=args.wait_idle,
        )  # fmt: skip
    check = None
    if all(key in measured and measured[key].ok for key in ("patch-6", "dense-6")):
        check = selection_check(
            OUT / "patch-6" / "safelora_report.json", OUT / "dense-6" / "dense_report.json"
        )
        log(f"selection check (dense vs safelora, 6-layer): {'OK' if check['ok'] else 'MISMATCH'}")
    profiled, phases = None, None
    if not args.no_profile:
        log("profiling the 22-layer job (py-spy) and the phase breakdown ...")
        profile_out = OUT / "profile-22"
        shutil.rmtree(profile_out, ignore_errors=True)
        # the dense reference's 7 GB may have pushed the 22-layer shards out of the page cache:
        # read them back, so that the profile and the phases see what the measured runs saw
        subprocess.run(["cat", *map(str, full.shards())], check=True, stdout=subprocess.DEVNULL)
        profiled = profile(patch_command(full, [full.adapter], profile_out, "--quiet"))
        phases = phase_breakdown(full)
    context = Context(
        command=" ".join([_rel(sys.executable), "bench/run.py", *_without_notes(argv)]),
        cases=[(c.key, c.label) for c in todo],
        measured=measured,
        targets=targets(measured, full),
        check=check,
        profile_check=render_check(profile_check(full)),
        profile=profiled,
        phases=phases,
        fixtures={"22-layer": full, "6-layer": part},
        runs=args.runs,
        notes=args.note,
    )
    args.results.write_text(render(context))
    log(f"wrote {_rel(args.results)}")
    failed = [m.case for m in measured.values() if m.error is not None]
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

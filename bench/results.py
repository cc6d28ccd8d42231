"""RESULTS.md: the measured table, the targets, the machine, the profile, the exact commands."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fixtures import Built
from measure import Measurement, rss_method
from profiling import Profile


@dataclass(frozen=True)
class Target:
    """One target of the issue; ``measured`` is None when a case it needs did not run."""

    case: str
    description: str
    measured: float | None
    limit: float
    unit: str
    at_least: bool = False

    @property
    def ok(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def verdict(self) -> str:
        return {True: "pass", False: "**FAIL**", None: "n/a"}[self.ok]


@dataclass(frozen=True)
class Context:
    command: str
    cases: list[tuple[str, str]]
    measured: dict[str, Measurement]
    targets: list[Target]
    check: dict[str, Any] | None
    profile_check: list[str]
    profile: Profile | None
    phases: dict[str, Any] | None
    fixtures: dict[str, Built]
    runs: int
    notes: list[str]


def machine() -> list[tuple[str, str]]:
    import safetensors
    import torch

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    blas = "mkl" if torch.backends.mkl.is_available() else "other"  # type: ignore[no-untyped-call]
    return [
        ("CPU (/proc/cpuinfo)", cpu),
        ("cores", f"{os.cpu_count()} online, {len(os.sched_getaffinity(0))} usable"),
        ("RAM", f"{mem_kib / 2**20:.1f} GiB"),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("torch", f"{torch.__version__} ({torch.get_num_threads()} intra-op threads, BLAS {blas})"),
        ("safetensors", safetensors.__version__),
        ("peak RSS measured with", rss_method()),
        ("source", _git_state()),
    ]


def _git_state() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src")
    return f"commit {commit}" + (" + uncommitted changes in src/" if dirty else "")


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:.2f}{(' ' + unit) if unit and unit != '×' else unit}"


def _results_table(ctx: Context) -> list[str]:
    rows = [
        "| case | wall median s | min s | max s | peak RSS MB | other load (cores) "
        "| target | pass/fail |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for key, label in ctx.cases:
        m = ctx.measured[key]
        mine = [t for t in ctx.targets if t.case == key]
        target = "; ".join(t.description for t in mine) or "—"
        verdicts = {t.ok for t in mine}
        verdict = "—" if not mine else "**FAIL**" if False in verdicts else "pass"
        if None in verdicts and False not in verdicts:
            verdict = "n/a" if verdicts == {None} else "pass (partly n/a)"
        if m.unavailable is not None:
            rows.append(f"| {label} | not available | | | | | {target} | n/a ({m.unavailable}) |")
        elif m.error is not None:
            rows.append(f"| {label} | error | | | | | {target} | **ERROR** ({m.error}) |")
        else:
            rows.append(
                f"| {label} | {m.median_s:.2f} | {min(m.walls):.2f} | {max(m.walls):.2f} "
                f"| {m.peak_rss_mb:.0f} | {m.other_cores:.2f} | {target} | {verdict} |"
            )
    return rows


def _targets_table(ctx: Context) -> list[str]:
    rows = ["| case | target | measured | pass/fail |", "|---|---|---:|---|"]
    for t in ctx.targets:
        rows.append(f"| {t.case} | {t.description} | {_fmt(t.measured, t.unit)} | {t.verdict()} |")
    return rows


def _fixtures(ctx: Context) -> list[str]:
    lines = []
    for name, f in ctx.fixtures.items():
        shards = len(list(f.base.glob("*.safetensors")))
        lines.append(
            f"- **{name}** (`{f.root}`): base and aligned {f.size_bytes('base') / 1e9:.2f} GB each "
            f"in {shards} bf16 shards + `model.safetensors.index.json`; adapter rank 16 on "
            f"{len(f.modules)} modules ({f.size_bytes('adapter') / 1e6:.0f} MB, fp32)"
            + (f"; {len(f.batch)} more adapters (other seeds) for the batch row" if f.batch else "")
        )
    return lines


def _check(ctx: Context) -> list[str]:
    c = ctx.check
    if c is None:
        return ["Not run (patch-6 or dense-6 was not measured)."]
    if "safelora" not in c:
        return [f"**Not checked**: {c['detail']}"]
    verdict = "**same modules**" if c["ok"] else "**MISMATCH**"
    lines = [
        f"Dense reference vs safelora on the 6-layer slice (number mode, K = 10): {verdict}.",
        f"- safelora projects {len(c['safelora'])}: {', '.join(c['safelora'])}",
        f"- dense projects {len(c['dense'])}: {', '.join(c['dense'])}",
    ]
    if not c["ok"]:
        lines.append(f"- only safelora: {c['only_safelora']}; only dense: {c['only_dense']}")
    if c["max_cosine_diff"] is not None:
        lines.append(
            f"- largest |cosine difference| over {c['compared']} modules: "
            f"{c['max_cosine_diff']:.2e} (dense fp32 vs factored fp32/fp64)"
        )
    timings = c.get("dense_timings") or {}
    if timings:
        parts = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timings.items())
        lines.append(f"- dense reference, last run, in-process: {parts}")
    return lines


SUMMARY = [
    ("import (python start, torch, typer, rich)", ("import", "interpreter start")),
    ("read weights (worker threads)", ("read:",)),
    ("convert bf16→fp32 + subtract + ‖V‖", ("convert", "subtract", "‖V‖", "alignment")),
    ("matmuls (paper Ĉ B, or the subspace basis)", ("matmul",)),
    ("cosines and small norms", ("cosine", "score")),
    ("adapter factors, report, writing the output", ("read adapter", "safetensors", "write",
                                                      "report", "resolve", "CLI")),
]  # fmt: skip


def _summary(total: dict[str, float]) -> list[str]:
    lines = []
    for label, prefixes in SUMMARY:
        seconds = sum(s for step, s in total.items() if step.startswith(prefixes))
        lines.append(f"- {label}: {seconds:.2f} s")
    return lines


def _profile(p: Profile) -> list[str]:
    total: dict[str, float] = {}
    for counts in p.seconds.values():
        for step, seconds in counts.items():
            total[step] = total.get(step, 0.0) + seconds
    grand = sum(total.values()) or 1.0
    empty: dict[str, float] = {}
    main, workers = p.seconds.get("main", empty), p.seconds.get("workers", empty)
    lines = [
        f"{p.tool}, one run of the 22-layer job (`--quiet`), {p.wall_s:.1f} s wall under the "
        f"profiler{p.settings}. Seconds are on-CPU samples per Python thread, the stream's "
        "worker threads added together (two on 2 cores, one weight each, overlapping each other "
        "and the main thread), so the columns add up to more than the wall time."
        + (f" {p.note}" if p.note else ""),
        "",
        "In short (on-CPU seconds, both threads):",
        "",
        *_summary(total),
        "",
        "| step | main thread s | worker threads s | share of samples |",
        "|---|---:|---:|---:|",
    ]
    for step, seconds in sorted(total.items(), key=lambda item: -item[1]):
        lines.append(
            f"| {step} | {main.get(step, 0.0):.2f} | {workers.get(step, 0.0):.2f} "
            f"| {100 * seconds / grand:.0f}% |"
        )
    return lines


PHASES = [
    ("read", "read both weights into reused buffers (`read_into`)", True),
    ("align", "V = W_a − W_b in fp32 + ‖V‖ (`alignment_matrix_into`, blocked)", True),
    ("matmul", "`paper_project`: Ĉ B = V (Vᵀ B) / ‖V‖ (blocked, skinny factor left)", False),
    ("cosine", "factored cosine + small norms", False),
    ("alt_matmul_whole", "alt: V (Vᵀ B) / ‖V‖ as two whole products (before)", False),
    ("alt_matmul_2threads", "alt: `paper_project` with torch's 2 intra-op threads", False),
]


def _phases(ph: dict[str, Any]) -> list[str]:
    s = ph["seconds"]
    gb = ph["targeted_bytes"] / 1e9
    lines = [
        f"Serial replay of the per-module work (bench/phases.py: no worker threads, "
        f"{ph['threads']} torch thread, as in each of the real run's workers) over the "
        f"{ph['modules']} modules of the 22-layer job: {gb:.2f} GB of bf16 read, "
        f"{ph['elements'] / 1e9:.2f} G elements of V. The real run shares this work between "
        f"{ph['workers']} workers.",
        "",
        "| phase | seconds | GB/s of bf16 input |",
        "|---|---:|---:|",
    ]
    for key, label, rated in PHASES:
        if key in s:
            rate = f"{gb / s[key]:.1f}" if rated and s[key] > 0 else ""
            lines.append(f"| {label} | {s[key]:.2f} | {rate} |")
    if "alt_batch_paper_1" in s:
        one = s["alt_batch_paper_1"]
        lines += [
            "",
            f"On the first {ph['sample_layers']} layers ({ph['sampled_modules']} modules), "
            f"`paper_project` for one adapter takes {one:.2f} s; for 8 adapters:",
            "",
            "| 8 adapters on one V | seconds | × one adapter |",
            "|---|---:|---:|",
            *[
                f"| {label} | {s[key]:.2f} | {s[key] / one:.1f}× |"
                for key, label in BATCH_ALTERNATIVES
                if key in s
            ],
            "",
            f"Subspace rank 16 (U_k from the Gram matrix or block Krylov, then U Uᵀ B) on the same "
            f"modules, {ph['krylov_steps']} Krylov steps as shipped: {s['alt_subspace']:.2f} s "
            f"({s['alt_subspace'] / one:.1f}× the paper products)"
            + "".join(
                f"; {label}: {s[key]:.2f} s ({s[key] / one:.1f}×)"
                for key, label in SUBSPACE_ALTERNATIVES
                if key in s
            )
            + ".",
        ]
    return lines


BATCH_ALTERNATIVES = [
    ("alt_batch_paper_8_separate", "8 whole-matrix `paper_project` calls (before)"),
    ("alt_batch_paper_8_blocked", "`paper_projections` on all 8 (shipped: bits as alone)"),
    ("alt_batch_paper_8_stacked", "one call on the stacked (out, 8r) B (bits differ from alone)"),
]
SUBSPACE_ALTERNATIVES = [
    ("alt_subspace_krylov4", "4 Krylov steps"),
    (
        "alt_subspace_before",
        "before (full SVD up to 256 wide, else `torch.svd_lowrank` with 6 power iterations)",
    ),
]


def render(ctx: Context) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    loads = [m.other_cores for m in ctx.measured.values() if m.ok]
    out = [
        "# safelora benchmark results",
        "",
        f"Generated by a real run on {now}: `{ctx.command}` (what `make bench` runs), from the "
        f"repository root. Every case is a whole process, run once to warm the page cache and "
        f'then {ctx.runs} times (once for the cases marked "1 run", minutes each); wall is '
        f"the median (min, max), peak RSS the largest over the "
        f'runs (MB = 10⁶ bytes). "other load" is the CPU the rest of the machine used during '
        f"the noisiest run (before each run the bench waits for the machine to be quiet): "
        f"numbers measured with other load above ~0.3 cores on this 2-core machine are inflated. "
        f"safelora's bytecode is compiled before measuring, as in an installed package.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine()],
        f"| max other load in any run | {max(loads, default=0.0):.2f} cores |",
        "",
        "## Fixtures (seeded, `safelora_cli.synthetic`, cached in bench/cache/)",
        "",
        *_fixtures(ctx),
        "",
        "## Results",
        "",
        *_results_table(ctx),
        "",
        "## Targets",
        "",
        *_targets_table(ctx),
        "",
        *(["## Notes", "", *[f"- {note}" for note in ctx.notes], ""] if ctx.notes else []),
        "## Dense reference check",
        "",
        *_check(ctx),
        "",
        "## Profile accuracy check",
        "",
        *ctx.profile_check,
        "",
        "## Where the time goes",
        "",
    ]
    if ctx.profile is not None:
        out += ["### Profile of the real run", "", *_profile(ctx.profile), ""]
    if ctx.phases is not None:
        out += ["### Phase breakdown", "", *_phases(ctx.phases), ""]
    if ctx.profile is None and ctx.phases is None:
        out += ["Not profiled in this run (`--no-profile`).", ""]
    out += ["## Commands", ""]
    for key, label in ctx.cases:
        out.append(f"- {label}: `{shlex.join(ctx.measured[key].command)}`")
    return "\n".join(out) + "\n"

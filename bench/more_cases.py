"""Bench cases for alignment profiles, full fine-tunes and merged output, with their targets and
the profile's accuracy check (how far the profile's paper-mode cosines are from the pair's).

Profile targets: building the 22-layer pair's profile within 2x (issue 9) and 5x (issue 21) a
paper-mode patch, the rank-32 file within 5% of the pair, a patch through the profile within 0.5 s
of the interpreter's start (the ``import`` case). Merge target: ``patch --merge`` of the 22-layer
adapter within 1.5x of copying the aligned model (read it, write it, fsync it: what a merge cannot
avoid).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fixtures import Built

OUT = Path("bench/cache/out")
PROFILE_22 = OUT / "profile-22.safetensors"
PROFILE_R32 = OUT / "profile-r32-22.safetensors"
PROFILE_6 = OUT / "profile-6.safetensors"
HEAVY_RUNS = 1  # minutes per run on 2 cores: one warm-up and one measured run


def profile_command(cli: list[str], fixture: Built, output: Path, *extra: str) -> list[str]:
    return [*cli, "profile", "--base", str(fixture.base), "--aligned", str(fixture.aligned),
            "--output", str(output), "--force", "--quiet", *extra]  # fmt: skip


def case_specs(
    cli: list[str], full: Built, part: Built, finetune: Path
) -> list[tuple[str, str, list[str], Path | None, int | None, bool]]:
    """(key, label, command, output folder, runs (None: the bench's), settle (sync first)) for
    each case, in order: a case that reads a profile comes after the one that writes it."""
    adapter = [str(full.adapter)]
    copy = OUT / "copy-22"
    return [
        ("profile-22", "profile the 22-layer pair (default `--tolerance`)",
         profile_command(cli, full, PROFILE_22), None, HEAVY_RUNS, False),
        ("profile-r32-22", "profile the 22-layer pair `--rank 32`",
         profile_command(cli, full, PROFILE_R32, "--rank", "32"), None, HEAVY_RUNS, False),
        ("patch-profile-22", "patch 22-layer `--profile` (no model read)",
         [*cli, "patch", *adapter, "--profile", str(PROFILE_22), "--output",
          str(OUT / "patch-profile-22")], OUT / "patch-profile-22", None, False),
        ("copy-22", "merge floor: copy the aligned 22-layer model (`cp -r` + `sync`)",
         ["sh", "-c", f"cp -r {full.aligned} {copy} && sync {copy}/*"], copy, None, True),
        ("merge-22", "patch 22-layer `--merge` (a full model out)",
         [*cli, "patch", *adapter, "--base", str(full.base), "--aligned", str(full.aligned),
          "--output", str(OUT / "merge-22"), "--merge"], OUT / "merge-22", None, True),
        ("full-6", "full fine-tune, 6-layer, paper, CPU",
         [*cli, "patch", str(finetune), "--base", str(part.base), "--aligned",
          str(part.aligned), "--output", str(OUT / "full-6")], OUT / "full-6", HEAVY_RUNS, True),
        ("profile-6", "profile the 6-layer pair (default `--tolerance`)",
         profile_command(cli, part, PROFILE_6), None, HEAVY_RUNS, False),
        ("full-profile-6", "full fine-tune, 6-layer, through the profile",
         [*cli, "patch", str(finetune), "--profile", str(PROFILE_6), "--aligned",
          str(part.aligned), "--output", str(OUT / "full-profile-6")], OUT / "full-profile-6",
         HEAVY_RUNS, True),
    ]  # fmt: skip


def target_specs(
    wall: Callable[[str], float | None], full: Built
) -> list[tuple[str, str, float | None, float, str]]:
    """(case, description, measured, limit, unit) for each target of these cases."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None else None

    def minus(a: float | None, b: float | None) -> float | None:
        return a - b if a is not None and b is not None else None

    pair = full.size_bytes("base") + full.size_bytes("aligned")
    r32 = PROFILE_R32.stat().st_size if PROFILE_R32.is_file() else None
    patch, start = wall("patch-profile-22"), wall("import")
    return [
        ("profile-22", "≤ 2× paper-mode patch (patch-22; issue 9)",
         ratio(wall("profile-22"), wall("patch-22")), 2.0, "×"),
        ("profile-22", "≤ 5× paper-mode patch (patch-22; issue 21)",
         ratio(wall("profile-22"), wall("patch-22")), 5.0, "×"),
        ("profile-r32-22", "file ≤ 5% of the pair",
         None if r32 is None else 100.0 * r32 / pair, 5.0, "%"),
        ("patch-profile-22", "≤ start-up (import case) + 0.5 s",
         None if patch is None or start is None else patch - start, 0.5, "s"),
        ("merge-22", "≤ 1.5× copying the aligned model (copy-22)",
         ratio(wall("merge-22"), wall("copy-22")), 1.5, "×"),
        ("merge-22", "what it adds to patch-22 ≤ 1.5× copy-22 (a reading of the target: the "
         "merge must score first)", ratio(minus(wall("merge-22"), wall("patch-22")),
                                          wall("copy-22")), 1.5, "×"),
    ]  # fmt: skip


def profile_check(full: Built) -> dict[str, Any]:
    """The 22-layer adapter scored through the default-tolerance profile against the model pair:
    the largest |cosine difference| and the largest bound the profile states, the selections,
    the files' sizes."""
    mine = OUT / "patch-profile-22" / "safelora_report.json"
    pair = OUT / "patch-22" / "safelora_report.json"
    if not mine.is_file() or not pair.is_file():
        return {"ok": False, "detail": "a report is missing (patch-22 or patch-profile-22 failed)"}
    exact = {row["module"]: row for row in json.loads(pair.read_text())["modules"]}
    rows = json.loads(mine.read_text())["modules"]
    diffs, bounds, within = [], [], 0
    for row in rows:
        other = exact.get(row["module"])
        if row["cosine"] is None or other is None or other["cosine"] is None:
            continue
        diff = abs(row["cosine"] - other["cosine"])
        diffs.append(diff)
        bounds.append(row.get("cosine_bound") or 0.0)
        within += diff <= (row.get("cosine_bound") or 0.0)
    profile_input = json.loads(mine.read_text()).get("inputs", {}).get("profile", {})
    pair_bytes = full.size_bytes("base") + full.size_bytes("aligned")
    sizes = {path.name: path.stat().st_size for path in (PROFILE_22, PROFILE_R32) if path.is_file()}
    return {
        "ok": True,
        "compared": len(diffs),
        "max_diff": max(diffs, default=None),
        "max_bound": max(bounds, default=None),
        "within": within,
        "same_selection": {r["module"] for r in rows if r["projected"]}
        == {m for m, r in exact.items() if r["projected"]},
        "uncertain": sum(bool(r.get("uncertain")) for r in rows),
        "failure_probability": profile_input.get("failure_probability"),
        "sizes": {name: (size, 100.0 * size / pair_bytes) for name, size in sizes.items()},
    }


def render_check(check: dict[str, Any] | None) -> list[str]:
    if check is None:
        return ["Not run."]
    if not check["ok"]:
        return [f"**Not checked**: {check['detail']}"]
    lines = [
        "The 22-layer adapter through the default-tolerance profile vs through the model pair "
        f"(paper mode): {check['compared']} modules compared, largest |cosine difference| "
        f"{_sci(check['max_diff'])}, largest stated bound {_sci(check['max_bound'])}; "
        f"{check['within']} of {check['compared']} within their bound; "
        f"same modules projected: {'yes' if check['same_selection'] else '**NO**'}; "
        f"modules flagged uncertain: {check['uncertain']}; probability that any of the "
        f"profile's bounds fails: {_sci(check.get('failure_probability'))} (0: all proven).",
    ]
    for name, (size, share) in check["sizes"].items():
        lines.append(f"- `{name}`: {size / 1e6:.1f} MB, {share:.2f}% of the pair")
    return lines


def _sci(value: float | None) -> str:
    return "—" if value is None else f"{value:.2e}"

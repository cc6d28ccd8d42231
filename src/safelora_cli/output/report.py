"""Report: the schema-versioned JSON record of a run, built from plain values (no torch).

The schema is documented in docs/report.md and shipped as a JSON Schema (draft 2020-12),
``report.schema.json`` beside this module (``safelora schema`` prints it); ``SCHEMA_VERSION``
changes when a field is removed or changes meaning, not when one is added (the JSON Schema then
gains the field).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from safelora_cli.math.reasons import UNCHANGED, ZERO_DELTA, ZERO_V
from safelora_cli.version import __version__

SCHEMA_VERSION = 1
REPORT_NAME = "safelora_report.json"
JSON_SCHEMA_NAME = "report.schema.json"
SHORT_REASONS = {
    ZERO_V: "skipped: V = 0",
    ZERO_DELTA: "skipped: BA = 0",
    UNCHANGED: "skipped: D = 0",
}
"""Why a module is skipped (the report's ``skipped``), and how a table says it in short."""
FUSED = frozenset({"qkv_proj", "gate_up_proj", "c_attn", "query_key_value", "Wqkv", "W_pack"})


def natural_key(name: str) -> list[Any]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class ModuleRecord:
    """What the report says of one module: where it is, and how it scored.

    ``cosine`` is None when the module was skipped (``skipped`` says why); ``distance`` is
    ‖B − P B‖_F, from which Pdst follows.
    """

    module: str
    weight: str
    shape: tuple[int, int]
    rank: int | None  # None for a full fine-tune's weight
    cosine: float | None
    skipped: str | None
    v_norm: float
    b_norm: float
    projected_b_norm: float
    distance: float
    tied: bool = False
    transposed: bool = False
    subspace_rank: int | None = None
    captured_energy: float | None = None
    profile_rank: int | None = None
    cosine_bound: float | None = None
    uncertain: bool = False  # a profile's bound leaves the selection open


class Score(Protocol):
    """What a score holds for the report (``projection.ModuleScore``, without importing torch)."""

    @property
    def cosine(self) -> float | None: ...

    @property
    def skipped(self) -> str | None: ...

    @property
    def v_norm(self) -> float: ...

    @property
    def b_norm(self) -> float: ...

    @property
    def projected_b_norm(self) -> float: ...

    @property
    def distance(self) -> float: ...

    @property
    def subspace_rank(self) -> int | None: ...

    @property
    def captured_energy(self) -> float | None: ...

    @property
    def profile_rank(self) -> int | None: ...

    @property
    def cosine_bound(self) -> float | None: ...


def record(
    score: Score,
    *,
    module: str,
    weight: str,
    shape: tuple[int, int],
    rank: int | None,
    tied: bool = False,
    transposed: bool = False,
    uncertain: bool = False,
) -> ModuleRecord:
    """A module's record from its score and where it is."""
    return ModuleRecord(
        module=module,
        weight=weight,
        shape=shape,
        rank=rank,
        cosine=score.cosine,
        skipped=score.skipped,
        v_norm=score.v_norm,
        b_norm=score.b_norm,
        projected_b_norm=score.projected_b_norm,
        distance=score.distance,
        tied=tied,
        transposed=transposed,
        subspace_rank=score.subspace_rank,
        captured_energy=score.captured_energy,
        profile_rank=score.profile_rank,
        cosine_bound=score.cosine_bound,
        uncertain=uncertain,
    )


def module_entry(record: ModuleRecord, projected: bool) -> dict[str, Any]:
    """One ``modules`` row. Pdst is 1 / (1 + ‖B_final − P B‖_F), as in the official code."""
    scored = record.cosine is not None
    entry = {
        "module": record.module,
        "weight": record.weight,
        "shape": list(record.shape),
        "rank": record.rank,
        "cosine": record.cosine,
        "projected": projected,
        "skipped": record.skipped,
        "v_norm": record.v_norm,
        "b_norm_before": record.b_norm,
        "b_norm_after": record.projected_b_norm if projected else record.b_norm,
        "pdst": (1.0 if projected else 1.0 / (1.0 + record.distance)) if scored else None,
        "fused": record.module.rsplit(".", 1)[-1] in FUSED,
        "tied": record.tied,
        "transposed": record.transposed,
    }
    if record.subspace_rank is not None:
        entry["subspace_rank"] = record.subspace_rank
        entry["captured_energy"] = record.captured_energy
    if record.profile_rank is not None:  # scored through a profile
        entry["profile_rank"] = record.profile_rank
        entry["cosine_bound"] = record.cosine_bound
        entry["uncertain"] = record.uncertain
    return entry


def build(
    *,
    kind: str = "adapter",
    settings: dict[str, Any],
    inputs: dict[str, Any],
    records: Iterable[ModuleRecord],
    selected: set[str],
    threshold_used: float | None,
    passthrough: Iterable[str],
    output: str | None,
    warnings: list[dict[str, Any]],
) -> dict[str, Any]:
    """Assemble the report of one adapter from a finished scoring run.

    Args:
        kind: "adapter" (a LoRA adapter; merged or not) or "full" (a full fine-tune).
        settings: ``Settings.describe(device)``.
        inputs: role ("base", "aligned", "adapter" or "model") -> ``ResolvedInput.describe()``.
        records: one per module, any order (the report sorts them by name, naturally).
        selected: the modules projected; threshold_used: the cut the selection used.
        passthrough: tensors copied through unchanged; output: the output folder, if any.
        warnings: the run's notices (``Notices.as_list()``).
    """
    modules = [
        module_entry(r, r.module in selected)
        for r in sorted(records, key=lambda r: natural_key(r.module))
    ]
    pdsts = [m["pdst"] for m in modules if m["pdst"] is not None]
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "safelora", "version": __version__},
        "kind": kind,
        "settings": settings,
        "inputs": inputs,
        "output": output,
        "modules": modules,
        "passthrough": list(passthrough),
        "summary": {
            "modules": len(modules),
            "projected": sum(m["projected"] for m in modules),
            "skipped": sum(m["skipped"] is not None for m in modules),
            "threshold_used": threshold_used,
            "mean_pdst": sum(pdsts) / len(pdsts) if pdsts else None,
            **(
                {"uncertain": sum(m["uncertain"] for m in modules)}
                if any("uncertain" in m for m in modules)
                else {}
            ),  # fmt: skip
        },
        "warnings": warnings,
    }


OUTPUT_KINDS = ("adapter", "merged", "full")


def mark_output(report: dict[str, Any], written: str) -> None:
    """Say in ``report`` what its output folder holds: ``output_kind`` is "adapter" (the patched
    adapter), "merged" (the aligned model with the patched adapter merged in) or "full" (a
    patched full fine-tune), and ``settings.merge`` whether ``--merge`` was given. Both are
    additions to schema 1; a report without an output (``score``) has neither."""
    if written not in OUTPUT_KINDS:
        raise ValueError(f"output kind {written!r} is not one of {OUTPUT_KINDS}")
    report["output_kind"] = written
    if isinstance(report.get("settings"), dict):
        report["settings"]["merge"] = written == "merged"


def subject(report: dict[str, Any]) -> str:
    """What a report is about: the adapter's or the fine-tune's path (or ref)."""
    inputs = report.get("inputs") or {}
    entry = inputs.get("adapter") or inputs.get("model") or {}
    return str(entry.get("path") or entry.get("ref") or "(unknown)")


def json_schema_text() -> str:
    """The report's JSON Schema (draft 2020-12), as shipped in the package."""
    from importlib.resources import files

    return files(__package__ or "safelora_cli.output").joinpath(JSON_SCHEMA_NAME).read_text("utf-8")

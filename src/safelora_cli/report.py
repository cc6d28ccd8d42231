"""Report: the schema-versioned JSON record of a run (shared/DESIGN.md, "Report")."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from safelora_cli import __version__
from safelora_cli.projection import ModuleScore

if TYPE_CHECKING:
    from safelora_cli.pipeline import Job, Settings

SCHEMA_VERSION = 1
REPORT_NAME = "safelora_report.json"


def natural_key(name: str) -> list[Any]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def module_entry(name: str, shape: tuple[int, int], rank: int, score: ModuleScore,
                 projected: bool, weight: str) -> dict[str, Any]:  # fmt: skip
    """One ``modules`` row. Pdst is 1 / (1 + ‖B_final − P B‖_F), as in the official code."""
    scored = score.cosine is not None
    return {
        "module": name,
        "weight": weight,
        "shape": list(shape),
        "rank": rank,
        "cosine": score.cosine,
        "projected": projected,
        "skipped": score.skipped,
        "v_norm": score.v_norm,
        "b_norm_before": score.b_norm,
        "b_norm_after": score.projected_b_norm if projected else score.b_norm,
        "pdst": (1.0 if projected else 1.0 / (1.0 + score.distance)) if scored else None,
    }


def build(
    job: Job,
    settings: Settings,
    device: torch.device,
    scores: dict[str, ModuleScore],
    selected: set[str],
    threshold_used: float | None,
    output: Path | None,
) -> dict[str, Any]:
    """Assemble the report from a finished scoring run."""
    modules = [
        module_entry(p.name, p.shape, p.lora.rank, scores[p.name], p.name in selected, p.base.name)
        for p in sorted(job.pairs, key=lambda p: natural_key(p.name))
    ]
    pdsts = [m["pdst"] for m in modules if m["pdst"] is not None]
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "safelora", "version": __version__},
        "settings": {
            "select": settings.select,
            "num_layers": settings.num_layers if settings.select == "number" else None,
            "threshold": settings.threshold if settings.select == "threshold" else None,
            "projection": settings.projection,
            "device": str(device),
            "adapter_name": settings.adapter_name,
        },
        "inputs": {
            "base": job.base_input.describe(),
            "aligned": job.aligned_input.describe(),
            "adapter": job.adapter_input.describe(),
        },
        "output": str(output) if output is not None else None,
        "modules": modules,
        "passthrough": list(job.adapter.passthrough),
        "summary": {
            "modules": len(modules),
            "projected": sum(m["projected"] for m in modules),
            "skipped": sum(m["skipped"] is not None for m in modules),
            "threshold_used": threshold_used,
            "mean_pdst": sum(pdsts) / len(pdsts) if pdsts else None,
        },
    }

"""Report: the schema-versioned JSON record of a run (shared/DESIGN.md, "Report")."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from safelora_cli import __version__
from safelora_cli.projection import ModuleScore

if TYPE_CHECKING:
    from safelora_cli.pairing import ModulePair
    from safelora_cli.pipeline import AdapterJob, Job, Settings

SCHEMA_VERSION = 1
REPORT_NAME = "safelora_report.json"
FUSED = frozenset({"qkv_proj", "gate_up_proj", "c_attn", "query_key_value", "Wqkv", "W_pack"})


def natural_key(name: str) -> list[Any]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def module_entry(pair: ModulePair, score: ModuleScore, projected: bool) -> dict[str, Any]:
    """One ``modules`` row. Pdst is 1 / (1 + ‖B_final − P B‖_F), as in the official code."""
    scored = score.cosine is not None
    entry = {
        "module": pair.name,
        "weight": pair.base.name,
        "shape": list(pair.shape),
        "rank": pair.lora.rank,
        "cosine": score.cosine,
        "projected": projected,
        "skipped": score.skipped,
        "v_norm": score.v_norm,
        "b_norm_before": score.b_norm,
        "b_norm_after": score.projected_b_norm if projected else score.b_norm,
        "pdst": (1.0 if projected else 1.0 / (1.0 + score.distance)) if scored else None,
        "fused": pair.name.rsplit(".", 1)[-1] in FUSED,
        "tied": pair.tied,
        "transposed": pair.transpose,
    }
    if score.subspace_rank is not None:
        entry["subspace_rank"] = score.subspace_rank
        entry["captured_energy"] = score.captured_energy
    return entry


def build(
    job: Job,
    adapter_job: AdapterJob,
    settings: Settings,
    device: torch.device,
    scores: dict[str, ModuleScore],
    selected: set[str],
    threshold_used: float | None,
    output: Path | None,
) -> dict[str, Any]:
    """Assemble the report from a finished scoring run."""
    modules = [
        module_entry(p, scores[p.name], p.name in selected)
        for p in sorted(adapter_job.pairs, key=lambda p: natural_key(p.name))
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
            "rank": settings.rank,
            "energy": settings.energy,
            "device": str(device),
            "adapter_name": settings.adapter_name,
        },
        "inputs": {
            "base": job.base_input.describe(),
            "aligned": job.aligned_input.describe(),
            "adapter": adapter_job.input.describe(),
        },
        "output": str(output) if output is not None else None,
        "modules": modules,
        "passthrough": list(adapter_job.adapter.passthrough),
        "summary": {
            "modules": len(modules),
            "projected": sum(m["projected"] for m in modules),
            "skipped": sum(m["skipped"] is not None for m in modules),
            "threshold_used": threshold_used,
            "mean_pdst": sum(pdsts) / len(pdsts) if pdsts else None,
        },
    }

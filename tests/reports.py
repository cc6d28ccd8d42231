"""Seeded report dicts (the README's "Report" schema) for the display and card tests.

Real runs on the synthetic trios give small reports; these builders give any size (80 layers),
any kind (adapter, full, profile-based) and hostile names, without running anything.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from safelora_cli.synthetic import ALL_PROJ, LlamaShape


def model_input(ref: str, hub_id: str | None = None, commit: str | None = None) -> dict[str, Any]:
    """A report ``inputs`` entry (ResolvedInput.describe()) for a local folder or a hub id."""
    return {
        "ref": ref,
        "path": f"/cache/models--{ref.replace('/', '--')}/snapshots/{commit}" if hub_id else ref,
        "hub_id": hub_id,
        "revision": "main" if hub_id else None,
        "commit": commit,
        "files": {"model.safetensors": 1000},
        "bytes": 1000,
    }


def make_report(
    layers: int = 2,
    projs: Iterable[str] = ALL_PROJ,
    num_layers: int = 4,
    seed: int = 0,
    skipped: Iterable[str] = (),
    extra: Iterable[str] = (),
    names: Iterable[str] | None = None,
    bound: float | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """A number-mode report with seeded cosines in (0, 1).

    Args:
        layers, projs: the Llama modules the adapter holds (``names`` replaces them).
        num_layers: K; the K lowest cosines are projected.
        skipped: modules skipped with V = 0 (cosine null); extra: further module names (lm_head).
        bound: if given, every module gets ``profile_rank`` and ``cosine_bound`` = bound.
        kind: the report's ``kind`` ("full"); absent for adapters, as in schema 1.
    """
    shape = LlamaShape(layers=layers)
    rng = random.Random(seed)
    if names is None:
        names = [shape.module_name(layer, p) for layer in range(layers) for p in projs]
    names = [*names, *extra]
    skip = set(skipped)
    modules = []
    for name in names:
        cosine = None if name in skip else rng.uniform(0.01, 0.99)
        entry: dict[str, Any] = {
            "module": name,
            "weight": f"{name}.weight",
            "shape": [64, 64],
            "rank": 4,
            "cosine": cosine,
            "projected": False,
            "skipped": "base and aligned identical" if name in skip else None,
            "v_norm": 0.0 if name in skip else 1.0,
        }
        if bound is not None:
            entry |= {"profile_rank": 8, "cosine_bound": bound}
        modules.append(entry)
    scored = sorted((m for m in modules if m["cosine"] is not None), key=lambda m: m["cosine"])
    cut = scored[min(num_layers, len(scored)) - 1]["cosine"] if scored else None
    for m in scored[:num_layers]:
        m["projected"] = True
    report: dict[str, Any] = {
        "schema_version": 1,
        "tool": {"name": "safelora", "version": "0.1.0"},
        "settings": {
            "select": "number",
            "num_layers": num_layers,
            "threshold": None,
            "projection": "paper",
            "rank": None,
            "energy": None,
        },  # fmt: skip
        "inputs": {
            "base": model_input("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", "b" * 40),
            "aligned": model_input(
                "meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-chat-hf", "a" * 40
            ),
            "adapter": model_input("runs/my-lora"),
        },
        "output": "runs/my-lora-safe",
        "modules": modules,
        "passthrough": [],
        "summary": {
            "modules": len(modules),
            "projected": sum(m["projected"] for m in modules),
            "skipped": len(skip),
            "threshold_used": cut,
            "mean_pdst": 0.8,
        },
    }
    if kind is not None:
        report["kind"] = kind
    return report

"""Inspection: what an adapter holds, and whether it pairs with a model, from headers only.

For ``safelora inspect``: modules, ranks, PEFT's per-module scaling (``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA, after ``rank_pattern`` / ``alpha_pattern``), dtypes, the
tensors passed through unchanged, and, given a base model, the pairing problems that ``patch``
would stop on. No tensor data is read and torch is never imported.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from safelora_cli.errors import PairingError
from safelora_cli.inputs.adapter import CONFIG_NAME, Adapter, LoraModule, load_adapter, scaling
from safelora_cli.inputs.index import PICKLE_SUFFIXES, TensorIndex, TensorInfo, index_folder
from safelora_cli.inputs.pairing import MODEL_CONFIG, ModulePair, pair_modules
from safelora_cli.inputs.resolve import resolve
from safelora_cli.output.report import natural_key
from safelora_cli.version import __version__

SCHEMA_VERSION = 1
CONFIG_FIELDS = (
    "peft_type", "base_model_name_or_path", "r", "lora_alpha", "use_rslora", "fan_in_fan_out",
    "target_modules", "rank_pattern", "alpha_pattern", "modules_to_save", "bias", "task_type",
)  # fmt: skip


def _tensor(info: TensorInfo) -> dict[str, Any]:
    return {"name": info.name, "dtype": info.dtype, "shape": list(info.shape)}


def pairing_status(
    adapter: Adapter, module: LoraModule, base: TensorIndex, aligned: TensorIndex | None
) -> tuple[ModulePair | None, str | None]:
    """Pair one module as ``patch`` would: (the pair, None) or (None, the problem).

    Without an aligned model the base index stands in for both sides.
    """
    try:
        [pair] = pair_modules(replace(adapter, modules=(module,)), base, aligned or base)
    except PairingError as exc:
        return None, exc.problems[0].problem
    return pair, None


def _module_entry(
    adapter: Adapter, module: LoraModule, base: TensorIndex | None, aligned: TensorIndex | None
) -> dict[str, Any]:
    rank, alpha, scale = scaling(adapter.config, module.module)
    entry: dict[str, Any] = {
        "module": module.module,
        "shape": [module.b.shape[0], module.a.shape[1]],
        "rank": rank,
        "alpha": alpha,
        "scaling": scale,
        "lora_A": _tensor(module.a),
        "lora_B": _tensor(module.b),
    }
    if base is not None:
        pair, problem = pairing_status(adapter, module, base, aligned)
        entry["paired"] = pair is not None
        entry["weight"] = pair.base.name if pair is not None else None
        entry["tied"] = pair.tied if pair is not None else None
        entry["problem"] = problem
    return entry


def inspect_adapter(
    adapter: str | Path,
    base: str | Path | None = None,
    aligned: str | Path | None = None,
    *,
    revision: str | None = None,
    adapter_name: str | None = None,
) -> dict[str, Any]:
    """Describe an adapter and, with ``base``, whether every module pairs with a base weight.

    Args:
        adapter: the adapter folder (or hub id).
        base, aligned: optional model folders or hub ids to pair against (``aligned`` defaults
            to ``base``: only the base weights' names and shapes are checked).
        revision: hub revision for base and aligned.
        adapter_name: which adapter to take when the file holds several.
    Returns:
        A JSON-ready dict: ``adapter``, ``config``, ``modules``, ``passthrough``, ``summary``.
    Example:
        >>> inspect_adapter("my-lora", base="meta-llama/Llama-2-7b-hf")["summary"]["unpaired"]
        0
    """
    adapter_input = resolve(str(adapter), revision=None, role="ADAPTER")
    loaded = load_adapter(adapter_input.path, adapter_name)
    inputs: dict[str, Any] = {"adapter": adapter_input.describe(), "base": None, "aligned": None}
    indexes: dict[str, TensorIndex | None] = {"base": None, "aligned": None}
    for role, ref in (("base", base), ("aligned", aligned)):
        if ref is not None:
            resolved = resolve(str(ref), revision, role=f"--{role}")
            inputs[role] = resolved.describe()
            indexes[role] = index_folder(resolved.path)
    ordered = sorted(loaded.modules, key=lambda m: natural_key(m.module))
    modules = [_module_entry(loaded, m, indexes["base"], indexes["aligned"]) for m in ordered]
    passthrough = [_tensor(loaded.weights.tensors[name]) for name in loaded.passthrough]
    paired = sum(m["paired"] for m in modules) if indexes["base"] is not None else None
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "safelora", "version": __version__},
        "inputs": inputs,
        "config": {key: loaded.config[key] for key in CONFIG_FIELDS if key in loaded.config},
        "modules": modules,
        "passthrough": passthrough,
        "summary": {
            "modules": len(modules),
            "ranks": _counts(m["rank"] for m in modules),
            "dtypes": _counts(t.dtype for t in loaded.weights.tensors.values()),
            "lora_parameters": sum(
                math.prod(m.a.shape) + math.prod(m.b.shape) for m in loaded.modules
            ),
            "passthrough": len(passthrough),
            "paired": paired,
            "unpaired": None if paired is None else len(modules) - paired,
        },
    }


def _counts(values: Iterable[object]) -> dict[str, int]:
    return {str(key): n for key, n in sorted(Counter(values).items())}


ADAPTER, FULL = "adapter", "full"


def input_kind(path: Path) -> str:
    """What a local input folder holds: an adapter (``adapter_config.json``) or a full model
    (``config.json`` beside safetensors weights: a full fine-tune)."""
    if os.path.lexists(path / CONFIG_NAME):
        return ADAPTER
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES)]
    if os.path.lexists(path / MODEL_CONFIG) and weights:
        return FULL  # index_folder refuses pickle-only weights, with a hint
    return ADAPTER  # load_adapter says what is missing

"""Adapter: read a PEFT LoRA folder (config + safetensors header) into the modules to patch.

Keys are accepted with or without the ``base_model.model.`` prefix and with or without an adapter
name (``.default.``). Nothing but the header is read here.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safelora_cli.errors import IncompatibleInputError
from safelora_cli.inputs.index import (
    FLOAT_DTYPES,
    PICKLE_SUFFIXES,
    SafetensorsHeader,
    TensorInfo,
    read_header,
)
from safelora_cli.inputs.patterns import check_pattern, pattern_value
from safelora_cli.inputs.smallfiles import load_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
DEFAULT_RANK = 8  # peft.LoraConfig.r
DEFAULT_ALPHA = 8  # peft.LoraConfig.lora_alpha
# DoRA's layer is m ⊙ (W + s B A) / ‖W + s B A‖_row: besides s B A, its update rescales every row
# of W, which projecting B cannot keep inside the alignment subspace (tests/test_peft_variants.py).
DORA_HINT = (
    "DoRA's lora_magnitude_vector also rescales every row of the base weight, which projecting "
    "lora_B cannot keep inside the alignment subspace; Safe LoRA applies to plain LoRA adapters"
)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear module: its factors and the base weight name it pairs with.

    ``module`` is the base weight name without ``.weight`` ("model.layers.0.self_attn.q_proj").
    ``a`` is lora_A, shape (r, in); ``b`` is lora_B, shape (out, r).
    """

    module: str
    a: TensorInfo
    b: TensorInfo

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter folder, validated, with its modules sorted by name."""

    root: Path
    config: dict[str, Any]
    weights: SafetensorsHeader
    modules: tuple[LoraModule, ...]
    passthrough: tuple[str, ...]

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))


def load_adapter(root: Path, adapter_name: str | None = None) -> Adapter:
    """Validate and index a PEFT LoRA adapter folder.

    Args:
        root: folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        adapter_name: which adapter to take when the file holds several (``.NAME.`` in keys).
    Returns:
        The adapter, with every LoRA pair checked for shape, rank and dtype.
    Raises:
        IncompatibleInputError: missing files, unsupported config, unpaired or misshapen factors.
        CorruptFileError: a malformed safetensors file.
    """
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not os.path.lexists(config_path):
        raise IncompatibleInputError(
            f"{root}: no {CONFIG_NAME}; is this a PEFT adapter folder?",
            "save the adapter with peft's save_pretrained",
        )
    if not os.path.lexists(weights_path):
        pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = (
            f"{pickles[0]} is a pickle, which safelora never loads; re-save the adapter with "
            "save_pretrained(..., safe_serialization=True)"
            if pickles
            else "save the adapter with peft's save_pretrained"
        )
        raise IncompatibleInputError(f"{root}: no {WEIGHTS_NAME}", hint)
    config = load_json(config_path, "adapter config", IncompatibleInputError)
    _check_config(config_path, config)
    header = read_header(weights_path)
    modules, passthrough = _collect_modules(header, adapter_name)
    for module in modules:
        _check_module(weights_path, config, module)
    return Adapter(root, config, header, tuple(modules), tuple(passthrough))


def _check_config(path: Path, config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise IncompatibleInputError(f"{path}: peft_type is {peft_type!r}; only LORA is supported")
    rank = config.get("r", DEFAULT_RANK)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise IncompatibleInputError(f"{path}: 'r' must be a positive integer, not {rank!r}")
    for key in ("fan_in_fan_out", "use_dora", "use_rslora"):
        if not isinstance(config.get(key, False), bool):
            raise IncompatibleInputError(f"{path}: {key!r} must be true or false")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise IncompatibleInputError(f"{path}: {key!r} must be an object")
        _check_patterns(path, key, config.get(key) or {})
    alpha = config.get("lora_alpha", DEFAULT_ALPHA)
    if not _is_number(alpha):
        raise IncompatibleInputError(f"{path}: lora_alpha is {alpha!r}, not a number", _ALPHA_HINT)
    targets = config.get("target_modules")
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise IncompatibleInputError(
            f"{path}: 'target_modules' must be a string or a list of strings, not {targets!r}"
        )
    if config.get("use_dora"):
        raise IncompatibleInputError(
            f"{path}: DoRA adapters (use_dora: true) are not supported yet",
            DORA_HINT,
        )


_ALPHA_HINT = "'lora_alpha' and the values of 'alpha_pattern' must be numbers"


def _is_number(value: Any) -> bool:
    """A finite int or float (JSON also allows NaN and Infinity; PEFT could not use them)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_patterns(path: Path, key: str, patterns: dict[str, Any]) -> None:
    """``rank_pattern`` maps module regexes to positive ranks, ``alpha_pattern`` to numbers."""
    for pattern, value in patterns.items():
        check_pattern(pattern, f"{path}: {key!r} key")
        if key == "alpha_pattern" and not _is_number(value):
            raise IncompatibleInputError(
                f"{path}: lora_alpha for {pattern!r} in 'alpha_pattern' is {value!r}, not a number",
                _ALPHA_HINT,
            )
        if key == "rank_pattern" and not (
            isinstance(value, int) and not isinstance(value, bool) and value > 0
        ):
            raise IncompatibleInputError(
                f"{path}: 'rank_pattern' value for {pattern!r} must be a positive integer, "
                f"not {value!r}"
            )


def _collect_modules(
    header: SafetensorsHeader, adapter_name: str | None
) -> tuple[list[LoraModule], list[str]]:
    pairs: dict[str, dict[str, TensorInfo]] = {}
    names: set[str] = set()
    passthrough: list[str] = []
    for key, info in header.tensors.items():
        if "lora_magnitude_vector" in key:
            raise IncompatibleInputError(
                f"{header.path}: holds DoRA weights ({key}); DoRA adapters are not supported yet",
                DORA_HINT,
            )
        match = _LORA_KEY.match(key.removeprefix(PREFIX))
        if match is None:
            passthrough.append(key)
            continue
        name = match["name"] or ""
        names.add(name)
        if adapter_name is not None and name not in (adapter_name, ""):
            passthrough.append(key)
            continue
        pairs.setdefault(match["module"], {})[match["kind"]] = info
    named = ", ".join(sorted(names - {""}))
    if adapter_name is None and len(names) > 1:
        listed = ", ".join(sorted(n or "(unnamed)" for n in names))
        raise IncompatibleInputError(
            f"{header.path}: holds several adapters ({listed})", "choose one with --adapter-name"
        )
    if adapter_name is not None and named and adapter_name not in names:
        raise IncompatibleInputError(
            f"--adapter-name {adapter_name}: no such adapter in {header.path} (it holds {named})",
            "pick one of the names it holds",
        )
    modules = []
    for module, factors in sorted(pairs.items()):
        if set(factors) != {"lora_A", "lora_B"}:
            have, lack = ("lora_A", "lora_B") if "lora_A" in factors else ("lora_B", "lora_A")
            raise IncompatibleInputError(
                f"{header.path}: module {module!r} has {have} but no {lack}",
                "the adapter file is incomplete; save it again",
            )
        modules.append(LoraModule(module, factors["lora_A"], factors["lora_B"]))
    if not modules:
        raise IncompatibleInputError(f"{header.path}: no LoRA weights (lora_A/lora_B) found")
    return modules, sorted(passthrough)


def expected_rank(config: dict[str, Any], module: str) -> int:
    """The rank PEFT gives ``module``: the first matching ``rank_pattern`` key, else ``r``."""
    rank = pattern_value(config.get("rank_pattern"), module, f"{CONFIG_NAME} 'rank_pattern'")
    return int(config.get("r", DEFAULT_RANK) if rank is None else rank)


def expected_alpha(config: dict[str, Any], module: str) -> float:
    """The alpha PEFT gives ``module``: the first matching ``alpha_pattern`` key, else
    ``lora_alpha`` (both checked to be numbers when the adapter was loaded)."""
    alpha = pattern_value(config.get("alpha_pattern"), module, f"{CONFIG_NAME} 'alpha_pattern'")
    return float(config.get("lora_alpha", DEFAULT_ALPHA) if alpha is None else alpha)


def scaling(config: dict[str, Any], module: str) -> tuple[int, float, float]:
    """(rank, alpha, scaling) of ``module`` as PEFT computes them at load time: alpha / r, or
    alpha / sqrt(r) with rsLoRA."""
    rank, alpha = expected_rank(config, module), expected_alpha(config, module)
    return rank, alpha, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _check_module(path: Path, config: dict[str, Any], module: LoraModule) -> None:
    a, b = module.a, module.b
    where = f"{path}: module {module.module!r}"
    for info in (a, b):
        if info.dtype not in FLOAT_DTYPES:
            raise IncompatibleInputError(f"{where}: {info.name} has dtype {info.dtype}, not float")
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise IncompatibleInputError(
            f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} are not matrices",
            "only LoRA on linear layers is supported",
        )
    if a.shape[0] != b.shape[1]:
        raise IncompatibleInputError(
            f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree on the rank"
        )
    want = expected_rank(config, module.module)
    if a.shape[0] != want:
        raise IncompatibleInputError(
            f"{where}: rank {a.shape[0]} in the file, {want} in adapter_config.json "
            "('r' / 'rank_pattern')",
            "the config and weights come from different runs",
        )

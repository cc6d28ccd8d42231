"""Adapter: read a PEFT LoRA folder (config + safetensors header) into the modules to patch.

Keys are accepted with or without the ``base_model.model.`` prefix and with or without an adapter
name (``.default.``). Nothing but the header is read here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safelora_cli.errors import IncompatibleInputError
from safelora_cli.index import (
    FLOAT_DTYPES,
    PICKLE_SUFFIXES,
    SafetensorsHeader,
    TensorInfo,
    load_json_object,
    read_header,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
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
    if not config_path.is_file():
        raise IncompatibleInputError(
            f"{root}: no {CONFIG_NAME}; is this a PEFT adapter folder?",
            "save the adapter with peft's save_pretrained",
        )
    if not weights_path.is_file():
        pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = (
            f"{pickles[0]} is a pickle, which safelora never loads; re-save the adapter with "
            "save_pretrained(..., safe_serialization=True)"
            if pickles
            else "save the adapter with peft's save_pretrained"
        )
        raise IncompatibleInputError(f"{root}: no {WEIGHTS_NAME}", hint)
    config = load_json_object(config_path, "adapter config", IncompatibleInputError)
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
    rank = config.get("r", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise IncompatibleInputError(f"{path}: 'r' must be a positive integer, not {rank!r}")
    for key in ("fan_in_fan_out", "use_dora", "use_rslora"):
        if not isinstance(config.get(key, False), bool):
            raise IncompatibleInputError(f"{path}: {key!r} must be true or false")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise IncompatibleInputError(f"{path}: {key!r} must be an object")
    if config.get("use_dora"):
        raise IncompatibleInputError(
            f"{path}: DoRA adapters (use_dora: true) are not supported yet",
            "projecting lora_B without re-deriving the magnitude vector would be silently wrong",
        )


def _collect_modules(
    header: SafetensorsHeader, adapter_name: str | None
) -> tuple[list[LoraModule], list[str]]:
    pairs: dict[str, dict[str, TensorInfo]] = {}
    names: set[str] = set()
    passthrough: list[str] = []
    for key, info in header.tensors.items():
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
    if adapter_name is None and len(names) > 1:
        raise IncompatibleInputError(
            f"{header.path}: holds several adapters ({', '.join(sorted(names))})",
            "choose one with --adapter-name",
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
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if pattern == module or re.match(rf"(.*\.)?({pattern})$", module):
            return int(rank)
    return int(config.get("r", 8))


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

"""Pairing: adapter module <-> base weight <-> aligned weight, by name, all checked up front.

Every missing tensor, shape mismatch and unsupported dtype is collected and reported in one error,
before any tensor data is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from safelora_cli.adapter import Adapter, LoraModule
from safelora_cli.errors import IncompatibleInputError
from safelora_cli.index import FLOAT_DTYPES, TensorIndex, TensorInfo

TIED_FALLBACKS = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight")}
_SHOW = 5


@dataclass(frozen=True)
class ModulePair:
    """One module to process: the LoRA factors and the two weights V is built from.

    ``transpose`` is set for ``fan_in_fan_out`` adapters, whose base weights are stored (in, out).
    """

    lora: LoraModule
    base: TensorInfo
    aligned: TensorInfo
    transpose: bool
    tied: bool

    @property
    def name(self) -> str:
        return self.lora.module

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the module, as lora_B @ lora_A."""
        return (self.lora.b.shape[0], self.lora.a.shape[1])


def _lookup(index: TensorIndex, weight: str) -> tuple[TensorInfo | None, bool]:
    info = index.get(weight)
    if info is not None:
        return info, False
    for fallback in TIED_FALLBACKS.get(weight, ()):
        if fallback in index:
            return index.get(fallback), True
    return None, False


def pair_modules(adapter: Adapter, base: TensorIndex, aligned: TensorIndex) -> list[ModulePair]:
    """Pair every adapter module with its base and aligned weights.

    Args:
        adapter: the validated adapter.
        base, aligned: indexes of the two model folders.
    Returns:
        One ``ModulePair`` per LoRA module, in shard/offset order of the base weights.
    Raises:
        IncompatibleInputError: listing every problem found (the first few, and how many).
    """
    missing: dict[str, list[str]] = {"base": [], "aligned": []}
    problems: list[str] = []
    pairs = []
    for lora in adapter.modules:
        weight = f"{lora.module}.weight"
        found: dict[str, tuple[TensorInfo | None, bool]] = {
            "base": _lookup(base, weight),
            "aligned": _lookup(aligned, weight),
        }
        for side, (info, _) in found.items():
            if info is None:
                missing[side].append(weight)
        base_info, tied = found["base"]
        aligned_info, _ = found["aligned"]
        if base_info is None or aligned_info is None:
            continue
        pair = ModulePair(lora, base_info, aligned_info, adapter.fan_in_fan_out, tied)
        problem = _check_pair(pair)
        if problem:
            problems.append(problem)
        else:
            pairs.append(pair)
    messages = [
        f"{len(names)} adapter module(s) have no weight in the {side} model ({_first(names)})"
        for side, names in missing.items()
        if names
    ]
    messages += problems[:_SHOW]
    if len(problems) > _SHOW:
        messages.append(f"and {len(problems) - _SHOW} more shape/dtype problems")
    if messages:
        raise IncompatibleInputError(
            "; ".join(messages),
            "check that --base and --aligned are the models the adapter was trained on",
        )
    pairs.sort(key=lambda p: (str(p.base.path), p.base.offset))
    return pairs


def _first(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (", ..." if len(names) > _SHOW else "")


def _check_pair(pair: ModulePair) -> str | None:
    base, aligned = pair.base, pair.aligned
    if base.shape != aligned.shape:
        return (
            f"{pair.name}: base {list(base.shape)} ({base.path.name}) and aligned "
            f"{list(aligned.shape)} ({aligned.path.name}) differ in shape"
        )
    for info in (base, aligned):
        if info.dtype not in FLOAT_DTYPES:
            return (
                f"{info.name} in {info.path}: dtype {info.dtype} is not supported "
                "(quantized or integer); use the unquantized fp32/fp16/bf16 weights"
            )
    stored = tuple(reversed(pair.shape)) if pair.transpose else pair.shape
    if base.shape != stored:
        layout = " (fan_in_fan_out: stored as in x out)" if pair.transpose else ""
        return (
            f"{pair.name}: lora_B @ lora_A is {list(pair.shape)} but the base weight is "
            f"{list(base.shape)}{layout}"
        )
    return None

"""Pairing: adapter module <-> base weight <-> aligned weight, by name, all checked up front.

Every missing tensor, shape mismatch and unsupported dtype is collected and reported in one error,
before any tensor data is read.

Two facts come from the base model's ``config.json`` when it has one (it is optional):
``model_type``, because PEFT decides ``fan_in_fan_out`` per layer from the layer's class (Conv1D or
Linear) and rewrites the saved flag as it goes, so an adapter mixing both (GPT-2 ``c_attn`` and
``lm_head``) saves a flag that is wrong for some of its modules; and ``tie_word_embeddings``, so an
untied model missing ``lm_head.weight`` is an error rather than silently paired with its embedding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from safelora_cli.errors import PairingError, PairingProblem
from safelora_cli.inputs.adapter import Adapter, LoraModule
from safelora_cli.inputs.index import FLOAT_DTYPES, TensorIndex, TensorInfo
from safelora_cli.inputs.smallfiles import load_json

TIED_FALLBACKS = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight")}
MODEL_CONFIG = "config.json"
# transformers architectures built on Conv1D (weights stored (in, out)), and their Conv1D layers;
# their other layers (lm_head) are nn.Linear.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_LAYERS = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
_SHOW = 5


@dataclass(frozen=True)
class ModulePair:
    """One module to process: the LoRA factors and the two weights V is built from.

    ``transpose`` is set when the base weight is stored (in, out): a Conv1D layer of a GPT-2-family
    model, or, for any other model, a module of a ``fan_in_fan_out`` adapter.
    ``tied`` is set when ``lm_head`` pairs with the input embedding of a tied model.
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
    def weight(self) -> str:
        """The base weight's name (``<module>.weight``, or the embedding's for a tied head)."""
        return self.base.name

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the module, as lora_B @ lora_A."""
        return (self.lora.b.shape[0], self.lora.a.shape[1])


def _model_config(index: TensorIndex) -> dict[str, Any]:
    """The folder's config.json, or {} when it has none (it is optional); one that is there is
    read like any other input, and a broken one is an error."""
    path = index.root / MODEL_CONFIG
    if not os.path.lexists(path):
        return {}
    return load_json(path, "model config")


def _lookup(index: TensorIndex, weight: str, tied_ok: bool) -> tuple[TensorInfo | None, bool]:
    info = index.get(weight)
    if info is not None:
        return info, False
    for fallback in TIED_FALLBACKS.get(weight, ()) if tied_ok else ():
        if fallback in index:
            return index.get(fallback), True
    return None, False


def _transposed(module: str, fan_in_fan_out: bool, conv1d_model: bool) -> bool:
    """Whether the base weight is stored (in, out), as PEFT decides it: by the layer's class."""
    if conv1d_model:
        return module.rsplit(".", 1)[-1] in CONV1D_LAYERS
    return fan_in_fan_out


def pair_modules(adapter: Adapter, base: TensorIndex, aligned: TensorIndex) -> list[ModulePair]:
    """Pair every adapter module with its base and aligned weights.

    Args:
        adapter: the validated adapter.
        base, aligned: indexes of the two model folders.
    Returns:
        One ``ModulePair`` per LoRA module, in shard/offset order of the base weights.
    Raises:
        PairingError: with every module that does not pair in ``problems``; its message lists
            the first few, and how many.
    """
    missing: dict[str, list[str]] = {"base": [], "aligned": []}
    problems: list[PairingProblem] = []
    mismatched: list[str] = []
    pairs = []
    configs = {"base": _model_config(base), "aligned": _model_config(aligned)}
    conv1d_model = configs["base"].get("model_type") in CONV1D_MODEL_TYPES
    for lora in adapter.modules:
        weight = f"{lora.module}.weight"
        found: dict[str, tuple[TensorInfo | None, bool]] = {
            side: _lookup(index, weight, configs[side].get("tie_word_embeddings") is not False)
            for side, index in (("base", base), ("aligned", aligned))
        }
        absent = [side for side, (info, _) in found.items() if info is None]
        for side in absent:
            missing[side].append(weight)
            problems.append(PairingProblem(lora.module, f"no {weight} in the {side} model"))
        (base_info, base_tied), (aligned_info, aligned_tied) = found["base"], found["aligned"]
        if base_info is None or aligned_info is None:
            continue
        transpose = _transposed(lora.module, adapter.fan_in_fan_out, conv1d_model)
        pair = ModulePair(lora, base_info, aligned_info, transpose, base_tied or aligned_tied)
        problem = _check_pair(pair)
        if problem:
            problems.append(PairingProblem(lora.module, problem))
            mismatched.append(f"{lora.module}: {problem}")
        else:
            pairs.append(pair)
    if problems:
        raise PairingError(
            problems,
            _summary(missing, mismatched),
            "check that --base and --aligned are the models the adapter was trained on",
        )
    pairs.sort(key=lambda p: p.base.location)
    return pairs


def _summary(missing: dict[str, list[str]], shape_problems: list[str]) -> str:
    messages = [
        f"{len(names)} adapter module(s) have no weight in the {side} model ({_first(names)})"
        for side, names in missing.items()
        if names
    ]
    messages += shape_problems[:_SHOW]
    if len(shape_problems) > _SHOW:
        messages.append(f"and {len(shape_problems) - _SHOW} more shape/dtype problems")
    return "; ".join(messages)


def _first(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (", ..." if len(names) > _SHOW else "")


def _check_pair(pair: ModulePair) -> str | None:
    base, aligned = pair.base, pair.aligned
    if base.shape != aligned.shape:
        return (
            f"base {list(base.shape)} ({base.path.name}) and aligned "
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
            f"lora_B @ lora_A is {list(pair.shape)} but the base weight is "
            f"{list(base.shape)}{layout}"
        )
    return None

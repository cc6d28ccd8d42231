"""Pairing: adapter module <-> base weight <-> aligned weight, by name, all checked up front.

Every missing tensor, shape mismatch and unsupported dtype is collected and reported in one error,
before any tensor data is read.

Two facts come from the base model's ``config.json`` when it has one (it is optional):
``model_type``, because PEFT decides ``fan_in_fan_out`` per layer from the layer's class (Conv1D or
Linear) and rewrites the saved flag as it goes, so an adapter mixing both (GPT-2 ``c_attn`` and
``lm_head``) saves a flag that is wrong for some of its modules; and ``tie_word_embeddings``: an
adapter's ``lm_head`` pairs with the weight that is each model's head (``heads.model_head``: the
input embedding of a tied model), a base and an aligned model that disagree on it do not pair, and
an untied model missing ``lm_head.weight`` is an error rather than silently paired with its
embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

from safelora_cli.errors import PairingError, PairingProblem
from safelora_cli.inputs.adapter import Adapter, LoraModule
from safelora_cli.inputs.heads import (
    HEAD,
    MODEL_CONFIG,
    TIED_HEAD_STORED,
    PairHeads,
    model_config,
    model_head,
)
from safelora_cli.inputs.index import FLOAT_DTYPES, TensorIndex, TensorInfo
from safelora_cli.notices import Notices

__all__ = ["CONV1D_LAYERS", "CONV1D_MODEL_TYPES", "MODEL_CONFIG", "ModulePair", "pair_modules"]
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


def _lookup(index: TensorIndex, weight: str, head: str | None) -> TensorInfo | None:
    """The stored tensor a module's weight is: its own, or for lm_head the model's head."""
    if weight == HEAD:
        return index.get(head) if head is not None else None
    return index.get(weight)


def _transposed(module: str, fan_in_fan_out: bool, conv1d_model: bool) -> bool:
    """Whether the base weight is stored (in, out), as PEFT decides it: by the layer's class."""
    if conv1d_model:
        return module.rsplit(".", 1)[-1] in CONV1D_LAYERS
    return fan_in_fan_out


def pair_modules(
    adapter: Adapter, base: TensorIndex, aligned: TensorIndex, notices: Notices | None = None
) -> list[ModulePair]:
    """Pair every adapter module with its base and aligned weights.

    Args:
        adapter: the validated adapter.
        base, aligned: indexes of the two model folders.
        notices: where a ``tied-head-stored`` notice goes (an adapted ``lm_head`` of a tied
            model that stores ``lm_head.weight`` too: paired as tied, the copy unused).
    Returns:
        One ``ModulePair`` per LoRA module, in shard/offset order of the base weights.
    Raises:
        PairingError: with every module that does not pair in ``problems``; its message lists
            the first few, and how many. A ``lm_head`` whose base and aligned models disagree
            on tied embeddings is one.
    """
    missing: dict[str, list[str]] = {"base": [], "aligned": []}
    problems: list[PairingProblem] = []
    mismatched: list[str] = []
    pairs = []
    configs = {"base": model_config(base), "aligned": model_config(aligned)}
    heads = PairHeads(model_head(base, configs["base"]), model_head(aligned, configs["aligned"]))
    conv1d_model = configs["base"].get("model_type") in CONV1D_MODEL_TYPES
    for lora in adapter.modules:
        weight = f"{lora.module}.weight"
        if weight == HEAD and (problem := heads.problem()) is not None:
            problems.append(PairingProblem(lora.module, problem))
            mismatched.append(f"{lora.module}: {problem}")
            continue
        found = {
            side: _lookup(index, weight, getattr(heads, side).weight)
            for side, index in (("base", base), ("aligned", aligned))
        }
        absent = [side for side, info in found.items() if info is None]
        for side in absent:
            missing[side].append(weight)
            problems.append(PairingProblem(lora.module, f"no {weight} in the {side} model"))
        base_info, aligned_info = found["base"], found["aligned"]
        if base_info is None or aligned_info is None:
            continue
        transpose = _transposed(lora.module, adapter.fan_in_fan_out, conv1d_model)
        tied = weight == HEAD and heads.tied_to is not None
        pair = ModulePair(lora, base_info, aligned_info, transpose, tied)
        problem = _check_pair(pair)
        if problem:
            problems.append(PairingProblem(lora.module, problem))
            mismatched.append(f"{lora.module}: {problem}")
            continue
        pairs.append(pair)
        note = heads.copy_note(lora.module) if tied else None
        if note is not None and notices is not None:
            notices.add(TIED_HEAD_STORED, note, values={"weight": heads.tied_to, "copy": HEAD})
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

"""Full-fine-tune targets: which weights are patched, paired and checked before any heavy read.

A weight is a candidate when it is a 2-D ``*.weight`` tensor; its module is the name without
``.weight``. Which candidates are targeted:

    default       every weight of the repeated blocks (a numbered segment: ``model.layers.3.…``,
                  ``transformer.h.3.…``), embeddings excepted
    all-linear    every candidate except embeddings and the output head (PEFT's ``all-linear``:
                  every Linear / Conv1D layer but the output embedding)
    a list        PEFT's rule: the module's name equals an entry, or ends with ``.`` + entry
    a regex       PEFT's rule: ``re.fullmatch(pattern, module)``

So embeddings and lm_head are patched only when a list or a regex names them. Headers only; no
torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from safelora_cli.errors import IncompatibleInputError, UsageError
from safelora_cli.inputs.heads import HEAD
from safelora_cli.inputs.index import FLOAT_DTYPES, TensorIndex, TensorInfo
from safelora_cli.inputs.pairing import CONV1D_LAYERS, CONV1D_MODEL_TYPES
from safelora_cli.inputs.patterns import bounded_match, compile_pattern

ALL_LINEAR = "all-linear"
# nn.Embedding layers of the common architectures: never Linear, so never in all-linear.
EMBEDDINGS = frozenset({
    "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
    "token_type_embeddings", "embed_positions", "embed_in",
})  # fmt: skip
OUTPUT_HEADS = frozenset({"lm_head", "embed_out"})
_REGEX_CHARS = frozenset("*+?[](){}|^$\\")
_BLOCK = re.compile(r"\.\d+\.")
_SHOW = 5


def pattern_fullmatch(pattern: str, name: str) -> bool:
    """Whether ``pattern`` matches all of ``name`` (PEFT's rule for a regex), in bounded time
    (``patterns.bounded_match``: a catastrophic pattern is an error, never a hang)."""
    return bounded_match(compile_pattern(pattern), name, full=True, where="--targets")


@dataclass(frozen=True)
class Targets:
    """``--targets``: module names (PEFT's list rule), one regex, or ``all-linear``."""

    names: tuple[str, ...] = ()
    pattern: str | None = None
    all_linear: bool = False

    @classmethod
    def parse(cls, values: Sequence[str]) -> Targets:
        """Read ``--targets`` values: ``all-linear``; one regex (a value with any of
        ``*+?[](){}|^$\\``); or names, given as repeated values or comma-separated.

        Raises:
            UsageError: an empty list, a regex that does not compile or is over
                ``patterns.MAX_PATTERN``, or a regex mixed with other values.
        """
        items = [part.strip() for value in values for part in _split(value)]
        items = [item for item in items if item]
        if not items:
            raise UsageError("--targets is empty", f"give module names, a regex or {ALL_LINEAR}")
        if [item.lower() for item in items] == [ALL_LINEAR]:
            return cls(all_linear=True)
        regexes = [v for v in values if _REGEX_CHARS & set(v)]
        if not regexes:
            return cls(names=tuple(items))
        if len(values) != 1:
            raise UsageError(
                f"--targets {regexes[0]!r}: a regex must be the only --targets value",
                "combine the alternatives into one regex with |",
            )
        return cls(pattern=_checked_pattern(values[0]))

    def describe(self) -> str | list[str] | None:
        """As PEFT's ``target_modules`` would hold it (for the report); None for the default."""
        if self.all_linear:
            return ALL_LINEAR
        return self.pattern if self.pattern is not None else list(self.names) or None

    def matches(self, module: str) -> bool:
        """Whether this selection targets ``module`` (a candidate weight's module name)."""
        if self.all_linear:
            return _leaf(module) not in EMBEDDINGS | OUTPUT_HEADS
        if self.pattern is not None:
            return pattern_fullmatch(self.pattern, module)
        if not self.names:
            return _BLOCK.search(f".{module}.") is not None and _leaf(module) not in EMBEDDINGS
        return any(module == n or module.endswith(f".{n}") for n in self.names)


def _split(value: str) -> list[str]:
    return [value] if _REGEX_CHARS & set(value) else value.split(",")


def _checked_pattern(pattern: str) -> str:
    try:
        compile_pattern(pattern)
    except ValueError as exc:
        raise UsageError(
            f"--targets {pattern[:80]!r}: not a usable regular expression ({exc})"
        ) from exc
    return pattern


def _leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def is_candidate(name: str, shape: tuple[int, ...]) -> bool:
    """A weight Safe LoRA can patch: a 2-D ``*.weight`` tensor."""
    return name.endswith(".weight") and len(shape) == 2


def select_targets(
    shapes: Mapping[str, tuple[int, ...]],
    targets: Targets = Targets(),
    model: str = "the fine-tune",
    head: str | None = None,
) -> list[str]:
    """The weight names ``targets`` selects among ``shapes`` (name -> shape), in input order;
    ``model`` names the model the shapes are of in errors ("the aligned model" for a profile).

    ``head``: the stored weight a tied ``lm_head`` is (``heads.PairHeads.tied_to``): the module
    ``lm_head`` then selects it (once, with the embedding it is).

    Raises:
        UsageError: nothing selected, or a list entry that names no 2-D weight (with a hint for
            the tied lm_head of a model that stores only its input embedding).
    """
    modules = {n.removesuffix(".weight"): n for n, s in shapes.items() if is_candidate(n, s)}
    if head is not None and head in modules.values():
        modules[HEAD.removesuffix(".weight")] = head
    chosen = list(
        dict.fromkeys(weight for module, weight in modules.items() if targets.matches(module))
    )
    unmatched = [
        entry
        for entry in targets.names
        if not any(m == entry or m.endswith(f".{entry}") for m in modules)
    ]
    if unmatched:
        tied = any(_leaf(e) in OUTPUT_HEADS for e in unmatched)
        raise UsageError(
            f"--targets {', '.join(unmatched[:_SHOW])}: names no 2-D weight of {model}",
            "this model ties lm_head to its input embedding: name that instead"
            if tied
            else "module names are weight names without '.weight', or their last parts",
        )
    if not chosen:
        what = f"--targets {targets.describe()}" if targets.describe() else "the default targets"
        raise UsageError(
            f"{what}: no weight of {model} is selected",
            "name the modules with --targets (a list, a regex or all-linear)",
        )
    return chosen


@dataclass(frozen=True)
class FullPair:
    """One targeted weight: where W_ft, W_aligned and W_base are, and its storage layout.

    ``transpose`` is set for a weight stored (in, out) (a Conv1D layer of a GPT-2-family model):
    the math takes ``.T`` views and the output is written transposed back. ``base`` is None
    when V comes from a profile.
    """

    name: str
    ft: TensorInfo
    aligned: TensorInfo
    base: TensorInfo | None
    transpose: bool

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


def pair_full_weights(
    ft: TensorIndex,
    aligned: TensorIndex,
    base: TensorIndex | None,
    targets: Targets = Targets(),
    model_type: str | None = None,
    model: str = "the fine-tune",
    head: str | None = None,
) -> list[FullPair]:
    """Check the fine-tune against the aligned model and pair every targeted weight.

    Args:
        ft, aligned: the fine-tune and the aligned model it was trained from.
        base: the base model (None when a profile stands in for it).
        targets: which weights to patch.
        model_type: ``model_type`` from the fine-tune's config.json (Conv1D layouts).
        model: how messages name ``ft`` ("the aligned model" when profiling a pair).
        head: the embedding a tied ``lm_head`` is, for ``targets`` to reach it as ``lm_head``
            (``select_targets``).
    Returns:
        The targeted pairs, in the fine-tune's shard/offset order (the order to write them in).
    Raises:
        IncompatibleInputError: names or shapes of the fine-tune and the aligned model differ, a
            targeted weight is missing from the base model or has another shape there, or one is
            not float (quantized): every problem at once (the first few of each kind, and how
            many).
        UsageError: from ``select_targets``.
    """
    problems = model_problems(ft, aligned)
    chosen = select_targets({n: i.shape for n, i in ft.tensors.items()}, targets, model, head)
    pairs, more = [], []
    conv1d = model_type in CONV1D_MODEL_TYPES
    for name in chosen:
        ft_info, aligned_info = ft.tensors[name], aligned.get(name)
        base_info = base.get(name) if base is not None else None
        if base is not None and (base_info is None or base_info.shape != ft_info.shape):
            found = "absent" if base_info is None else list(base_info.shape)
            more.append(f"{name}: {list(ft_info.shape)} in {model}, {found} in the base")
        quantized = [
            i for i in (ft_info, aligned_info, base_info) if i and i.dtype not in FLOAT_DTYPES
        ]
        more += [f"{i.name} in {i.path}: dtype {i.dtype} is not float" for i in quantized]
        if aligned_info is not None:
            transpose = conv1d and _leaf(name.removesuffix(".weight")) in CONV1D_LAYERS
            pairs.append(FullPair(name, ft_info, aligned_info, base_info, transpose))
    problems += _first(more, "targeted weight problems")
    if problems:
        hint = (
            "give the aligned model the fine-tune was trained from, unquantized "
            "(fp32/fp16/bf16), and a base model of the same architecture"
            if ft is not aligned
            else "give the base model of the aligned one: same architecture, unquantized "
            "(fp32/fp16/bf16)"
        )
        raise IncompatibleInputError("; ".join(problems), hint)
    return sorted(pairs, key=lambda p: (str(p.ft.path), p.ft.offset))


def model_problems(ft: TensorIndex, aligned: TensorIndex) -> list[str]:
    """Names and shapes in which the fine-tune and the aligned model differ (the first few of
    each kind, and how many): a fine-tune of this aligned model has none."""
    only_ft = [n for n in ft.tensors if n not in aligned]
    only_aligned = [n for n in aligned.tensors if n not in ft]
    shapes = [
        f"{n}: {list(i.shape)} in the fine-tune, {list(aligned.tensors[n].shape)} in the aligned"
        for n, i in ft.tensors.items()
        if n in aligned and aligned.tensors[n].shape != i.shape
    ]
    return (
        _first(only_ft, "tensors of the fine-tune are not in the aligned model")
        + _first(only_aligned, "tensors of the aligned model are not in the fine-tune")
        + _first(shapes, "tensors differ in shape")
    )


def _first(items: list[str], what: str) -> list[str]:
    if not items:
        return []
    shown = ", ".join(items[:_SHOW]) + (", ..." if len(items) > _SHOW else "")
    return [f"{len(items)} {what} ({shown})"]

"""Merge plan: which tensors of the aligned model an adapter's merge rewrites, and with what.

PEFT's rules (0.21: ``tuners/lora/layer.py``, ``utils/save_and_load.py``), from headers only:
every LoRA module adds s · B A to its layer's weight (``ModulePair``: Conv1D and embedding
targets take it transposed; a tied lm_head's lands on the stored embedding); ``lora_B.bias`` adds
s · bias to the layer's bias; every other model tensor the adapter saved (modules_to_save copies,
embedding layers, biases of bias="all") is loaded in place of the aligned one first. The tensors
themselves are computed by ``merge.py``. No torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from safelora_cli.errors import IncompatibleInputError
from safelora_cli.inputs.adapter import PREFIX, Adapter, expected_rank, scaling
from safelora_cli.inputs.heads import TIED_FALLBACKS
from safelora_cli.inputs.index import FLOAT_DTYPES, TensorIndex, TensorInfo
from safelora_cli.inputs.pairing import ModulePair

_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>A|B)(?:\.(?P<name>[^.]+))?\.weight$")
_EMBED = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<kind>A|B)(?:\.(?P<name>[^.]+))?$")
_BIAS = re.compile(r"^(?P<module>.+)\.lora_B(?:\.(?P<name>[^.]+))?\.bias$")
_UNSUPPORTED = ("token_adapter", "trainable_tokens")
_SHOW = 5


@dataclass(frozen=True)
class LoraTerm:
    """s · B A of one adapter module, added to the target in its storage layout.

    ``transposed``: the target is stored (in, out) (Conv1D) or is an embedding (num, dim).
    """

    module: str
    a: TensorInfo
    b: TensorInfo
    scaling: float
    transposed: bool


@dataclass(frozen=True)
class BiasTerm:
    """s · lora_B.bias of one module (lora_bias), added to the layer's bias."""

    module: str
    bias: TensorInfo
    scaling: float


@dataclass(frozen=True)
class TensorMerge:
    """One tensor of the merged model: the aligned one, or the adapter's saved copy in its
    place, plus every update that lands on it (several for a tied embedding)."""

    target: TensorInfo
    replacements: tuple[TensorInfo, ...] = ()
    terms: tuple[LoraTerm, ...] = ()
    bias_terms: tuple[BiasTerm, ...] = ()


@dataclass(frozen=True)
class MergePlan:
    """Every aligned tensor the merge rewrites, in the aligned model's shard/offset order.

    ``tied``: modules whose update lands on the matrix a tied model shares between its input
    embedding and its output head: merged, it changes both (PEFT's merge does the same).
    ``replaced``: adapter tensors loaded over aligned ones (modules_to_save, saved layers).
    """

    tensors: tuple[TensorMerge, ...]
    tied: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()


@dataclass
class _Builder:
    aligned: TensorIndex
    tie: bool | None
    merges: dict[str, TensorMerge] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def target(self, weight: str) -> TensorInfo | None:
        """The aligned tensor a model name denotes: lm_head of a tied model is its embedding."""
        fallbacks = TIED_FALLBACKS.get(weight, ()) if self.tie is not False else ()
        return next(filter(None, map(self.aligned.get, (weight, *fallbacks))), None)

    def shared(self) -> set[str]:
        """The stored names of the one matrix a tied model uses as embedding and head (both are
        stored by some checkpoints: an update to either is an update to both, as in PEFT); the
        rule of ``heads.model_head``: no known embedding, no tie."""
        head = "lm_head.weight"
        names = {n for n in TIED_FALLBACKS[head] if n in self.aligned}
        if names and (self.tie is True or (self.tie is None and head not in self.aligned)):
            return names | ({head} & set(self.aligned))
        return set()

    def add(
        self,
        target: TensorInfo,
        replacement: TensorInfo | None = None,
        term: LoraTerm | None = None,
        bias_term: BiasTerm | None = None,
    ) -> None:
        shared = self.shared()
        for name in shared if target.name in shared else {target.name}:
            old = self.merges.get(name, TensorMerge(self.aligned.tensors[name]))
            self.merges[name] = TensorMerge(
                old.target,
                old.replacements + ((replacement,) if replacement else ()),
                old.terms + ((term,) if term else ()),
                old.bias_terms + ((bias_term,) if bias_term else ()),
            )


def plan_merge(
    adapter: Adapter,
    pairs: Sequence[ModulePair],
    aligned: TensorIndex,
    adapter_name: str | None = None,
    tie_word_embeddings: bool | None = None,
) -> MergePlan:
    """Plan the merge of ``adapter`` into the aligned model, from headers only.

    Args:
        adapter: the validated adapter.
        pairs: its LoRA modules paired by ``pairing.pair_modules`` (only ``aligned``,
            ``transpose`` and ``tied`` are used, so any base index will do).
        aligned: the aligned model's index: the merge's source and layout.
        adapter_name: the adapter chosen in a multi-adapter file (None: the only one).
        tie_word_embeddings: the aligned config's flag (None: absent; the model then ties when
            it stores no lm_head, as pairing assumes).
    Raises:
        IncompatibleInputError: adapter tensors with no counterpart in the aligned model, shapes
            that do not fit, or unsupported kinds (trainable tokens): all at once.
    """
    build = _Builder(aligned, tie_word_embeddings)
    chosen = adapter_name if adapter_name is not None else _name_of(pairs)
    config, where = adapter.config, str(adapter.root / "adapter_config.json")
    for pair in pairs:
        s = scaling(config, pair.name)[2]
        term = LoraTerm(pair.name, pair.lora.a, pair.lora.b, s, pair.transpose)
        build.add(pair.aligned, term=term)
    embeddings: dict[str, dict[str, TensorInfo]] = {}
    replaced = []
    for key in adapter.passthrough:
        info, short = adapter.weights.tensors[key], key.removeprefix(PREFIX)
        kind, found = _kind(short)
        if found is None:
            if _plan_replacement(build, short, info, chosen):
                replaced.append(key)
        elif (found["name"] or "") not in ("", chosen):
            continue  # another adapter's tensor (a multi-adapter file)
        elif kind == "embedding":
            embeddings.setdefault(found["module"], {})[found["kind"]] = info
        elif kind == "bias":
            _plan_bias(build, config, where, found["module"], info)
    for module, factors in sorted(embeddings.items()):
        _plan_embedding(build, config, where, module, factors)
    if build.problems:
        shown = "; ".join(build.problems[:_SHOW])
        more = f"; and {len(build.problems) - _SHOW} more" if len(build.problems) > _SHOW else ""
        raise IncompatibleInputError(
            f"{adapter.root}: cannot merge into the aligned model: {shown}{more}",
            "check that --aligned is the model the adapter was trained on",
        )
    merges = sorted(build.merges.values(), key=lambda m: (str(m.target.path), m.target.offset))
    shared = build.shared()
    tied = {t.module for m in merges if m.target.name in shared for t in m.terms}
    return MergePlan(tuple(merges), tuple(sorted(tied)), tuple(replaced))


def _kind(short: str) -> tuple[str, re.Match[str] | None]:
    """What a LoRA tensor key (without the PEFT prefix) holds, with its match (module, name);
    ("model", None) for a saved model tensor."""
    for kind, pattern in (("embedding", _EMBED), ("bias", _BIAS), ("factor", _FACTOR)):
        found = pattern.match(short)
        if found is not None:
            return kind, found
    return "model", None


def _name_of(pairs: Sequence[ModulePair]) -> str:
    found = _FACTOR.match(pairs[0].lora.a.name.removeprefix(PREFIX)) if pairs else None
    return (found["name"] or "") if found is not None else ""


def _plan_bias(
    build: _Builder, config: dict[str, object], where: str, module: str, info: TensorInfo
) -> None:
    target = build.aligned.get(f"{module}.bias")
    if target is None or target.shape != info.shape or not _floats(info, target):
        found = "no bias" if target is None else f"a {target.dtype} {list(target.shape)} bias"
        build.problems.append(f"{info.name} {list(info.shape)}: the aligned {module} has {found}")
        return
    s = scaling(config, module)[2]
    build.add(target, bias_term=BiasTerm(module, info, s))


def _plan_embedding(
    build: _Builder,
    config: dict[str, object],
    where: str,
    module: str,
    factors: dict[str, TensorInfo],
) -> None:
    if set(factors) != {"A", "B"}:
        build.problems.append(f"{module}: lora_embedding_A and lora_embedding_B must both be there")
        return
    a, b = factors["A"], factors["B"]
    target = build.aligned.get(f"{module}.weight")
    rank = expected_rank(config, module)
    fits = (
        target is not None
        and _floats(a, b, target)
        and len(a.shape) == len(b.shape) == len(target.shape) == 2
        and a.shape == (rank, target.shape[0])
        and b.shape == (target.shape[1], rank)
    )
    if target is None or not fits:
        found = "absent" if target is None else list(target.shape)
        build.problems.append(
            f"{module}: lora_embedding_A {list(a.shape)} / B {list(b.shape)} (rank {rank}) do "
            f"not fit the aligned {module}.weight ({found})"
        )
        return
    s = scaling(config, module)[2]
    build.add(target, term=LoraTerm(module, a, b, s, transposed=True))


def _plan_replacement(build: _Builder, short: str, info: TensorInfo, chosen: str) -> bool:
    """A saved model tensor (modules_to_save, saved embedding layer, bias): it replaces the
    aligned tensor it names. Returns whether it does (False: another adapter's copy)."""
    parts = short.split(".")
    if any(marker in parts for marker in _UNSUPPORTED):
        build.problems.append(f"{info.name}: trainable tokens cannot be merged yet")
        return False
    if "original_module" in parts:
        return False
    if "modules_to_save" in parts:
        at = parts.index("modules_to_save")
        if parts[at + 1 : at + 2] != [chosen or "default"]:
            return False
        del parts[at : at + 2]
    name = ".".join(p for p in parts if p != "base_layer")
    target = build.target(name)
    if target is None or target.shape != info.shape or not _floats(info, target):
        found = "absent" if target is None else f"{target.dtype} {list(target.shape)}"
        build.problems.append(
            f"{info.name} {info.dtype} {list(info.shape)}: the aligned {name} is {found}"
        )
        return False
    build.add(target, replacement=info)
    return True


def _floats(*infos: TensorInfo) -> bool:
    return all(info.dtype in FLOAT_DTYPES for info in infos)

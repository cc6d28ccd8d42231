"""Merge: the full model an adapter makes, W_aligned + s · B A, as PEFT's ``merge_and_unload()``.

What PEFT (0.21, ``tuners/lora/layer.py`` ``get_delta_weight`` / ``merge``, ``utils/save_and_load``)
does for each variant, and so what this module does:

    Linear         W += s · B A                         (B: lora_B (out, r), A: lora_A (r, in))
    scaling        s = alpha / r, or alpha / sqrt(r) with use_rslora; r and alpha from the first
                   matching rank_pattern / alpha_pattern key, else r / lora_alpha
    Conv1D         W is stored (in, out) (GPT-2; fan_in_fan_out, set by PEFT per layer class):
                   W += s · (B A)ᵀ
    fused          qkv_proj, gate_up_proj, c_attn are single layers whose out is the fused size:
                   the same rule, nothing split
    lora_bias      the layer's bias += s · lora_B.bias
    embedding      W (num, dim) += s · (B A)ᵀ with A = lora_embedding_A (r, num),
                   B = lora_embedding_B (dim, r)
    saved tensors  modules_to_save copies, embedding layers saved with the adapter, biases of
                   bias="all"/"lora_only": loaded over the model's tensors, before the merge
    tied lm_head   lm_head and the input embedding are one Parameter: the merge adds lm_head's
                   update to it in place, so the input embedding changes too (and an embedding LoRA
                   changes the head), and save_pretrained writes that one tensor. Done the same
                   here: the update goes to the stored embedding (and to a stored lm_head copy
                   when config.json ties them); ``MergePlan.tied`` names such modules so the
                   caller can warn that the merged model differs from the adapter there.

Sums are in float32 and cast once to the model's dtype, overflow refused. (PEFT adds a delta it
has already cast to the model's dtype: for fp16/bf16 models the two differ by rounding only.)
The plan is built from headers; tensors are read through the caller's ``read`` callback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from safelora_cli.adapter import PREFIX, Adapter, expected_rank
from safelora_cli.delta import Factored, add_delta, cast_finite, concat
from safelora_cli.errors import IncompatibleInputError
from safelora_cli.index import TensorIndex, TensorInfo
from safelora_cli.inspection import scaling
from safelora_cli.loader import TORCH_DTYPES
from safelora_cli.pairing import TIED_FALLBACKS, ModulePair

Reader = Callable[[TensorInfo], torch.Tensor]
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

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> Factored:
        """The update as factors; ``a``, ``b`` float32 as stored (lora_A / lora_B, or the
        embedding's A (r, num) / B (dim, r))."""
        if self.transposed:
            return Factored(a.T, b.T * self.scaling)
        return Factored(b * self.scaling, a)


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
        stored by some checkpoints: an update to either is an update to both, as in PEFT)."""
        head = "lm_head.weight"
        names = {n for n in TIED_FALLBACKS[head] if n in self.aligned}
        if self.tie is True or (self.tie is None and head not in self.aligned):
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
        s = scaling(config, pair.name, where)[2]
        term = LoraTerm(pair.name, pair.lora.a, pair.lora.b, s, pair.transpose)
        build.add(pair.aligned, term=term)
    embeddings: dict[str, dict[str, TensorInfo]] = {}
    replaced = []
    for key in adapter.passthrough:
        info, short = adapter.weights.tensors[key], key.removeprefix(PREFIX)
        embed, bias = _EMBED.match(short), _BIAS.match(short)
        for found in (embed, bias, _FACTOR.match(short)):
            if found is not None and (found["name"] or "") not in ("", chosen):
                break  # another adapter's tensor
        else:
            if embed is not None:
                embeddings.setdefault(embed["module"], {})[embed["kind"]] = info
            elif bias is not None:
                _plan_bias(build, config, where, bias["module"], info)
            elif _FACTOR.match(short) is None and _plan_replacement(build, short, info, chosen):
                replaced.append(key)
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


def _name_of(pairs: Sequence[ModulePair]) -> str:
    found = _FACTOR.match(pairs[0].lora.a.name.removeprefix(PREFIX)) if pairs else None
    return (found["name"] or "") if found is not None else ""


def _plan_bias(
    build: _Builder, config: dict[str, object], where: str, module: str, info: TensorInfo
) -> None:
    target = build.aligned.get(f"{module}.bias")
    if target is None or target.shape != info.shape:
        found = "no bias" if target is None else f"a {list(target.shape)} bias"
        build.problems.append(f"{info.name} {list(info.shape)}: the aligned {module} has {found}")
        return
    s = scaling(config, module, where)[2]
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
    s = scaling(config, module, where)[2]
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
    if target is None or target.shape != info.shape:
        found = "absent" if target is None else list(target.shape)
        build.problems.append(f"{info.name} {list(info.shape)}: {name} is {found} in the aligned")
        return False
    build.add(target, replacement=info)
    return True


def _start(merge: TensorMerge, read: Reader) -> torch.Tensor:
    """The tensor before any update: the aligned one, or the adapter's copy (all copies equal)."""
    if not merge.replacements:
        return read(merge.target)
    first, *rest = (read(info) for info in merge.replacements)
    for info, other in zip(merge.replacements[1:], rest, strict=True):
        if not torch.equal(first.float(), other.float()):
            raise IncompatibleInputError(
                f"{info.name} and {merge.replacements[0].name} both replace {merge.target.name} "
                "with different values",
                "the adapter file is inconsistent; save it again",
            )
    return first


def merged_tensor(
    merge: TensorMerge,
    read: Reader,
    lora_b: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Compute one tensor of the merged model.

    Args:
        merge: from ``plan_merge``.
        read: returns a tensor as stored (e.g. ``loader.TensorReader().read``).
        lora_b: module -> the lora_B to merge instead of the stored one (the patched B', float32
            (out, r), e.g. ``ModuleScore.projected_b`` of the selected modules).
        device: where the updates are computed (default CPU).
    Returns:
        A contiguous CPU tensor in the aligned tensor's dtype and shape.
    Raises:
        NumericalError: a value the dtype cannot hold.
    """
    device = device or torch.device("cpu")
    dtype, name = TORCH_DTYPES[merge.target.dtype], merge.target.name
    start = _start(merge, read)
    if merge.terms:
        overrides = lora_b or {}
        updates = []
        for term in merge.terms:
            b = overrides[term.module] if term.module in overrides else read(term.b)
            a = read(term.a).to(device, torch.float32)
            updates.append(term.factors(a, b.to(device, torch.float32)))
        return add_delta(start, concat(updates), dtype, name)
    if merge.bias_terms:
        total = start.to(device, torch.float32)
        for bias in merge.bias_terms:
            total = total + bias.scaling * read(bias.bias).to(device, torch.float32)
        return cast_finite(total, dtype, name)
    return cast_finite(start, dtype, name)


def merged_tensors(
    plan: MergePlan,
    read: Reader,
    lora_b: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """Yield (aligned tensor, merged value) in the plan's order, one at a time, ready for
    ``shards.ShardWriter.replace``. See ``merged_tensor`` for the arguments."""
    with torch.inference_mode():
        for merge in plan.tensors:
            yield merge.target, merged_tensor(merge, read, lora_b, device)

"""LoRA adapters as the update kind: B A of each module, scored against V, lora_B projected.

Several adapters share one pass over the source: each weight's alignment is read once and every
module of every adapter that adapts it is scored on it (``score_adapters``), with the kernel for
the alignment's form (``score_factors``: ``projection.projector`` on V, or
``lowrank_score.score_entry`` on a profile entry). Each projected B goes to the run's ``Keep``
as soon as it is made (``keep.py``: a batch spills them to a scratch file), so a batch holds the
factors of about one weight per weight in flight, whatever its size. An adapter is written as
the patched adapter (``writer.write_adapter``) or as the full model it makes (``merging``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli.errors import NumericalError
from safelora_cli.inputs.adapter import Adapter, load_adapter
from safelora_cli.inputs.index import TensorInfo
from safelora_cli.inputs.loader import TORCH_DTYPES, TensorReader
from safelora_cli.inputs.provenance import check_adapter
from safelora_cli.inputs.resolve import ResolvedInput, resolve
from safelora_cli.math.lowrank_score import score_entry
from safelora_cli.math.projection import ModuleScore, projector
from safelora_cli.notices import Notices
from safelora_cli.output.writer import OutputFolder, cast_checked, write_adapter
from safelora_cli.runs.keep import InMemory, Keep
from safelora_cli.runs.kinds import CARD_SKIP, Module, ProgressFn, Scored, Target, Written
from safelora_cli.runs.merging import write_merged
from safelora_cli.runs.pair_source import PairSource
from safelora_cli.runs.source import AdapterModule, Alignment, Dense, PathLike, Source, Weight
from safelora_cli.settings import ProjectionSpec, Settings


@dataclass(frozen=True)
class PairedAdapter:
    """One adapter, validated and paired against the source."""

    input: ResolvedInput
    adapter: Adapter
    modules: list[AdapterModule]


def load_adapters(
    refs: Sequence[PathLike], settings: Settings, notices: Notices
) -> list[tuple[ResolvedInput, Adapter]]:
    """Resolve and validate every adapter (headers only): one bad adapter stops the run."""
    loaded = []
    for ref in refs:
        adapter_input = resolve(str(ref), revision=None, role="ADAPTER", notices=notices)
        adapter = load_adapter(adapter_input.path, settings.adapter_name)
        settings.check_modules(len(adapter.modules))
        loaded.append((adapter_input, adapter))
    return loaded


class AdapterUpdate:
    """LoRA adapters, each paired against the source."""

    kind = "adapter"
    writes = frozenset({Written.ADAPTER, Written.MERGED})

    def __init__(self, adapters: list[PairedAdapter], settings: Settings, notices: Notices) -> None:
        self.adapters = adapters
        self.settings = settings
        self.keep: Keep = InMemory()  # where ``score`` left the projected B's
        self._targets = [_target(a, notices.scoped(str(a.input.path))) for a in adapters]

    @classmethod
    def pair(
        cls,
        loaded: list[tuple[ResolvedInput, Adapter]],
        source: Source,
        settings: Settings,
        notices: Notices,
    ) -> AdapterUpdate:
        """Whether each adapter was trained on the source's aligned model (warnings), then its
        modules paired with the source's weights (every problem at once)."""
        trained_base, trained_aligned = source.trained_on()
        for adapter_input, adapter in loaded:
            for finding in check_adapter(adapter.config, trained_base, trained_aligned):
                notices.scoped(str(adapter_input.path)).add(
                    finding.code, finding.message, values=finding.values
                )
        paired = [PairedAdapter(i, a, source.pair_adapter(a, notices)) for i, a in loaded]
        return cls(paired, settings, notices)

    @property
    def targets(self) -> Sequence[Target]:
        return self._targets

    def local_inputs(self) -> list[Path]:
        return [a.input.path for a in self.adapters]

    def inputs(self, source: Source, target: Target) -> dict[str, Any]:
        return {**source.inputs(), "adapter": target.input.describe()}

    def score(
        self,
        source: Source,
        settings: Settings,
        device: torch.device,
        progress: ProgressFn | None,
        keep: Keep,
    ) -> list[dict[str, ModuleScore]]:
        self.keep = keep
        spec = settings.projection_spec
        return score_adapters(self.adapters, source, spec, device, keep, progress)

    def write(
        self,
        written: Written,
        source: Source,
        scored: Scored,
        out: OutputFolder,
        device: torch.device,
    ) -> None:
        paired = self.adapters[scored.index]
        notices = scored.target.notices
        if written is Written.MERGED:
            assert isinstance(source, PairSource)  # run.prepare: a profile holds no weights
            aligned = source.aligned_input
            write_merged(source.aligned, aligned.path, paired.adapter, paired.modules,
                         lambda: replaced_factors(paired.modules, scored, self.keep),
                         self.settings.adapter_name, out, device, notices)  # fmt: skip
            out.copy_files(aligned.path, aligned.trusted_root, notices, CARD_SKIP, model=True)
        else:
            replaced = replaced_factors(paired.modules, scored, self.keep)
            inside = paired.input.trusted_root
            write_adapter(out, paired.adapter, replaced, inside, notices, CARD_SKIP)


def _target(paired: PairedAdapter, notices: Notices) -> Target:
    modules = tuple(
        Module(m.name, m.weight.name, m.shape, m.lora.rank, m.tied, m.transpose)
        for m in paired.modules
    )
    return Target(paired.input, modules, notices, tuple(paired.adapter.passthrough))


def replaced_factors(
    modules: Sequence[AdapterModule], scored: Scored, keep: Keep
) -> dict[str, torch.Tensor]:
    """lora_B tensor name -> projected B in the adapter's dtype, for the selected modules."""
    replaced = {}
    for module in modules:
        if module.name not in scored.selected:
            continue
        projected = keep.take(scored.index, module.name)
        if projected is not None:
            info = module.lora.b
            replaced[info.name] = cast_checked(info.name, projected, TORCH_DTYPES[info.dtype])
    return replaced


def read_factor(reader: TensorReader, info: TensorInfo, device: torch.device) -> torch.Tensor:
    tensor = reader.read(info)
    if not bool(torch.isfinite(tensor).all()):
        raise NumericalError(f"{info.path}: adapter tensor {info.name!r} holds NaN or Inf")
    return tensor.to(device)


Group = list[tuple[int, AdapterModule]]
"""(adapter index, module) of every module on one weight."""


def score_adapters(
    adapters: Sequence[PairedAdapter],
    source: Source,
    spec: ProjectionSpec,
    device: torch.device,
    keep: Keep,
    progress: ProgressFn | None = None,
) -> list[dict[str, ModuleScore]]:
    """Read each weight's alignment once and score every adapter module that uses it; each
    projected B goes to ``keep`` as soon as it is made.

    Returns:
        For each adapter, module name -> score (its projected B in ``keep``).
    Memory: the source's weights in flight (about ``stream.WORKERS`` V's for the model pair),
    and for each, at most about one weight's bytes of factors (``FACTOR_FLOOR``).
    """
    groups: dict[str, Group] = {}
    for index, paired in enumerate(adapters):
        for module in paired.modules:
            groups.setdefault(module.weight.name, []).append((index, module))
    weights = source.order([group[0][1].weight for group in groups.values()])
    total = sum(source.read_bytes(weight) for weight in weights)
    scores: list[dict[str, ModuleScore]] = [{} for _ in adapters]
    done = 0
    with torch.inference_mode(), TensorReader() as reader:

        def work(weight: Weight, alignment: Alignment) -> list[ModuleScore]:
            return score_factors(groups[weight.name], alignment, spec, reader, device, keep)

        for weight, found in zip(weights, source.map(weights, device, work), strict=True):
            for (index, module), score in zip(groups[weight.name], found, strict=True):
                scores[index][module.name] = score
            done += source.read_bytes(weight)
            if progress is not None:
                progress(done, total, weight.name)
    return scores


FACTOR_FLOOR = 32 << 20
"""Factors held at once for one weight: up to its V's bytes, or this, whichever is more (a
batch is scored in parts of that size: each B is projected on its own, so the bits do not
change)."""


def score_factors(
    group: Group,
    alignment: Alignment,
    spec: ProjectionSpec,
    reader: TensorReader,
    device: torch.device,
    keep: Keep,
) -> list[ModuleScore]:
    """Scores of a group's modules (every adapter module on one weight), in group order: on V
    (``projection.projector``: for all of them, a part at a time), or on a profile entry, one
    module at a time (``lowrank_score.score_entry``). Each projected B goes to ``keep``."""
    if not isinstance(alignment, Dense):
        found = []
        for index, module in group:
            a = read_factor(reader, module.lora.a, device)
            b = read_factor(reader, module.lora.b, device)
            score = score_entry(alignment, a, b, spec, module.name)
            found.append(keep.put(index, module.name, score))
        return found
    v, v_norm = alignment.v, alignment.norm
    if not math.isfinite(v_norm):
        raise _non_finite_weight(group[0][1])
    budget = max(v.numel() * 4, FACTOR_FLOOR)
    scored: dict[int, ModuleScore] = {}
    for transpose in (False, True):
        indices = [i for i, (_, module) in enumerate(group) if module.transpose == transpose]
        if not indices:
            continue
        scorer = projector(v.T if transpose else v, spec, v_norm)
        for part in _parts([(i, group[i][1]) for i in indices], budget):
            factors = [
                (read_factor(reader, m.lora.a, v.device), read_factor(reader, m.lora.b, v.device))
                for m in (group[i][1] for i in part)
            ]
            for i, score in zip(part, scorer(factors), strict=True):
                index, module = group[i]
                scored[i] = keep.put(index, module.name, score)
            del factors
    return [scored[i] for i in range(len(group))]


def _parts(modules: list[tuple[int, AdapterModule]], budget: int) -> Iterator[list[int]]:
    """The positions of ``modules`` in runs whose factors (A, B and the projected B, float32)
    fit ``budget`` (at least one module each)."""
    part: list[int] = []
    held = 0
    for i, module in modules:
        out, rank = module.lora.b.shape
        size = 4 * rank * (module.lora.a.shape[1] + 2 * out)
        if part and held + size > budget:
            yield part
            part, held = [], 0
        part.append(i)
        held += size
    if part:
        yield part


def _non_finite_weight(module: AdapterModule) -> NumericalError:
    with TensorReader() as reader:
        for info in (module.weight.base, module.weight.aligned):
            if info is not None and not bool(torch.isfinite(reader.read(info)).all()):
                return NumericalError(
                    f"{info.path}: tensor {info.name!r} holds NaN or Inf",
                    "the checkpoint is damaged; fetch it again",
                )
    return NumericalError(
        f"{module.name}: V = aligned - base overflows float32 ({module.weight.name})",
        "the weights are out of range; check the checkpoints",
    )

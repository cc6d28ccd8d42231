"""The model pair as a source: V = W_aligned − W_base, streamed from both models' shards.

``map`` runs the caller's work on each V in the stream's worker threads (``stream.map_alignment``:
the adapters' path); ``stream`` yields V in the caller's thread (``stream.alignment_stream``: a
full fine-tune's, beside its own stream of D). Both read each weight once, in shard order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from safelora_cli.inputs.adapter import Adapter
from safelora_cli.inputs.full_targets import FullPair, Targets, pair_full_weights
from safelora_cli.inputs.index import TensorIndex, TensorInfo, index_folder
from safelora_cli.inputs.pairing import pair_modules
from safelora_cli.inputs.provenance import check_pair, file_identities, refuse
from safelora_cli.inputs.resolve import ResolvedInput, resolve
from safelora_cli.math.projection import ModuleScore
from safelora_cli.notices import Notices
from safelora_cli.runs.source import AdapterModule, AlignedFn, Alignment, Dense, PathLike, T, Weight
from safelora_cli.settings import Settings
from safelora_cli.sources.stream import alignment_stream, map_alignment


@dataclass(frozen=True)
class _Difference:
    """A weight as a ``stream.Difference``: the stream then yields its V."""

    weight: Weight

    @property
    def base(self) -> TensorInfo:
        assert self.weight.base is not None  # paired against the model pair
        return self.weight.base

    @property
    def aligned(self) -> TensorInfo:
        assert self.weight.aligned is not None
        return self.weight.aligned


def check_inputs_pair(base: ResolvedInput, aligned: ResolvedInput, notices: Notices) -> None:
    """Refuse a model pair that cannot mean anything (the same model twice); warn about one that
    looks like a mistake (``provenance.check_pair``)."""
    findings = check_pair(
        base.describe(),
        aligned.describe(),
        file_identities(base.path),
        file_identities(aligned.path),
    )
    refuse(findings)
    for finding in findings:
        notices.add(finding.code, finding.message, values=finding.values)


class PairSource:
    """The base model and its aligned sibling, resolved and checked; indexed when first paired."""

    bounded = False

    def __init__(self, base: ResolvedInput, aligned: ResolvedInput) -> None:
        self.base_input = base
        self.aligned_input = aligned

    @classmethod
    def open(
        cls,
        base: PathLike,
        aligned: PathLike | ResolvedInput,
        revision: str | None,
        notices: Notices,
    ) -> PairSource:
        """Resolve both models (``aligned`` may be resolved already) and check the pair."""
        base_input = resolve(str(base), revision, role="--base", notices=notices)
        if not isinstance(aligned, ResolvedInput):
            aligned = resolve(str(aligned), revision, role="--aligned", notices=notices)
        check_inputs_pair(base_input, aligned, notices)
        return cls(base_input, aligned)

    @cached_property
    def base(self) -> TensorIndex:
        return index_folder(self.base_input.path)

    @cached_property
    def aligned(self) -> TensorIndex:
        return index_folder(self.aligned_input.path)

    def inputs(self) -> dict[str, Any]:
        return {"base": self.base_input.describe(), "aligned": self.aligned_input.describe()}

    def local_inputs(self) -> list[Path]:
        return [self.base_input.path, self.aligned_input.path]

    def trained_on(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.base_input.describe(), self.aligned_input.describe()

    def check_aligned(self, aligned: ResolvedInput, notices: Notices) -> None:
        """Nothing to check: the pair's aligned model is the fine-tune's."""

    def pair_adapter(self, adapter: Adapter, notices: Notices) -> list[AdapterModule]:
        return [
            AdapterModule(
                pair.lora,
                Weight(pair.base.name, pair.base, pair.aligned),
                pair.transpose,
                pair.tied,
            )  # fmt: skip
            for pair in pair_modules(adapter, self.base, self.aligned, notices)
        ]

    def pair_full(
        self, model: TensorIndex, aligned: TensorIndex, targets: Targets, model_type: str | None
    ) -> list[FullPair]:
        return pair_full_weights(model, aligned, self.base, targets, model_type)

    def order(self, weights: Sequence[Weight]) -> list[Weight]:
        return sorted(weights, key=lambda weight: _Difference(weight).base.location)

    def read_bytes(self, weight: Weight) -> int:
        difference = _Difference(weight)
        return difference.base.nbytes + difference.aligned.nbytes

    def map(self, weights: Sequence[Weight], device: torch.device, fn: AlignedFn[T]) -> Iterator[T]:
        def work(difference: _Difference, v: torch.Tensor, v_norm: float) -> T:
            return fn(difference.weight, Dense(v, v_norm))

        return map_alignment([_Difference(w) for w in weights], device, work)

    def stream(self, weights: Sequence[Weight], device: torch.device) -> Iterator[Alignment]:
        for _, v, v_norm in alignment_stream([_Difference(w) for w in weights], device):
            yield Dense(v, v_norm)

    def uncertain(
        self,
        settings: Settings,
        scores: dict[str, ModuleScore],
        selected: set[str],
        notices: Notices,
    ) -> frozenset[str]:
        return frozenset()

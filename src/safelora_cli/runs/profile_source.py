"""An alignment profile as a source: V's low-rank entries, read from one file, no model weight.

Each module pairs with its weight's entry by name and shape (``profile.check_adapter``: every
problem at once); the entries are read in name order, each checked against its checksum
(``profile.load_entry``). Scores through a profile carry bounds (``lowrank_score``): where they
leave the selection open (a module near the cut), the run says so (``uncertain``: a
``profile-boundary`` warning, and ``uncertain`` in the report).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from safelora_cli.inputs.adapter import Adapter
from safelora_cli.inputs.full_targets import FullPair, Targets, pair_full_weights
from safelora_cli.inputs.index import TensorIndex
from safelora_cli.inputs.loader import TensorReader
from safelora_cli.inputs.provenance import check_profile_pair
from safelora_cli.inputs.resolve import ResolvedInput, resolve_profile
from safelora_cli.math.lowrank import LowRank
from safelora_cli.math.lowrank_score import uncertain_modules
from safelora_cli.math.projection import ModuleScore
from safelora_cli.notices import Notices
from safelora_cli.runs.source import AdapterModule, AlignedFn, PathLike, T, Weight
from safelora_cli.settings import Select, Settings
from safelora_cli.sources.profile import ProfileInfo, check_adapter, load_entry, read_profile
from safelora_cli.sources.profile_summary import provenance


class ProfileSource:
    """A validated profile standing in for the model pair."""

    bounded = True

    def __init__(self, profile_input: ResolvedInput, profile: ProfileInfo) -> None:
        self.profile_input = profile_input
        self.profile = profile

    @classmethod
    def open(cls, profile: PathLike, revision: str | None, notices: Notices) -> ProfileSource:
        """Resolve the profile (a file or hub id) and validate its header and metadata."""
        profile_input = resolve_profile(str(profile), revision, notices)
        return cls(profile_input, read_profile(profile_input.path))

    def record(self) -> dict[str, Any]:
        """The report's ``inputs.profile``: where it is, and what it was made with."""
        return {
            "ref": self.profile_input.ref,
            **provenance(self.profile),
            "hub_id": self.profile_input.hub_id,
            "revision": self.profile_input.revision,
            "commit": self.profile_input.commit,
        }

    def inputs(self) -> dict[str, Any]:
        """The pair the profile was made from, and the profile."""
        pair = self.profile.inputs
        return {"base": pair.get("base"), "aligned": pair.get("aligned"), "profile": self.record()}

    def local_inputs(self) -> list[Path]:
        return []

    def trained_on(self) -> tuple[dict[str, Any], dict[str, Any]]:
        pair = self.profile.inputs
        return pair.get("base") or {}, pair.get("aligned") or {}

    def check_aligned(self, aligned: ResolvedInput, notices: Notices) -> None:
        recorded = self.profile.inputs.get("aligned") or {}
        for finding in check_profile_pair(recorded, aligned.describe()):
            notices.add(finding.code, finding.message, values=finding.values)

    def pair_adapter(self, adapter: Adapter, notices: Notices) -> list[AdapterModule]:
        """Each module with its entry: its weight's, or for a tied lm_head the embedding's
        (``ProfileInfo.stored_weight``), as pairing on the model pair has it."""
        profile = self.profile
        modules = {f"{m.module}.weight": (m.b.shape[0], m.a.shape[1]) for m in adapter.modules}
        entries = {w: profile.weights.get(profile.stored_weight(w)) for w in modules}
        stored_transposed = {w for w, e in entries.items() if e is not None and e.transposed}
        # the profile knows each weight's layout, and which lm_head is a tied embedding
        check_adapter(profile, modules, stored_transposed, tied=True)
        paired = []
        for m in adapter.modules:
            stored = profile.stored_weight(f"{m.module}.weight")
            tied = stored != f"{m.module}.weight"
            paired.append(
                AdapterModule(m, Weight(stored), profile.weights[stored].transposed, tied)
            )
        return paired

    def pair_full(
        self, model: TensorIndex, aligned: TensorIndex, targets: Targets, model_type: str | None
    ) -> list[FullPair]:
        pairs = pair_full_weights(model, aligned, None, targets, model_type)
        shapes = {p.name: _module_shape(p) for p in pairs}
        check_adapter(self.profile, shapes, {p.name for p in pairs if p.transpose})
        return pairs

    def order(self, weights: Sequence[Weight]) -> list[Weight]:
        return sorted(weights, key=lambda weight: weight.name)

    def read_bytes(self, weight: Weight) -> int:
        return self.profile.tensor_bytes(weight.name)

    def map(self, weights: Sequence[Weight], device: torch.device, fn: AlignedFn[T]) -> Iterator[T]:
        """In the caller's thread: an entry is small, the work on it is too."""
        for weight, entry in zip(weights, self.stream(weights, device), strict=True):
            yield fn(weight, entry)

    def stream(self, weights: Sequence[Weight], device: torch.device) -> Iterator[LowRank]:
        """Each weight's entry, checked, on the CPU (the kernels move what they use)."""
        with TensorReader() as reader:
            for weight in weights:
                yield load_entry(self.profile, weight.name, reader)

    def uncertain(
        self,
        settings: Settings,
        scores: dict[str, ModuleScore],
        selected: set[str],
        notices: Notices,
    ) -> frozenset[str]:
        """The modules closer to the selection's cut than their bound, with a
        ``profile-boundary`` notice when there are any."""
        cosines = {name: s.cosine for name, s in scores.items() if s.cosine is not None}
        bounds = {name: scores[name].cosine_bound or 0.0 for name in cosines}
        number = settings.select is Select.NUMBER
        uncertain = uncertain_modules(
            cosines,
            bounds,
            selected,
            threshold=None if number else settings.threshold,
            num_layers=settings.num_layers if number else None,
        )
        if uncertain:
            shown = ", ".join(sorted(uncertain)[:5]) + (", ..." if len(uncertain) > 5 else "")
            notices.add(
                "profile-boundary",
                f"{len(uncertain)} module(s) are closer to the selection's cut than the "
                f"profile's error bound ({shown}): with the model pair the selection could "
                "differ there; build the profile with a lower --tolerance, or run on the model "
                "pair",
                values={"modules": sorted(uncertain)},
            )
        return frozenset(uncertain)


def _module_shape(pair: FullPair) -> tuple[int, int]:
    out_dim, in_dim = pair.ft.shape[-2:]
    return (in_dim, out_dim) if pair.transpose else (out_dim, in_dim)

"""Adapters scored through an alignment profile (``--profile``) instead of the model pair.

No model weight is read: each adapter module pairs with its weight's profile entry by name and
shape (``profile.check_adapter``: every problem at once), and is scored from the entry
(``lowrank_score.score_entry``): subspace exactly within the stored rank; paper mode with a bound
on how far each cosine can be from the exact one. Where the bounds leave the selection open (a
module near the cut), the run says so: a ``profile-boundary`` warning, and ``uncertain`` in the
report. Writing is the adapter path's, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli.inputs.adapter import load_adapter
from safelora_cli.inputs.loader import TensorReader
from safelora_cli.inputs.provenance import check_adapter as check_trained_on
from safelora_cli.inputs.resolve import ResolvedInput, resolve, resolve_profile
from safelora_cli.math.lowrank_score import score_entry, uncertain_modules
from safelora_cli.math.projection import ModuleScore
from safelora_cli.math.selection import select_modules
from safelora_cli.notices import Notices, NotifyFn
from safelora_cli.runs.job import ProfiledAdapter, ProfiledModule
from safelora_cli.runs.scoring import ProgressFn, Scored, adapter_report, read_factor
from safelora_cli.settings import Select, Settings
from safelora_cli.sources.profile import ProfileInfo, check_adapter, load_entry, read_profile
from safelora_cli.sources.profile_summary import provenance

PathLike = str | Path


@dataclass(frozen=True)
class ProfileJob:
    """Adapters, the profile standing in for their model pair, and the settings."""

    profile_input: ResolvedInput
    profile: ProfileInfo
    adapters: list[ProfiledAdapter]
    settings: Settings
    notices: Notices

    def local_inputs(self) -> list[Path]:
        return [a.input.path for a in self.adapters]

    def inputs(self) -> dict[str, Any]:
        """The report's ``inputs``: the pair the profile was made from, and the profile."""
        pair = self.profile.inputs
        return {
            "base": pair.get("base"),
            "aligned": pair.get("aligned"),
            "profile": {
                "ref": self.profile_input.ref,
                **provenance(self.profile),
                "hub_id": self.profile_input.hub_id,
                "revision": self.profile_input.revision,
                "commit": self.profile_input.commit,
            },  # fmt: skip
        }


def prepare_profiled(
    adapters: Sequence[PathLike],
    profile: PathLike,
    settings: Settings,
    revision: str | None = None,
    notify: NotifyFn | None = None,
) -> ProfileJob:
    """Resolve and validate every adapter and the profile; reads headers and metadata only."""
    notices = Notices(notify)
    loaded = []
    for ref in adapters:
        adapter_input = resolve(str(ref), revision=None, role="ADAPTER", notices=notices)
        adapter = load_adapter(adapter_input.path, settings.adapter_name)
        settings.check_modules(len(adapter.modules))
        loaded.append((adapter_input, adapter))
    profile_input = resolve_profile(str(profile), revision, notices)
    info = read_profile(profile_input.path)
    pair = info.inputs
    jobs = []
    for adapter_input, adapter in loaded:
        modules = {f"{m.module}.weight": (m.b.shape[0], m.a.shape[1]) for m in adapter.modules}
        stored_transposed = {w for w in modules if w in info.weights and info.weights[w].transposed}
        check_adapter(info, modules, stored_transposed)  # the profile knows each weight's layout
        for finding in check_trained_on(adapter.config, pair.get("base") or {},
                                        pair.get("aligned") or {}):  # fmt: skip
            notices.scoped(str(adapter_input.path)).add(
                finding.code, finding.message, values=finding.values
            )
        pairs = [
            ProfiledModule(m, f"{m.module}.weight", info.weights[f"{m.module}.weight"].transposed)
            for m in adapter.modules
        ]
        jobs.append(ProfiledAdapter(adapter_input, adapter, pairs))
    return ProfileJob(profile_input, info, jobs, settings, notices)


def score_profiled(
    job: ProfileJob, device: torch.device, progress: ProgressFn | None = None
) -> list[Scored]:
    """Score every adapter module from its profile entry (each entry read once), then select."""
    by_weight: dict[str, list[tuple[int, ProfiledModule]]] = {}
    for index, adapter in enumerate(job.adapters):
        for module in adapter.pairs:
            by_weight.setdefault(module.weight, []).append((index, module))
    weights = sorted(by_weight)
    total = sum(job.profile.tensor_bytes(w) for w in weights)
    done, spec = 0, job.settings.projection_spec
    scores: list[dict[str, ModuleScore]] = [{} for _ in job.adapters]
    with torch.inference_mode(), TensorReader() as reader:
        for weight in weights:
            entry = load_entry(job.profile, weight, reader)
            for index, module in by_weight[weight]:
                a = read_factor(reader, module.lora.a, device)
                b = read_factor(reader, module.lora.b, device)
                scores[index][module.name] = score_entry(entry, a, b, spec, module.name)
            done += job.profile.tensor_bytes(weight)
            if progress is not None:
                progress(done, total, weight)
    return [_select(job, adapter, s) for adapter, s in zip(job.adapters, scores, strict=True)]


def _select(job: ProfileJob, adapter: ProfiledAdapter, scores: dict[str, ModuleScore]) -> Scored:
    settings = job.settings
    cosines = {name: s.cosine for name, s in scores.items() if s.cosine is not None}
    selected, used = select_modules(
        cosines, settings.select, settings.num_layers, settings.threshold
    )
    notices = job.notices.scoped(str(adapter.input.path))
    uncertain = boundary_check(settings, scores, selected, notices)
    return Scored(adapter, scores, selected, used, uncertain)


def boundary_check(
    settings: Settings, scores: dict[str, ModuleScore], selected: set[str], notices: Notices
) -> frozenset[str]:
    """The modules whose selection a profile's bounds leave open (``uncertain_modules``), with a
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
            f"{len(uncertain)} module(s) are closer to the selection's cut than the profile's "
            f"error bound ({shown}): with the model pair the selection could differ there; "
            "build the profile with a lower --tolerance, or run on the model pair",
            values={"modules": sorted(uncertain)},
        )
    return frozenset(uncertain)


def profiled_report(
    job: ProfileJob, scored: Scored, device: torch.device, output: Path | None
) -> dict[str, Any]:
    """The report of one adapter scored through the profile."""
    return adapter_report(scored, job.settings, device, job.inputs(), job.notices, output)

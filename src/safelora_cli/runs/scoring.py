"""Scoring: stream every targeted weight once, score every adapter module that uses it, select,
and build each adapter's report.

Several adapters against one model pair share the stream: each base/aligned weight is read once
and V is applied to every adapter that targets it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli.errors import NumericalError, UsageError
from safelora_cli.inputs.index import TensorInfo
from safelora_cli.inputs.loader import TORCH_DTYPES, TensorReader
from safelora_cli.inputs.pairing import ModulePair
from safelora_cli.inputs.provenance import check_scores, refuse
from safelora_cli.math.projection import ModuleScore, score_modules
from safelora_cli.math.selection import select_modules
from safelora_cli.notices import Notices
from safelora_cli.output import report as reporting
from safelora_cli.output.writer import cast_checked
from safelora_cli.runs.job import AdapterJob, Job, ProfiledAdapter, ProfiledModule
from safelora_cli.settings import ProjectionSpec, Settings
from safelora_cli.sources.stream import map_alignment

Record = reporting.ModuleRecord

ProgressFn = Callable[[int, int, str], None]
"""Called as ``progress(bytes_done, bytes_total, weight)`` after each weight is processed: the
bytes of base and aligned weights read so far, of all there are to read."""


@dataclass(frozen=True)
class Scored:
    """One adapter after scoring and selection: what the report and the writer need.

    ``job`` is the adapter paired against the model pair, or against a profile
    (``job.ProfiledAdapter``); ``uncertain``: modules a profile's bounds leave open.
    """

    job: AdapterJob | ProfiledAdapter
    scores: dict[str, ModuleScore]
    selected: set[str]
    threshold_used: float | None
    uncertain: frozenset[str] = frozenset()

    def replaced_factors(self) -> dict[str, torch.Tensor]:
        """lora_B tensor name -> projected B in the adapter's dtype, for the selected modules."""
        replaced = {}
        for pair in self.job.pairs:
            projected = self.scores[pair.name].projected_b
            if pair.name in self.selected and projected is not None:
                info = pair.lora.b
                replaced[info.name] = cast_checked(info.name, projected, TORCH_DTYPES[info.dtype])
        return replaced


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda[:N]`` must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(
            f"--device {spec!r} is not a device", "use auto, cpu, cuda, cuda:N"
        ) from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UsageError(
                f"--device {spec}: no such CUDA device ({count} found)", "--device cpu"
            )
    elif device.type != "cpu":
        raise UsageError(f"--device {spec!r} is not supported", "use auto, cpu, cuda or cuda:N")
    return device


def _weight_groups(job: Job) -> list[list[tuple[int, ModulePair]]]:
    """(adapter index, pair) grouped by base weight (each group needs one V), in shard order."""
    groups: dict[str, list[tuple[int, ModulePair]]] = {}
    for adapter_index, adapter_job in enumerate(job.adapters):
        for pair in adapter_job.pairs:
            groups.setdefault(pair.base.name, []).append((adapter_index, pair))
    return sorted(groups.values(), key=lambda group: group[0][1].base.location)


def read_factor(reader: TensorReader, info: TensorInfo, device: torch.device) -> torch.Tensor:
    tensor = reader.read(info)
    if not bool(torch.isfinite(tensor).all()):
        raise NumericalError(f"{info.path}: adapter tensor {info.name!r} holds NaN or Inf")
    return tensor.to(device)


def _non_finite_weight(pair: ModulePair) -> NumericalError:
    with TensorReader() as reader:
        for info in (pair.base, pair.aligned):
            if not bool(torch.isfinite(reader.read(info)).all()):
                return NumericalError(
                    f"{info.path}: tensor {info.name!r} holds NaN or Inf",
                    "the checkpoint is damaged; fetch it again",
                )
    return NumericalError(
        f"{pair.name}: V = aligned - base overflows float32 ({pair.base.name})",
        "the weights are out of range; check the checkpoints",
    )


def _score_group(
    group: list[tuple[int, ModulePair]],
    v: torch.Tensor,
    v_norm: float,
    spec: ProjectionSpec,
    reader: TensorReader,
) -> list[ModuleScore]:
    """Scores of a group's modules (every adapter module on one weight), in group order; one
    product for all of them, their B's stacked (``score_modules``)."""
    if not math.isfinite(v_norm):
        raise _non_finite_weight(group[0][1])
    found: dict[int, ModuleScore] = {}
    for transpose in (False, True):
        indices = [i for i, (_, pair) in enumerate(group) if pair.transpose == transpose]
        factors = [
            (
                read_factor(reader, pair.lora.a, v.device),
                read_factor(reader, pair.lora.b, v.device),
            )
            for pair in (group[i][1] for i in indices)
        ]
        if factors:
            scored = score_modules(v.T if transpose else v, factors, spec, v_norm)
            found.update(zip(indices, scored, strict=True))
    return [found[i] for i in range(len(group))]


def compute_scores(
    job: Job, device: torch.device, progress: ProgressFn | None = None
) -> list[dict[str, ModuleScore]]:
    """Stream every targeted weight once and score every adapter module that uses it.

    Returns:
        For each adapter of the job, module name -> score.
    Memory: about ``stream.WORKERS`` weights' V at a time, plus the adapters' projected B's.
    """
    scores: list[dict[str, ModuleScore]] = [{} for _ in job.adapters]
    groups = _weight_groups(job)
    leaders = [group[0][1] for group in groups]
    by_weight = {leader.base.name: group for leader, group in zip(leaders, groups, strict=True)}
    spec = job.settings.projection_spec
    total = sum(pair.base.nbytes + pair.aligned.nbytes for pair in leaders)
    done = 0
    with TensorReader() as adapter_reader:

        def score(leader: ModulePair, v: torch.Tensor, v_norm: float) -> list[ModuleScore]:
            return _score_group(by_weight[leader.base.name], v, v_norm, spec, adapter_reader)

        for group, group_scores in zip(groups, map_alignment(leaders, device, score), strict=True):
            for (adapter_index, pair), module_score in zip(group, group_scores, strict=True):
                scores[adapter_index][pair.name] = module_score
            leader = group[0][1]
            done += leader.base.nbytes + leader.aligned.nbytes
            if progress is not None:
                progress(done, total, leader.base.name)
    return scores


def score_job(job: Job, device: torch.device, progress: ProgressFn | None = None) -> list[Scored]:
    """Score every adapter of the job and select its modules to project."""
    settings = job.settings
    scored = []
    for adapter_job, scores in zip(
        job.adapters, compute_scores(job, device, progress), strict=True
    ):
        cosines = {name: s.cosine for name, s in scores.items() if s.cosine is not None}
        selected, used = select_modules(
            cosines, settings.select, settings.num_layers, settings.threshold
        )
        scored.append(Scored(adapter_job, scores, selected, used))
    return scored


def _record(pair: ModulePair | ProfiledModule, score: ModuleScore, uncertain: bool) -> Record:
    return reporting.record(
        score,
        module=pair.name,
        weight=pair.weight,
        shape=pair.shape,
        rank=pair.lora.rank,
        tied=pair.tied,
        transposed=pair.transpose,
        uncertain=uncertain,
    )


def adapter_report(
    scored: Scored,
    settings: Settings,
    device: torch.device,
    inputs: dict[str, Any],
    notices: Notices,
    output: Path | None,
) -> dict[str, Any]:
    """The report of one scored adapter (``output``: where it is written, None for ``score``).

    Raises:
        IncompatibleInputError: base and aligned are identical in every module the adapter
            adapts: "nothing to project" would be a false all-clear (``provenance.check_scores``).
    """
    adapter = scored.job
    notices = notices.scoped(str(adapter.input.path))
    report = reporting.build(
        settings=settings.describe(str(device)),
        inputs={**inputs, "adapter": adapter.input.describe()},
        records=[
            _record(pair, scored.scores[pair.name], pair.name in scored.uncertain)
            for pair in adapter.pairs
        ],
        selected=scored.selected,
        threshold_used=scored.threshold_used,
        passthrough=adapter.adapter.passthrough,
        output=str(output) if output is not None else None,
        warnings=[],
    )
    findings = check_scores(report)
    refuse(findings)
    for finding in findings:
        notices.add(finding.code, finding.message, values=finding.values)
    report["warnings"] = notices.as_list(notices.adapter)
    return report


def build_report(
    job: Job, scored: Scored, device: torch.device, output: Path | None
) -> dict[str, Any]:
    """The report of one adapter scored against the model pair (see ``adapter_report``)."""
    inputs = {"base": job.base_input.describe(), "aligned": job.aligned_input.describe()}
    return adapter_report(scored, job.settings, device, inputs, job.notices, output)

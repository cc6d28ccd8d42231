"""Run: the one path every run takes: prepare (resolve, index, pair, validate: headers only),
score (one pass over the source), select, report; ``execute.py`` then writes.

A run is what is patched (``kinds.Update``: ``AdapterUpdate`` for LoRA adapters, ``FullUpdate``
for a full model) × where V comes from (``source.Source``: ``PairSource`` for the model pair,
``ProfileSource`` for a profile) × what is written (``kinds.Written``). ``prepare`` is where the
kinds and the sources are chosen; every step after it is the same for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli.errors import UsageError
from safelora_cli.inputs.provenance import check_scores, refuse
from safelora_cli.inputs.resolve import ResolvedInput
from safelora_cli.math.selection import select_modules
from safelora_cli.notices import Notices, NotifyFn
from safelora_cli.output import report as reporting
from safelora_cli.runs.adapters import AdapterUpdate, load_adapters
from safelora_cli.runs.fullmodel import FullUpdate, check_full_settings, resolve_full
from safelora_cli.runs.inspection import FULL, input_kind
from safelora_cli.runs.keep import InMemory, Keep
from safelora_cli.runs.kinds import Module, ProgressFn, Scored, Update, Written
from safelora_cli.runs.pair_source import PairSource
from safelora_cli.runs.profile_source import ProfileSource
from safelora_cli.runs.source import PathLike, Source
from safelora_cli.settings import Settings


@dataclass(frozen=True)
class Request:
    """What a run is asked to do, as the API and the CLI take it.

    ``inputs``: adapter folders (several: a batch), or one full fine-tune's model folder;
    ``base`` and ``aligned`` (the model pair) or ``profile`` (with ``aligned`` for a full
    fine-tune: D = W_ft − W_aligned).
    """

    inputs: Sequence[PathLike]
    base: PathLike | None
    aligned: PathLike | None
    profile: PathLike | None
    settings: Settings
    written: Written = Written.NOTHING
    revision: str | None = None
    notify: NotifyFn | None = None


@dataclass(frozen=True)
class Run:
    """A prepared run: every input validated and paired, nothing heavy read yet."""

    update: Update
    source: Source
    settings: Settings
    notices: Notices
    written: Written

    def local_inputs(self) -> list[Path]:
        return [*self.update.local_inputs(), *self.source.local_inputs()]


def is_full(inputs: Sequence[PathLike], settings: Settings) -> bool:
    """Whether the run is on a full fine-tune (a local model folder) rather than adapters."""
    full = [Path(ref).is_dir() and input_kind(Path(ref)) == FULL for ref in inputs]
    if any(full) and len(inputs) > 1:
        raise UsageError(
            "a full fine-tune (a model folder) is patched alone, not in a batch",
            "run once per fine-tune",
        )
    if not any(full) and settings.targets:
        raise UsageError("--targets applies to full fine-tunes; an adapter's modules are its own")
    return any(full)


def open_source(
    base: PathLike | None,
    aligned: PathLike | ResolvedInput | None,
    profile: PathLike | None,
    revision: str | None,
    notices: Notices,
) -> Source:
    """The source the arguments name (checked by ``_check_sources``): a profile, or the model
    pair; resolved and validated, headers and metadata only. A new source is one line here."""
    if profile is not None:
        return ProfileSource.open(profile, revision, notices)
    assert base is not None
    assert aligned is not None
    return PairSource.open(base, aligned, revision, notices)


def prepare(request: Request, full: bool) -> Run:
    """Resolve, index, pair and validate every input: headers only. One bad input stops the
    run, named in the error, before anything heavy is read."""
    settings, written = request.settings, request.written
    if full:
        check_full_settings(settings, written is Written.MERGED)
    _check_sources(request, full)
    notices = Notices(request.notify)
    update: Update
    if full:
        assert request.aligned is not None
        model, aligned = resolve_full(request.inputs[0], request.aligned, request.revision,
                                      notices)  # fmt: skip
        source = open_source(request.base, aligned, request.profile, request.revision, notices)
        update = FullUpdate.pair(model, aligned, source, settings, notices)
        written = Written.NOTHING if written is Written.NOTHING else Written.MODEL
    else:
        if not request.inputs:
            raise UsageError("no ADAPTER given")
        loaded = load_adapters(request.inputs, settings, notices)
        source = open_source(request.base, request.aligned, request.profile, request.revision,
                             notices)  # fmt: skip
        update = AdapterUpdate.pair(loaded, source, settings, notices)
    if written is Written.MERGED and not isinstance(source, PairSource):
        raise UsageError(
            "--merge needs the aligned model's weights; a profile holds none",
            "give --base and --aligned instead of --profile",
        )
    return Run(update, source, settings, notices, written)


def _check_sources(request: Request, full: bool) -> None:
    """The model pair or a profile, not both (a full fine-tune's D also needs --aligned)."""
    base, aligned, profile = request.base, request.aligned, request.profile
    if profile is not None:
        if full and base is not None:
            raise UsageError("--profile and --base both given", "give one or the other")
        if full and aligned is None:
            raise UsageError(
                "a full fine-tune through a profile also needs --aligned: D = W_ft − W_aligned",
                "give --aligned REF (the profile stands in for --base only)",
            )
        if not full and (base is not None or aligned is not None):
            flag = "--base" if base is not None else "--aligned"
            raise UsageError(
                f"--profile and {flag} both given",
                "for an adapter the profile stands in for the model pair: give one or the other",
            )
        return
    for ref, flag in ((base, "--base"), (aligned, "--aligned")):
        if ref is None:
            raise UsageError(f"no {flag} given", "give the model pair, or a --profile")


def score(
    run: Run, device: torch.device, progress: ProgressFn | None = None, keep: Keep | None = None
) -> list[Scored]:
    """Score every target in one pass over the source, then select its modules to project
    (and, through a profile, check the cut against the scores' bounds).

    Args:
        keep: where the projected B's wait for the writer (default: in memory).
    """
    settings = run.settings
    found = run.update.score(run.source, settings, device, progress, keep or InMemory())
    scored = []
    for index, (target, scores) in enumerate(zip(run.update.targets, found, strict=True)):
        cosines = {name: s.cosine for name, s in scores.items() if s.cosine is not None}
        selected, used = select_modules(
            cosines, settings.select, settings.num_layers, settings.threshold
        )
        uncertain = frozenset[str]()
        if run.source.bounded:
            uncertain = run.source.uncertain(settings, scores, selected, target.notices)
        scored.append(Scored(index, target, scores, selected, used, uncertain))
    return scored


def report(run: Run, scored: Scored, device: torch.device, output: Path | None) -> dict[str, Any]:
    """The report of one scored target (``output``: where it is written, None for ``score``).

    Raises:
        IncompatibleInputError: base and aligned are identical in every module scored:
            "nothing to project" would be a false all-clear (``provenance.check_scores``).
    """
    target = scored.target
    built = reporting.build(
        kind=run.update.kind,
        settings=run.settings.describe(str(device)),
        inputs=run.update.inputs(run.source, target),
        records=[_record(scored, module) for module in target.modules],
        selected=scored.selected,
        threshold_used=scored.threshold_used,
        passthrough=target.passthrough,
        output=str(output) if output is not None else None,
        warnings=[],
    )
    notices = target.notices
    findings = check_scores(built)
    refuse(findings)
    for finding in findings:
        notices.add(finding.code, finding.message, values=finding.values)
    built["warnings"] = notices.as_list(notices.adapter)
    return built


def _record(scored: Scored, module: Module) -> reporting.ModuleRecord:
    return reporting.record(
        scored.scores[module.name],
        module=module.name,
        weight=module.weight,
        shape=module.shape,
        rank=module.rank,
        tied=module.tied,
        transposed=module.transposed,
        uncertain=module.name in scored.uncertain,
    )


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

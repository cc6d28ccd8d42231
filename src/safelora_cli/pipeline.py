"""Pipeline: the only place the steps meet. resolve -> index -> pair -> stream -> project ->
select -> report -> write, in one direction.

Several adapters against one model pair share the stream: each base/aligned weight is read once
and V is applied to every adapter that targets it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli import report as reporting
from safelora_cli.adapter import Adapter, load_adapter
from safelora_cli.errors import NumericalError, SafeLoraError, UsageError
from safelora_cli.index import TensorIndex, TensorInfo, index_folder
from safelora_cli.loader import TORCH_DTYPES, TensorReader
from safelora_cli.notices import Notices, NotifyFn
from safelora_cli.pairing import ModulePair, pair_modules
from safelora_cli.projection import ModuleScore, score_module
from safelora_cli.resolve import ResolvedInput, resolve
from safelora_cli.selection import select_modules
from safelora_cli.settings import Settings
from safelora_cli.stream import alignment_stream
from safelora_cli.writer import (
    OutputFolder,
    cast_checked,
    check_output,
    check_report_path,
    output_error,
    write_adapter,
)

ProgressFn = Callable[[int, int, str], None]
"""Called as ``progress(done, total, weight)`` after each base/aligned weight is processed."""
PathLike = str | Path


@dataclass(frozen=True)
class AdapterJob:
    """One adapter, validated and paired against the model pair."""

    input: ResolvedInput
    adapter: Adapter
    pairs: list[ModulePair]


@dataclass(frozen=True)
class Job:
    """Everything validated before the heavy read: inputs, indexes, module pairs, settings."""

    base_input: ResolvedInput
    aligned_input: ResolvedInput
    base: TensorIndex
    aligned: TensorIndex
    adapters: list[AdapterJob]
    settings: Settings
    notices: Notices

    def local_inputs(self) -> list[Path]:
        return [self.base_input.path, self.aligned_input.path] + [
            a.input.path for a in self.adapters
        ]


@dataclass(frozen=True)
class Scored:
    """One adapter after scoring and selection: what the report and the writer need."""

    job: AdapterJob
    scores: dict[str, ModuleScore]
    selected: set[str]
    threshold_used: float | None

    def replaced_factors(self) -> dict[str, torch.Tensor]:
        """lora_B tensor name -> projected B in the adapter's dtype, for the selected modules."""
        replaced = {}
        for pair in self.job.pairs:
            projected = self.scores[pair.name].projected_b
            if pair.name in self.selected and projected is not None:
                info = pair.lora.b
                replaced[info.name] = cast_checked(info.name, projected, TORCH_DTYPES[info.dtype])
        return replaced


@dataclass(frozen=True)
class Result:
    """A finished run for one adapter: its report, and its output folder (None for ``score``)."""

    report: dict[str, Any]
    output: Path | None


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


def prepare(
    adapters: Sequence[PathLike],
    base: PathLike,
    aligned: PathLike,
    settings: Settings,
    revision: str | None = None,
    notify: NotifyFn | None = None,
) -> Job:
    """Resolve, index and pair every input. Reads headers only.

    Every adapter is validated before anything heavy is read: one bad adapter stops the run,
    named in the error.
    """
    if not adapters:
        raise UsageError("no ADAPTER given")
    notices = Notices(notify)
    loaded = []
    for ref in adapters:
        adapter_input = resolve(str(ref), revision=None, role="ADAPTER", notices=notices)
        adapter = load_adapter(adapter_input.path, settings.adapter_name)
        settings.check_modules(len(adapter.modules))
        loaded.append((adapter_input, adapter))
    base_input = resolve(str(base), revision, role="--base", notices=notices)
    aligned_input = resolve(str(aligned), revision, role="--aligned", notices=notices)
    base_index, aligned_index = index_folder(base_input.path), index_folder(aligned_input.path)
    jobs = [AdapterJob(i, a, pair_modules(a, base_index, aligned_index)) for i, a in loaded]
    return Job(base_input, aligned_input, base_index, aligned_index, jobs, settings, notices)


def _weight_groups(job: Job) -> list[list[tuple[int, ModulePair]]]:
    """(adapter index, pair) grouped by base weight (each group needs one V), in shard order."""
    groups: dict[str, list[tuple[int, ModulePair]]] = {}
    for adapter_index, adapter_job in enumerate(job.adapters):
        for pair in adapter_job.pairs:
            groups.setdefault(pair.base.name, []).append((adapter_index, pair))
    return sorted(groups.values(), key=lambda group: group[0][1].base.location)


def _read_factor(reader: TensorReader, info: TensorInfo, device: torch.device) -> torch.Tensor:
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


def compute_scores(
    job: Job, device: torch.device, progress: ProgressFn | None = None
) -> list[dict[str, ModuleScore]]:
    """Stream every targeted weight once and score every adapter module that uses it.

    Returns:
        For each adapter of the job, module name -> score.
    Memory: about two weights' V at a time, plus the adapters' projected B's.
    """
    scores: list[dict[str, ModuleScore]] = [{} for _ in job.adapters]
    groups = _weight_groups(job)
    leaders = [group[0][1] for group in groups]
    spec = job.settings.projection_spec
    with torch.inference_mode(), TensorReader() as adapter_reader:
        for done, (group, (_, v, v_norm)) in enumerate(
            zip(groups, alignment_stream(leaders, device), strict=True), start=1
        ):
            for adapter_index, pair in group:
                a = _read_factor(adapter_reader, pair.lora.a, device)
                b = _read_factor(adapter_reader, pair.lora.b, device)
                score = score_module(v.T if pair.transpose else v, a, b, spec, v_norm)
                if not math.isfinite(score.v_norm):
                    raise _non_finite_weight(pair)
                scores[adapter_index][pair.name] = score
            del v
            if progress is not None:
                progress(done, len(groups), group[0][1].base.name)
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


def _record(pair: ModulePair, score: ModuleScore) -> reporting.ModuleRecord:
    return reporting.ModuleRecord(
        module=pair.name,
        weight=pair.base.name,
        shape=pair.shape,
        rank=pair.lora.rank,
        cosine=score.cosine,
        skipped=score.skipped,
        v_norm=score.v_norm,
        b_norm=score.b_norm,
        projected_b_norm=score.projected_b_norm,
        distance=score.distance,
        tied=pair.tied,
        transposed=pair.transpose,
        subspace_rank=score.subspace_rank,
        captured_energy=score.captured_energy,
    )


def build_report(
    job: Job, scored: Scored, device: torch.device, output: Path | None
) -> dict[str, Any]:
    """The report of one scored adapter (``output``: where it is written, None for ``score``)."""
    return reporting.build(
        settings=job.settings.describe(str(device)),
        inputs={
            "base": job.base_input.describe(),
            "aligned": job.aligned_input.describe(),
            "adapter": scored.job.input.describe(),
        },
        records=[_record(pair, scored.scores[pair.name]) for pair in scored.job.pairs],
        selected=scored.selected,
        threshold_used=scored.threshold_used,
        passthrough=scored.job.adapter.passthrough,
        output=str(output) if output is not None else None,
        warnings=job.notices.as_list(),
    )


def score_many(
    adapters: Sequence[PathLike],
    base: PathLike,
    aligned: PathLike,
    settings: Settings = Settings(),
    revision: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> list[Result]:
    """Score several adapters against one model pair (each weight read once); writes nothing."""
    job = prepare(adapters, base, aligned, settings, revision, notify)
    device = resolve_device(settings.device)
    return [
        Result(build_report(job, scored, device, None), None)
        for scored in score_job(job, device, progress)
    ]


def batch_outputs(adapters: Sequence[Path], output_dir: Path) -> list[Path]:
    """``output_dir/<adapter folder name>`` for each adapter; name collisions are an error."""
    outputs: dict[str, Path] = {}
    for adapter in adapters:
        name = adapter.name
        if name in outputs:
            raise UsageError(
                f"two adapters are named {name!r} ({outputs[name]} and {adapter})",
                "each patched adapter goes to OUTPUT/<folder name>; rename one",
            )
        outputs[name] = adapter
    return [output_dir / a.name for a in adapters]


def _stage(
    job: Job, scored: Scored, out: OutputFolder, report: dict[str, Any], report_file: Path | None
) -> None:
    """Write one patched adapter and its report into the output being staged."""
    adapter = scored.job
    replaced = scored.replaced_factors()
    write_adapter(out, adapter.adapter, replaced, adapter.input.trusted_root, job.notices)
    report["warnings"] = job.notices.as_list()  # with what writing found
    if report_file is None:
        out.write_report(report)
    else:
        out.attach_json(report_file, report)


def _publish_all(folders: list[OutputFolder]) -> None:
    """Publish staged outputs in order; if one cannot be, say which were and discard the rest."""
    for done, folder in enumerate(folders):
        try:
            folder.publish()
        except SafeLoraError as exc:
            for rest in folders[done + 1 :]:
                rest.discard()
            published = ", ".join(f.target.name for f in folders[:done]) or "none"
            skipped = ", ".join(f.target.name for f in folders[done + 1 :]) or "none"
            exc.message += f" (batch: published {published}; not published: {skipped})"
            raise


def patch_many(
    adapters: Sequence[PathLike],
    base: PathLike,
    aligned: PathLike,
    output_dir: PathLike,
    settings: Settings = Settings(),
    *,
    force: bool = False,
    revision: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> list[Result]:
    """Patch several adapters in one pass over the model pair.

    Each patched adapter goes to ``output_dir/<adapter folder name>`` with its own report. Every
    output is staged before any is published: a failure while writing (disk full, an unreadable
    input) publishes none. Publishing is then one rename each; if one fails (another run wrote
    there meanwhile), the error says which were published and which were not.
    """
    job = prepare(adapters, base, aligned, settings, revision, notify)
    output_dir = Path(output_dir)
    outputs = batch_outputs([a.input.path for a in job.adapters], output_dir)
    check_output(output_dir, job.local_inputs(), force=True)  # the parent: may hold other files
    created = not output_dir.exists()
    if not created:
        for output in outputs:
            check_output(output, job.local_inputs(), force)
    device = resolve_device(settings.device)
    scored = score_job(job, device, progress)
    output_dir.mkdir(exist_ok=True)
    folders = [OutputFolder(output, force=force) for output in outputs]
    results = []
    try:
        for adapter_scored, folder in zip(scored, folders, strict=True):
            report = build_report(job, adapter_scored, device, folder.target)
            folder.open()
            _stage(job, adapter_scored, folder, report, None)
            results.append(Result(report, folder.target))
    except BaseException as exc:
        for folder in folders:
            folder.discard()
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        if isinstance(exc, OSError):
            raise output_error(output_dir, exc) from exc
        raise
    _publish_all(folders)
    return results


def patch(
    adapter: PathLike,
    base: PathLike,
    aligned: PathLike,
    output: PathLike,
    settings: Settings = Settings(),
    *,
    force: bool = False,
    report_path: PathLike | None = None,
    revision: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> Result:
    """Patch one adapter: project the selected modules' lora_B and write a new adapter folder.

    Args:
        adapter: the adapter folder.
        base, aligned: the base model and its aligned sibling (folder or ``org/name[@rev]``).
        output: the new folder; refused if it exists and is not empty, unless ``force``.
        settings: selection, projection and device.
        force: replace safelora's files in an existing output folder (others are kept).
        report_path: where to write the report (default ``output/safelora_report.json``).
        revision: hub revision for base and aligned.
        progress: called after each weight.
        notify: called with each notice (also listed in the report's ``warnings``).
    Returns:
        The report and the output folder.
    Example:
        >>> patch("my-lora", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf",
        ...       "my-lora-safe")
    """
    job = prepare([adapter], base, aligned, settings, revision, notify)
    output = Path(output)
    check_output(output, job.local_inputs(), force)
    report_file = Path(report_path) if report_path is not None else None
    if report_file is not None:
        check_report_path(report_file, job.local_inputs(), output, force)
    device = resolve_device(settings.device)
    [scored] = score_job(job, device, progress)
    report = build_report(job, scored, device, output)
    with OutputFolder(output, force=force) as out:
        _stage(job, scored, out, report, report_file)
    return Result(report, output)


def score(
    adapter: PathLike,
    base: PathLike,
    aligned: PathLike,
    settings: Settings = Settings(),
    revision: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> Result:
    """Score one adapter without writing anything. See ``patch`` for the arguments."""
    [result] = score_many([adapter], base, aligned, settings, revision, progress, notify)
    return result

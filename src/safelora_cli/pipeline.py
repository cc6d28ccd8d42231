"""Pipeline: the only place the steps meet. resolve -> index -> pair -> stream -> project ->
select -> write -> report, in one direction.

Several adapters against one model pair share the stream: each base/aligned weight is read once
and V is applied to every adapter that targets it.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safelora_cli import report as reporting
from safelora_cli.adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter, load_adapter
from safelora_cli.errors import CorruptFileError, NumericalError, UsageError
from safelora_cli.index import PICKLE_SUFFIXES, TensorIndex, TensorInfo, index_folder
from safelora_cli.loader import TORCH_DTYPES, TensorReader
from safelora_cli.pairing import ModulePair, pair_modules
from safelora_cli.projection import (
    PAPER,
    SUBSPACE,
    ModuleScore,
    ProjectionSpec,
    score_module,
)
from safelora_cli.resolve import ResolvedInput, resolve
from safelora_cli.select import (
    DEFAULT_NUM_LAYERS,
    DEFAULT_THRESHOLD,
    check_selection,
    select_modules,
)
from safelora_cli.stream import alignment_stream
from safelora_cli.writer import (
    cast_checked,
    check_output,
    check_report_path,
    staged_output,
    write_adapter_weights,
    write_json,
)

ProgressFn = Callable[[int, int, str], None]
"""Called as ``progress(done, total, weight)`` after each base/aligned weight is processed."""
PathLike = str | Path


@dataclass(frozen=True)
class Settings:
    """What to compute: selection, projection and device. Defaults follow the official code."""

    select: str = "number"
    num_layers: int = DEFAULT_NUM_LAYERS
    threshold: float = DEFAULT_THRESHOLD
    projection: str = PAPER
    rank: int | None = None
    energy: float | None = None
    device: str = "auto"
    adapter_name: str | None = None

    def projection_spec(self) -> ProjectionSpec:
        """The projector, validated: subspace needs exactly one of rank and energy."""
        if self.projection == PAPER:
            if self.rank is not None or self.energy is not None:
                raise UsageError("--rank/--energy apply to --projection subspace only")
            return ProjectionSpec()
        if self.projection != SUBSPACE:
            raise UsageError(f"--projection {self.projection!r} is not 'paper' or 'subspace'")
        if (self.rank is None) == (self.energy is None):
            raise UsageError("--projection subspace needs one of --rank K or --energy E")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--rank {self.rank} must be at least 1")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise UsageError(f"--energy {self.energy} must be in (0, 1]")
        return ProjectionSpec(SUBSPACE, self.rank, self.energy)


@dataclass(frozen=True)
class AdapterJob:
    """One adapter, validated and paired against the model pair."""

    input: ResolvedInput
    adapter: Adapter
    pairs: list[ModulePair]


@dataclass(frozen=True)
class Job:
    """Everything validated before the heavy read: inputs, indexes and module pairs."""

    base_input: ResolvedInput
    aligned_input: ResolvedInput
    base: TensorIndex
    aligned: TensorIndex
    adapters: list[AdapterJob]
    spec: ProjectionSpec = field(default_factory=ProjectionSpec)

    def local_inputs(self) -> list[Path]:
        return [self.base_input.path, self.aligned_input.path] + [
            a.input.path for a in self.adapters
        ]


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
) -> Job:
    """Resolve, index and pair every input; validate settings. Reads headers only.

    Every adapter is validated before anything heavy is read: one bad adapter stops the run,
    named in the error.
    """
    if not adapters:
        raise UsageError("no ADAPTER given")
    spec = settings.projection_spec()
    loaded = []
    for ref in adapters:
        adapter_input = resolve(str(ref), revision=None, role="ADAPTER")
        adapter = load_adapter(adapter_input.path, settings.adapter_name)
        check_selection(
            settings.select, settings.num_layers, settings.threshold, len(adapter.modules)
        )
        loaded.append((adapter_input, adapter))
    base_input = resolve(str(base), revision, role="--base")
    aligned_input = resolve(str(aligned), revision, role="--aligned")
    base_index, aligned_index = index_folder(base_input.path), index_folder(aligned_input.path)
    jobs = [AdapterJob(i, a, pair_modules(a, base_index, aligned_index)) for i, a in loaded]
    return Job(base_input, aligned_input, base_index, aligned_index, jobs, spec)


def _weight_groups(job: Job) -> list[list[tuple[int, ModulePair]]]:
    """Pairs grouped by base weight (each group needs one V), in shard/offset order."""
    groups: dict[str, list[tuple[int, ModulePair]]] = {}
    for k, adapter_job in enumerate(job.adapters):
        for pair in adapter_job.pairs:
            groups.setdefault(pair.base.name, []).append((k, pair))
    return sorted(groups.values(), key=lambda g: (str(g[0][1].base.path), g[0][1].base.offset))


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
    with torch.inference_mode(), TensorReader() as adapter_reader:
        for done, (group, (_, v, v_norm)) in enumerate(
            zip(groups, alignment_stream(leaders, device), strict=True), start=1
        ):
            for k, pair in group:
                a = _read_factor(adapter_reader, pair.lora.a, device)
                b = _read_factor(adapter_reader, pair.lora.b, device)
                score = score_module(v.T if pair.transpose else v, a, b, job.spec, v_norm)
                if not math.isfinite(score.v_norm):
                    raise _non_finite_weight(pair)
                scores[k][pair.name] = score
            del v
            if progress is not None:
                progress(done, len(groups), group[0][1].base.name)
    return scores


def _select(scores: dict[str, ModuleScore], settings: Settings) -> tuple[set[str], float | None]:
    cosines = {name: s.cosine for name, s in scores.items() if s.cosine is not None}
    return select_modules(cosines, settings.select, settings.num_layers, settings.threshold)


def _score_job(
    job: Job, settings: Settings, progress: ProgressFn | None, outputs: Sequence[Path | None]
) -> list[tuple[dict[str, Any], set[str], dict[str, ModuleScore]]]:
    device = resolve_device(settings.device)
    results = []
    for adapter_job, scores, output in zip(
        job.adapters, compute_scores(job, device, progress), outputs, strict=True
    ):
        selected, used = _select(scores, settings)
        report = reporting.build(job, adapter_job, settings, device, scores, selected, used, output)
        results.append((report, selected, scores))
    return results


def score_many(
    adapters: Sequence[PathLike],
    base: PathLike,
    aligned: PathLike,
    settings: Settings = Settings(),
    revision: str | None = None,
    progress: ProgressFn | None = None,
) -> list[Result]:
    """Score several adapters against one model pair (each weight read once); writes nothing."""
    job = prepare(adapters, base, aligned, settings, revision)
    outputs = [None] * len(job.adapters)
    return [Result(report, None) for report, _, _ in _score_job(job, settings, progress, outputs)]


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
) -> list[Result]:
    """Patch several adapters in one pass over the model pair.

    Each patched adapter goes to ``output_dir/<adapter folder name>`` with its own report.
    """
    job = prepare(adapters, base, aligned, settings, revision)
    output_dir = Path(output_dir)
    outputs = batch_outputs([a.input.path for a in job.adapters], output_dir)
    check_output(output_dir, job.local_inputs(), force=True)  # the parent: may hold other files
    created = not output_dir.exists()
    if not created:
        for output in outputs:
            check_output(output, job.local_inputs(), force)
    scored = _score_job(job, settings, progress, outputs)
    output_dir.mkdir(exist_ok=True)
    results = []
    try:
        for adapter_job, (report, selected, scores), output in zip(
            job.adapters, scored, outputs, strict=True
        ):
            _write(adapter_job, report, selected, scores, output, None)
            results.append(Result(report, output))
    except BaseException:
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
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
    Returns:
        The report and the output folder.
    Example:
        >>> patch("my-lora", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf",
        ...       "my-lora-safe")
    """
    job = prepare([adapter], base, aligned, settings, revision)
    output = Path(output)
    check_output(output, job.local_inputs(), force)
    report_file = Path(report_path) if report_path is not None else None
    if report_file is not None:
        check_report_path(report_file, job.local_inputs())
    [(report, selected, scores)] = _score_job(job, settings, progress, [output])
    _write(job.adapters[0], report, selected, scores, output, report_file)
    return Result(report, output)


def score(
    adapter: PathLike,
    base: PathLike,
    aligned: PathLike,
    settings: Settings = Settings(),
    revision: str | None = None,
    progress: ProgressFn | None = None,
) -> Result:
    """Score one adapter without writing anything. See ``patch`` for the arguments."""
    [result] = score_many([adapter], base, aligned, settings, revision, progress)
    return result


def _write(
    adapter_job: AdapterJob,
    report: dict[str, Any],
    selected: set[str],
    scores: dict[str, ModuleScore],
    output: Path,
    report_file: Path | None,
) -> None:
    adapter = adapter_job.adapter
    replaced = {}
    for pair in adapter_job.pairs:
        projected = scores[pair.name].projected_b
        if pair.name in selected and projected is not None:
            info = pair.lora.b
            replaced[info.name] = cast_checked(info.name, projected, TORCH_DTYPES[info.dtype])
    with staged_output(output) as stage:
        with TensorReader() as reader:
            tensors = {
                name: replaced[name] if name in replaced else reader.read(info)
                for name, info in adapter.weights.tensors.items()
            }
            write_adapter_weights(stage / WEIGHTS_NAME, tensors, adapter.weights.metadata)
        for src in sorted(adapter.root.iterdir()):
            # pickled weights would be stale, unpatched copies that some loaders prefer
            skip = (
                src.name in (WEIGHTS_NAME, reporting.REPORT_NAME) or src.suffix in PICKLE_SUFFIXES
            )
            if src.is_file() and not skip:
                shutil.copyfile(src, stage / src.name)
        if not (stage / CONFIG_NAME).is_file():
            raise CorruptFileError(f"{adapter.root / CONFIG_NAME}: removed during the run")
        if report_file is None:
            write_json(stage / reporting.REPORT_NAME, report)
    if report_file is not None:
        write_json(report_file, report)

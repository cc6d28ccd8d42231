"""Pipeline: the only place the steps meet. resolve -> index -> pair -> stream -> project ->
select -> write -> report, in one direction.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli import report as reporting
from safelora_cli.adapter import WEIGHTS_NAME, Adapter, load_adapter
from safelora_cli.errors import NumericalError, UsageError
from safelora_cli.index import TensorIndex, TensorInfo, index_folder
from safelora_cli.loader import TORCH_DTYPES, TensorReader
from safelora_cli.pairing import ModulePair, pair_modules
from safelora_cli.projection import ModuleScore, alignment_matrix, score_module
from safelora_cli.resolve import ResolvedInput, resolve
from safelora_cli.select import (
    DEFAULT_NUM_LAYERS,
    DEFAULT_THRESHOLD,
    check_selection,
    select_modules,
)
from safelora_cli.writer import (
    cast_checked,
    check_output,
    check_report_path,
    staged_output,
    write_adapter_weights,
    write_json,
)

ProgressFn = Callable[[int, int, str], None]
"""Called as ``progress(done, total, module)`` after each module is scored."""


@dataclass(frozen=True)
class Settings:
    """What to compute: selection, projection and device. Defaults follow the official code."""

    select: str = "number"
    num_layers: int = DEFAULT_NUM_LAYERS
    threshold: float = DEFAULT_THRESHOLD
    projection: str = "paper"
    device: str = "auto"
    adapter_name: str | None = None


@dataclass(frozen=True)
class Job:
    """Everything validated before the heavy read: inputs, indexes and module pairs."""

    adapter_input: ResolvedInput
    base_input: ResolvedInput
    aligned_input: ResolvedInput
    adapter: Adapter
    base: TensorIndex
    aligned: TensorIndex
    pairs: list[ModulePair]


@dataclass(frozen=True)
class Result:
    """A finished run: the report, and the output folder (None for ``score``)."""

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
            f"--device {spec!r} is not a device", "use auto, cpu, cuda or cuda:N"
        ) from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UsageError(
                f"--device {spec}: no such CUDA device ({count} found)", "use --device cpu"
            )
    elif device.type != "cpu":
        raise UsageError(f"--device {spec!r} is not supported", "use auto, cpu, cuda or cuda:N")
    return device


def prepare(
    adapter_ref: str,
    base_ref: str,
    aligned_ref: str,
    settings: Settings,
    revision: str | None = None,
) -> Job:
    """Resolve, index and pair every input; validate settings. Reads headers only.

    Raises:
        SafeLoraError: any problem with the inputs or settings, before any heavy read.
    """
    if settings.projection != "paper":
        raise UsageError(f"--projection {settings.projection!r} is not supported (use 'paper')")
    adapter_input = resolve(adapter_ref, revision=None, role="ADAPTER")
    adapter = load_adapter(adapter_input.path, settings.adapter_name)
    check_selection(settings.select, settings.num_layers, settings.threshold, len(adapter.modules))
    base_input = resolve(base_ref, revision, role="--base")
    aligned_input = resolve(aligned_ref, revision, role="--aligned")
    base, aligned = index_folder(base_input.path), index_folder(aligned_input.path)
    pairs = pair_modules(adapter, base, aligned)
    return Job(adapter_input, base_input, aligned_input, adapter, base, aligned, pairs)


def _alignment_stream(
    pairs: list[ModulePair], device: torch.device
) -> Iterator[tuple[ModulePair, torch.Tensor]]:
    """Yield (pair, V) in order, reading the next module while the caller computes this one."""

    def load(pair: ModulePair) -> torch.Tensor:
        with torch.inference_mode():
            w_base, w_aligned = reader.read(pair.base), reader.read(pair.aligned)
            if device.type == "cuda":
                w_base, w_aligned = w_base.pin_memory(), w_aligned.pin_memory()
            return alignment_matrix(w_base, w_aligned, device, pair.transpose)

    with TensorReader() as reader, ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        pending: Future[torch.Tensor] | None = pool.submit(load, pairs[0]) if pairs else None
        for i, pair in enumerate(pairs):
            assert pending is not None
            v = pending.result()
            pending = pool.submit(load, pairs[i + 1]) if i + 1 < len(pairs) else None
            try:
                yield pair, v
            except GeneratorExit:
                if pending is not None:
                    pending.cancel()
                raise


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
) -> dict[str, ModuleScore]:
    """Stream every module once and score it. Memory: about two modules' weights at a time."""
    scores: dict[str, ModuleScore] = {}
    with torch.inference_mode(), TensorReader() as adapter_reader:
        for done, (pair, v) in enumerate(_alignment_stream(job.pairs, device), start=1):
            a = _read_factor(adapter_reader, pair.lora.a, device)
            b = _read_factor(adapter_reader, pair.lora.b, device)
            score = score_module(v, a, b)
            del v
            if not math.isfinite(score.v_norm):
                raise _non_finite_weight(pair)
            scores[pair.name] = score
            if progress is not None:
                progress(done, len(job.pairs), pair.name)
    return scores


def run_score(
    adapter: str,
    base: str,
    aligned: str,
    settings: Settings = Settings(),
    revision: str | None = None,
    progress: ProgressFn | None = None,
) -> Result:
    """Score an adapter without writing anything. See ``run_patch`` for the arguments."""
    job = prepare(adapter, base, aligned, settings, revision)
    device = resolve_device(settings.device)
    scores = compute_scores(job, device, progress)
    selected, used = _select(scores, settings)
    return Result(reporting.build(job, settings, device, scores, selected, used, None), None)


def _select(scores: dict[str, ModuleScore], settings: Settings) -> tuple[set[str], float | None]:
    cosines = {name: s.cosine for name, s in scores.items() if s.cosine is not None}
    return select_modules(cosines, settings.select, settings.num_layers, settings.threshold)


def run_patch(
    adapter: str,
    base: str,
    aligned: str,
    output: Path,
    settings: Settings = Settings(),
    *,
    force: bool = False,
    report_path: Path | None = None,
    revision: str | None = None,
    progress: ProgressFn | None = None,
) -> Result:
    """Patch an adapter: project the selected modules' lora_B and write a new adapter folder.

    Args:
        adapter: the adapter folder (or hub id).
        base, aligned: the base model and its aligned sibling (folder or ``org/name[@rev]``).
        output: the new folder; refused if it exists and is not empty, unless ``force``.
        settings: selection, projection and device.
        force: replace safelora's files in an existing output folder (others are kept).
        report_path: where to write the report (default ``output/safelora_report.json``).
        revision: hub revision for base and aligned.
        progress: called after each module.
    Returns:
        The report and the output folder.
    Example:
        >>> run_patch("my-lora", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf",
        ...           Path("my-lora-safe"))
    """
    job = prepare(adapter, base, aligned, settings, revision)
    inputs = [i.path for i in (job.adapter_input, job.base_input, job.aligned_input)]
    check_output(output, inputs, force)
    if report_path is not None:
        check_report_path(report_path, inputs)
    device = resolve_device(settings.device)
    scores = compute_scores(job, device, progress)
    selected, used = _select(scores, settings)
    report = reporting.build(job, settings, device, scores, selected, used, output)
    with staged_output(output) as stage:
        _write_adapter(job, scores, selected, stage)
        if report_path is None:
            write_json(stage / reporting.REPORT_NAME, report)
    if report_path is not None:
        write_json(report_path, report)
    return Result(report, output)


def _write_adapter(
    job: Job, scores: dict[str, ModuleScore], selected: set[str], stage: Path
) -> None:
    replaced = {}
    for pair in job.pairs:
        projected = scores[pair.name].projected_b
        if pair.name in selected and projected is not None:
            info = pair.lora.b
            replaced[info.name] = cast_checked(info.name, projected, TORCH_DTYPES[info.dtype])
    with TensorReader() as reader:
        tensors = {
            name: replaced[name] if name in replaced else reader.read(info)
            for name, info in job.adapter.weights.tensors.items()
        }
        write_adapter_weights(stage / WEIGHTS_NAME, tensors, job.adapter.weights.metadata)
    for src in sorted(job.adapter.root.iterdir()):
        if src.is_file() and src.name not in (WEIGHTS_NAME, reporting.REPORT_NAME):
            shutil.copyfile(src, stage / src.name)

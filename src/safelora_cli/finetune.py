"""Full fine-tunes through the pipeline: prepare, score, write.

A full fine-tune of the aligned model is patched like an adapter with D = W_ft − W_aligned in
place of B A (``full.py``): one streamed pass scores every targeted weight (V and D side by side,
each from its own ``stream.alignment_stream``), the selection picks the weights to project, and
a second pass over the selected weights only writes W_aligned + P D into a copy of the fine-tune's
shards (``shards.ShardWriter``): every other tensor, the shard layout, the index and the sidecar
files stay the fine-tune's, byte for byte. Memory is O(one weight) whatever the model size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli import report as reporting
from safelora_cli.errors import IncompatibleInputError, NumericalError, UsageError
from safelora_cli.full import merged_weight, score_delta
from safelora_cli.full_targets import (
    FullPair,
    Targets,
    model_problems,
    pair_full_weights,
    select_targets,
)
from safelora_cli.index import FLOAT_DTYPES, TensorIndex, TensorInfo, index_folder
from safelora_cli.job import PathLike, check_inputs_pair
from safelora_cli.loader import TORCH_DTYPES, TensorReader
from safelora_cli.notices import Notices, NotifyFn
from safelora_cli.pairing import MODEL_CONFIG
from safelora_cli.projection import ModuleScore, alignment_matrix
from safelora_cli.provenance import check_adapter, check_scores, refuse
from safelora_cli.resolve import ResolvedInput, resolve
from safelora_cli.scoring import ProgressFn
from safelora_cli.selection import select_modules
from safelora_cli.settings import Settings
from safelora_cli.shards import ShardWriter
from safelora_cli.smallfiles import load_json
from safelora_cli.stream import alignment_stream
from safelora_cli.writer import OutputFolder

KIND = "full"


@dataclass(frozen=True)
class FullJob:
    """A full fine-tune, validated and paired against the aligned and base models."""

    model_input: ResolvedInput
    base_input: ResolvedInput
    aligned_input: ResolvedInput
    model: TensorIndex
    pairs: list[FullPair]
    settings: Settings
    notices: Notices

    def local_inputs(self) -> list[Path]:
        return [self.model_input.path, self.base_input.path, self.aligned_input.path]


@dataclass(frozen=True)
class FullScored:
    """The scores of every targeted weight, and the selection."""

    scores: dict[str, ModuleScore]
    selected: set[str]
    threshold_used: float | None


@dataclass(frozen=True)
class _Delta:
    """(W_aligned, W_ft) as a ``stream.Difference``: the stream then yields D."""

    base: TensorInfo
    aligned: TensorInfo


def prepare_full(
    model: PathLike,
    base: PathLike,
    aligned: PathLike,
    settings: Settings,
    revision: str | None = None,
    notify: NotifyFn | None = None,
) -> FullJob:
    """Resolve, index, check and pair a full fine-tune; headers only."""
    notices = Notices(notify)
    model_input = resolve(str(model), None, role="FT_MODEL", notices=notices)
    base_input = resolve(str(base), revision, role="--base", notices=notices)
    aligned_input = resolve(str(aligned), revision, role="--aligned", notices=notices)
    check_inputs_pair(base_input, aligned_input, notices)
    config = _config(model_input.path)
    for finding in check_adapter(config, base_input.describe(), aligned_input.describe()):
        notices.add(finding.code, finding.message, values=finding.values)
    model_index = index_folder(model_input.path)
    model_type = config.get("model_type")
    pairs = pair_full_weights(
        model_index,
        index_folder(aligned_input.path),
        index_folder(base_input.path),
        Targets.parse(settings.targets) if settings.targets else Targets(),
        model_type if isinstance(model_type, str) else None,
    )
    settings.check_modules(len(pairs))
    return FullJob(model_input, base_input, aligned_input, model_index, pairs, settings, notices)


def _base(pair: FullPair) -> TensorInfo:
    assert pair.base is not None  # paired against a base model (a profile would leave it None)
    return pair.base


def _config(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_CONFIG
    return load_json(path, "model config") if path.exists() else {}


def _checked(score: ModuleScore, pair: FullPair, d_norm: float) -> ModuleScore:
    if not (math.isfinite(score.v_norm) and math.isfinite(d_norm)):
        infos = [i for i in (pair.base, pair.aligned, pair.ft) if i is not None]
        raise NumericalError(
            f"{pair.name}: NaN or Inf in {', '.join(str(i.path) for i in infos)}",
            "a checkpoint is damaged; fetch it again",
        )
    return score


def score_full(
    job: FullJob, device: torch.device, progress: ProgressFn | None = None
) -> FullScored:
    """Score every targeted weight in one streamed pass, then select."""
    spec = job.settings.projection_spec
    alignment = [_Delta(_base(pair), pair.aligned) for pair in job.pairs]
    deltas = [_Delta(pair.aligned, pair.ft) for pair in job.pairs]
    total = sum(2 * (p.aligned.nbytes + p.ft.nbytes) for p in job.pairs)
    done, scores = 0, {}
    with torch.inference_mode():
        for pair, (_, v, v_norm), (_, d, d_norm) in zip(
            job.pairs,
            alignment_stream(alignment, device),
            alignment_stream(deltas, device),
            strict=True,
        ):
            v, d = (v.T, d.T) if pair.transpose else (v, d)
            score, _ = score_delta(v, d, spec, v_norm, d_norm)
            scores[pair.module] = _checked(score, pair, d_norm)
            done += 2 * (pair.aligned.nbytes + pair.ft.nbytes)
            if progress is not None:
                progress(done, total, pair.name)
    settings = job.settings
    cosines = {name: s.cosine for name, s in scores.items() if s.cosine is not None}
    selected, used = select_modules(
        cosines, settings.select, settings.num_layers, settings.threshold
    )
    return FullScored(scores, selected, used)


def write_full(job: FullJob, scored: FullScored, out: OutputFolder, device: torch.device) -> None:
    """Write the patched model into ``out``: W_aligned + P D for the selected weights (a second
    pass over them only), every other tensor and file as the fine-tune's."""
    spec = job.settings.projection_spec
    chosen = [pair for pair in job.pairs if pair.module in scored.selected]
    with torch.inference_mode(), TensorReader() as reader:
        with ShardWriter(job.model, out.path) as writer:
            for pair in chosen:
                w_base, w_aligned = reader.read(_base(pair)), reader.read(pair.aligned)
                v = alignment_matrix(w_base, w_aligned, device)
                d = alignment_matrix(w_aligned, reader.read(pair.ft), device)
                v, d = (v.T, d.T) if pair.transpose else (v, d)
                _, pd = score_delta(v, d, spec)
                assert pd is not None  # selected, so scored: neither V nor D is zero
                update = pd.T if pair.transpose else pd
                dtype = TORCH_DTYPES[pair.ft.dtype]
                writer.replace(pair.ft, merged_weight(w_aligned, update, dtype, pair.name))
            writer.finalize()


def full_report(
    job: FullJob, scored: FullScored, device: torch.device, output: Path | None
) -> dict[str, Any]:
    """The report of a full fine-tune's run (``"kind": "full"``)."""
    records = []
    for pair in job.pairs:
        score = scored.scores[pair.module]
        out_dim, in_dim = pair.ft.shape[-2:]
        records.append(
            reporting.record(
                score,
                module=pair.module,
                weight=pair.name,
                shape=(in_dim, out_dim) if pair.transpose else (out_dim, in_dim),
                rank=None,
                transposed=pair.transpose,
            )
        )
    report = reporting.build(
        kind=KIND,
        settings=job.settings.describe(str(device)),
        inputs={
            "base": job.base_input.describe(),
            "aligned": job.aligned_input.describe(),
            "model": job.model_input.describe(),
        },
        records=records,
        selected=scored.selected,
        threshold_used=scored.threshold_used,
        passthrough=[],
        output=str(output) if output is not None else None,
        warnings=[],
    )
    findings = check_scores(report)
    refuse(findings)
    for finding in findings:
        job.notices.add(finding.code, finding.message, values=finding.values)
    report["warnings"] = job.notices.as_list()
    return report


def check_full_settings(settings: Settings, merge: bool) -> None:
    """Options that mean nothing for a full fine-tune."""
    if merge:
        raise UsageError(
            "--merge applies to adapters; a full fine-tune is written as a full model already"
        )
    if settings.adapter_name is not None:
        raise UsageError("--adapter-name applies to adapters, not to a full fine-tune")


def inspect_full(model: PathLike, aligned: PathLike, revision: str | None = None) -> dict[str, Any]:
    """Which weights a full fine-tune changed, and by how much: ‖D‖ / ‖W_aligned‖ per tensor.

    Reads both models once (streamed); the fine-tune must be of this aligned model (same names
    and shapes, exit 4 otherwise). JSON-ready: ``inputs``, ``tensors`` (the changed ones first,
    most changed first) and ``summary``.
    """
    model_input = resolve(str(model), None, role="FT_MODEL")
    aligned_input = resolve(str(aligned), revision, role="--aligned")
    ft, reference = index_folder(model_input.path), index_folder(aligned_input.path)
    problems = model_problems(ft, reference)
    if problems:
        raise IncompatibleInputError(
            "; ".join(problems), "check that --aligned is the model this one was fine-tuned from"
        )
    shapes = {name: info.shape for name, info in ft.tensors.items()}
    try:
        targeted = set(select_targets(shapes))  # what `patch` targets by default
    except UsageError:  # no repeated blocks: nothing by default
        targeted = set()
    diffs = sorted(
        (
            _Delta(reference.tensors[name], info)
            for name, info in ft.tensors.items()
            if info.dtype in FLOAT_DTYPES and reference.tensors[name].dtype in FLOAT_DTYPES
        ),
        key=lambda diff: diff.aligned.location,
    )
    matrices = [diff for diff in diffs if len(diff.aligned.shape) == 2]
    entries: list[dict[str, Any]] = []
    with torch.inference_mode(), TensorReader() as reader:

        def entry(diff: _Delta, d_norm: float) -> dict[str, Any]:
            w_norm = float(torch.linalg.vector_norm(reader.read(diff.base).float()))
            return {
                "tensor": diff.aligned.name,
                "shape": list(diff.aligned.shape),
                "dtype": diff.aligned.dtype,
                "d_norm": d_norm,
                "w_norm": w_norm,
                "relative": d_norm / w_norm if w_norm else None,
                "changed": d_norm != 0.0,
                "targeted": diff.aligned.name in targeted,
            }

        for diff, _, d_norm in alignment_stream(matrices, torch.device("cpu")):
            entries.append(entry(diff, d_norm))
        for diff in diffs:  # vectors (norms, biases): small, read whole
            if len(diff.aligned.shape) != 2:
                delta = reader.read(diff.aligned).float() - reader.read(diff.base).float()
                entries.append(entry(diff, float(torch.linalg.vector_norm(delta))))
    entries.sort(key=lambda e: (not e["changed"], -(e["relative"] or 0.0), e["tensor"]))
    changed = [e for e in entries if e["changed"]]
    return {
        "schema_version": reporting.SCHEMA_VERSION,
        "kind": KIND,
        "inputs": {"model": model_input.describe(), "aligned": aligned_input.describe()},
        "tensors": entries,
        "summary": {
            "tensors": len(entries),
            "changed": len(changed),
            "targeted_changed": sum(e["targeted"] for e in changed),
            "max_relative": max((e["relative"] or 0.0 for e in changed), default=None),
        },
    }

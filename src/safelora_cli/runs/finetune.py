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

from safelora_cli.errors import IncompatibleInputError, NumericalError, UsageError
from safelora_cli.inputs.full_targets import (
    FullPair,
    Targets,
    model_problems,
    pair_full_weights,
    select_targets,
)
from safelora_cli.inputs.index import FLOAT_DTYPES, TensorIndex, TensorInfo, index_folder
from safelora_cli.inputs.loader import TORCH_DTYPES, TensorReader
from safelora_cli.inputs.pairing import MODEL_CONFIG
from safelora_cli.inputs.provenance import check_adapter, check_profile_pair, check_scores, refuse
from safelora_cli.inputs.resolve import ResolvedInput, resolve, resolve_profile
from safelora_cli.inputs.smallfiles import load_json
from safelora_cli.math.delta import Factored
from safelora_cli.math.full import merged_weight, score_delta
from safelora_cli.math.lowrank_score import score_delta_entry
from safelora_cli.math.projection import ModuleScore, alignment_matrix
from safelora_cli.math.selection import select_modules
from safelora_cli.notices import Notices, NotifyFn
from safelora_cli.output import report as reporting
from safelora_cli.output.shards import ShardWriter
from safelora_cli.output.writer import OutputFolder
from safelora_cli.runs.job import PathLike, check_inputs_pair
from safelora_cli.runs.profiled import boundary_check
from safelora_cli.runs.scoring import ProgressFn
from safelora_cli.settings import Settings
from safelora_cli.sources.profile import ProfileInfo, load_entry, read_profile
from safelora_cli.sources.profile import check_adapter as check_profile_covers
from safelora_cli.sources.profile_summary import provenance as profile_record
from safelora_cli.sources.stream import alignment_stream

KIND = "full"


@dataclass(frozen=True)
class FullJob:
    """A full fine-tune, validated and paired against the aligned model, and against the base
    model or an alignment profile (``profile``; ``base_input`` is then None)."""

    model_input: ResolvedInput
    base_input: ResolvedInput | None
    aligned_input: ResolvedInput
    model: TensorIndex
    pairs: list[FullPair]
    settings: Settings
    notices: Notices
    profile_input: ResolvedInput | None = None
    profile: ProfileInfo | None = None

    def local_inputs(self) -> list[Path]:
        inputs = [self.model_input, self.base_input, self.aligned_input, self.profile_input]
        return [i.path for i in inputs if i is not None]


@dataclass(frozen=True)
class FullScored:
    """The scores of every targeted weight, and the selection."""

    scores: dict[str, ModuleScore]
    selected: set[str]
    threshold_used: float | None
    uncertain: frozenset[str] = frozenset()  # through a profile: left open by the bounds


@dataclass(frozen=True)
class _Delta:
    """(W_aligned, W_ft) as a ``stream.Difference``: the stream then yields D."""

    base: TensorInfo
    aligned: TensorInfo


def prepare_full(
    model: PathLike,
    base: PathLike | None,
    aligned: PathLike,
    settings: Settings,
    revision: str | None = None,
    notify: NotifyFn | None = None,
    profile: PathLike | None = None,
) -> FullJob:
    """Resolve, index, check and pair a full fine-tune; headers only. With ``profile``, V comes
    from the profile (``base`` is then None) and only D reads the aligned weights."""
    notices = Notices(notify)
    model_input = resolve(str(model), None, role="FT_MODEL", notices=notices)
    aligned_input = resolve(str(aligned), revision, role="--aligned", notices=notices)
    base_input, profile_input, info = None, None, None
    if profile is None:
        assert base is not None
        base_input = resolve(str(base), revision, role="--base", notices=notices)
        check_inputs_pair(base_input, aligned_input, notices)
        base_entry = base_input.describe()
    else:
        profile_input = resolve_profile(str(profile), revision, notices)
        info = read_profile(profile_input.path)
        base_entry = info.inputs.get("base") or {}
        recorded = info.inputs.get("aligned") or {}
        for finding in check_profile_pair(recorded, aligned_input.describe()):
            notices.add(finding.code, finding.message, values=finding.values)
    config = _config(model_input.path)
    for finding in check_adapter(config, base_entry, aligned_input.describe()):
        notices.add(finding.code, finding.message, values=finding.values)
    model_index = index_folder(model_input.path)
    model_type = config.get("model_type")
    pairs = pair_full_weights(
        model_index,
        index_folder(aligned_input.path),
        index_folder(base_input.path) if base_input is not None else None,
        Targets.parse(settings.targets) if settings.targets else Targets(),
        model_type if isinstance(model_type, str) else None,
    )
    if info is not None:
        shapes = {p.name: _module_shape(p) for p in pairs}
        check_profile_covers(info, shapes, {p.name for p in pairs if p.transpose})
    settings.check_modules(len(pairs))
    return FullJob(model_input, base_input, aligned_input, model_index, pairs, settings, notices,
                   profile_input, info)  # fmt: skip


def _module_shape(pair: FullPair) -> tuple[int, int]:
    out_dim, in_dim = pair.ft.shape[-2:]
    return (in_dim, out_dim) if pair.transpose else (out_dim, in_dim)


def _project(
    job: FullJob,
    pair: FullPair,
    d: torch.Tensor,
    d_norm: float | None,
    v: torch.Tensor | None,
    v_norm: float | None,
    reader: TensorReader,
) -> tuple[ModuleScore, Factored | None]:
    """P D and its score for one weight, D (and V) in the module's orientation: from V, or from
    the weight's profile entry."""
    spec = job.settings.projection_spec
    if job.profile is None:
        assert v is not None
        return score_delta(v, d, spec, v_norm, d_norm)
    entry = load_entry(job.profile, pair.name, reader)
    return score_delta_entry(entry, d.to(torch.float32), spec, d_norm, pair.module)


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
    """Score every targeted weight in one streamed pass (V beside D, or V's profile entry),
    then select."""
    deltas = [_Delta(pair.aligned, pair.ft) for pair in job.pairs]
    alignment = (
        alignment_stream([_Delta(_base(pair), pair.aligned) for pair in job.pairs], device)
        if job.profile is None
        else None
    )
    reads = 1 if job.profile is not None else 2  # D only, or V too
    total = sum(reads * (p.aligned.nbytes + p.ft.nbytes) for p in job.pairs)
    done, scores = 0, {}
    with torch.inference_mode(), TensorReader() as reader:
        for pair, (_, d, d_norm) in zip(job.pairs, alignment_stream(deltas, device), strict=True):
            v, v_norm = None, None
            if alignment is not None:
                _, v, v_norm = next(alignment)
                v = v.T if pair.transpose else v
            d = d.T if pair.transpose else d
            score, _ = _project(job, pair, d, d_norm, v, v_norm, reader)
            scores[pair.module] = _checked(score, pair, d_norm)
            done += reads * (pair.aligned.nbytes + pair.ft.nbytes)
            if progress is not None:
                progress(done, total, pair.name)
    settings = job.settings
    cosines = {name: s.cosine for name, s in scores.items() if s.cosine is not None}
    selected, used = select_modules(
        cosines, settings.select, settings.num_layers, settings.threshold
    )
    uncertain = frozenset[str]()
    if job.profile is not None:
        uncertain = boundary_check(settings, scores, selected, job.notices)
    return FullScored(scores, selected, used, uncertain)


def write_full(job: FullJob, scored: FullScored, out: OutputFolder, device: torch.device) -> None:
    """Write the patched model into ``out``: W_aligned + P D for the selected weights (a second
    pass over them only), every other tensor and file as the fine-tune's."""
    chosen = [pair for pair in job.pairs if pair.module in scored.selected]
    with torch.inference_mode(), TensorReader() as reader:
        with ShardWriter(job.model, out.path) as writer:
            for pair in chosen:
                w_aligned = reader.read(pair.aligned)
                d = alignment_matrix(w_aligned, reader.read(pair.ft), device)
                v = None
                if job.profile is None:
                    v = alignment_matrix(reader.read(_base(pair)), w_aligned, device)
                    v = v.T if pair.transpose else v
                _, pd = _project(job, pair, d.T if pair.transpose else d, None, v, None, reader)
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
                uncertain=pair.module in scored.uncertain,
            )
        )
    report = reporting.build(
        kind=KIND,
        settings=job.settings.describe(str(device)),
        inputs=_inputs(job),
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


def _inputs(job: FullJob) -> dict[str, Any]:
    inputs: dict[str, Any] = {"aligned": job.aligned_input.describe()}
    if job.profile is not None and job.profile_input is not None:
        inputs["base"] = job.profile.inputs.get("base")
        inputs["profile"] = {**profile_record(job.profile), "ref": job.profile_input.ref,
                             "hub_id": job.profile_input.hub_id,
                             "revision": job.profile_input.revision,
                             "commit": job.profile_input.commit}  # fmt: skip
    elif job.base_input is not None:
        inputs["base"] = job.base_input.describe()
    return {**inputs, "model": job.model_input.describe()}


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

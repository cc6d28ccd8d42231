"""A full fine-tune as the update kind: D = W_ft − W_aligned in place of B A.

One streamed pass scores every targeted weight (D from its own ``stream.alignment_stream``,
beside the source's alignment of the same weight), with the kernel for the alignment's form
(``score_weight``: ``full.score_delta`` on V, ``lowrank_score.score_delta_entry`` on a profile
entry); the selection picks the weights to project, and a second pass over the selected weights
only writes W_aligned + P D into a copy of the fine-tune's shards (``shards.ShardWriter``): every
other tensor, the shard layout, the index and the sidecar files stay the fine-tune's, byte for
byte. Memory is O(one weight) whatever the model size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli.errors import NumericalError, UsageError
from safelora_cli.inputs.full_targets import FullPair, Targets
from safelora_cli.inputs.index import TensorIndex, TensorInfo, index_folder
from safelora_cli.inputs.loader import TORCH_DTYPES, TensorReader
from safelora_cli.inputs.pairing import MODEL_CONFIG
from safelora_cli.inputs.provenance import check_adapter
from safelora_cli.inputs.resolve import ResolvedInput, resolve
from safelora_cli.inputs.smallfiles import load_json
from safelora_cli.math.delta import Factored
from safelora_cli.math.full import merged_weight, score_delta
from safelora_cli.math.lowrank_score import score_delta_entry
from safelora_cli.math.projection import ModuleScore, alignment_matrix
from safelora_cli.notices import Notices
from safelora_cli.output.shards import ShardWriter
from safelora_cli.output.writer import OutputFolder
from safelora_cli.runs.keep import Keep
from safelora_cli.runs.kinds import CARD_SKIP, Module, ProgressFn, Scored, Target, Written
from safelora_cli.runs.source import Alignment, Dense, PathLike, Source, Weight
from safelora_cli.settings import ProjectionSpec, Settings
from safelora_cli.sources.stream import alignment_stream

KIND = "full"


@dataclass(frozen=True)
class Delta:
    """(W_aligned, W_ft) as a ``stream.Difference``: the stream then yields D."""

    base: TensorInfo
    aligned: TensorInfo


def resolve_full(
    model: PathLike, aligned: PathLike, revision: str | None, notices: Notices
) -> tuple[ResolvedInput, ResolvedInput]:
    """The fine-tune (``FT_MODEL``) and the aligned model it was fine-tuned from."""
    model_input = resolve(str(model), None, role="FT_MODEL", notices=notices)
    return model_input, resolve(str(aligned), revision, role="--aligned", notices=notices)


class FullUpdate:
    """A full fine-tune, validated and paired against its aligned model and the source."""

    kind = KIND
    writes = frozenset({Written.MODEL})

    def __init__(
        self,
        model_input: ResolvedInput,
        aligned_input: ResolvedInput,
        model: TensorIndex,
        pairs: list[FullPair],
        settings: Settings,
        notices: Notices,
    ) -> None:
        self.model_input, self.aligned_input, self.model = model_input, aligned_input, model
        self.pairs, self.settings = pairs, settings
        modules = tuple(
            Module(p.module, p.name, _module_shape(p), None, transposed=p.transpose) for p in pairs
        )
        self._targets = [Target(model_input, modules, notices)]

    @classmethod
    def pair(
        cls,
        model_input: ResolvedInput,
        aligned_input: ResolvedInput,
        source: Source,
        settings: Settings,
        notices: Notices,
    ) -> FullUpdate:
        """Check the fine-tune against the source and pair its targeted weights; headers only."""
        source.check_aligned(aligned_input, notices)
        config = _config(model_input.path)
        trained_base = source.trained_on()[0]
        for finding in check_adapter(config, trained_base, aligned_input.describe()):
            notices.add(finding.code, finding.message, values=finding.values)
        model = index_folder(model_input.path)
        model_type = config.get("model_type")
        pairs = source.pair_full(
            model,
            index_folder(aligned_input.path),
            Targets.parse(settings.targets) if settings.targets else Targets(),
            model_type if isinstance(model_type, str) else None,
        )
        settings.check_modules(len(pairs))
        return cls(model_input, aligned_input, model, pairs, settings, notices)

    @property
    def targets(self) -> Sequence[Target]:
        return self._targets

    def local_inputs(self) -> list[Path]:
        return [self.model_input.path, self.aligned_input.path]

    def inputs(self, source: Source, target: Target) -> dict[str, Any]:
        """The aligned model, the base (or the profile and the pair it was made from), and the
        fine-tune."""
        found = source.inputs()
        inputs: dict[str, Any] = {"aligned": self.aligned_input.describe(), "base": found["base"]}
        if "profile" in found:
            record = dict(found["profile"])
            ref = record.pop("ref")  # listed after the provenance here, before the hub fields
            fields = list(record.items())
            at = next((i for i, (k, _) in enumerate(fields) if k == "hub_id"), len(fields))
            inputs["profile"] = dict([*fields[:at], ("ref", ref), *fields[at:]])
        return {**inputs, "model": target.input.describe()}

    def _weights(self, pairs: Sequence[FullPair]) -> list[Weight]:
        return [Weight(p.name, p.base, p.aligned) for p in pairs]

    def score(
        self,
        source: Source,
        settings: Settings,
        device: torch.device,
        progress: ProgressFn | None,
        keep: Keep,
    ) -> list[dict[str, ModuleScore]]:
        """Score every targeted weight in one streamed pass (D beside the source's alignment);
        nothing is kept but the scores (P D is weight-sized: ``write`` computes it again)."""
        weights = self._weights(self.pairs)
        deltas = [Delta(pair.aligned, pair.ft) for pair in self.pairs]
        sizes = [
            p.aligned.nbytes + p.ft.nbytes + source.read_bytes(w)
            for p, w in zip(self.pairs, weights, strict=True)
        ]
        total, done, scores = sum(sizes), 0, {}
        spec = settings.projection_spec
        with torch.inference_mode():
            differences = alignment_stream(deltas, device)
            alignments = source.stream(weights, device)
            found = zip(self.pairs, sizes, differences, alignments, strict=True)
            for pair, size, (_, d, d_norm), alignment in found:
                score, _ = score_weight(
                    alignment, d, pair, spec, alignment_norm=True, d_norm=d_norm
                )
                scores[pair.module] = _checked(score, pair, d_norm)
                done += size
                if progress is not None:
                    progress(done, total, pair.name)
        return [scores]

    def write(
        self,
        written: Written,
        source: Source,
        scored: Scored,
        out: OutputFolder,
        device: torch.device,
    ) -> None:
        """W_aligned + P D for the selected weights (a second pass over them only), every other
        tensor and file as the fine-tune's."""
        chosen = [pair for pair in self.pairs if pair.module in scored.selected]
        spec = self.settings.projection_spec
        alignments = source.stream(self._weights(chosen), device)
        with torch.inference_mode(), TensorReader() as reader:
            with ShardWriter(self.model, out.path) as writer:
                for pair, alignment in zip(chosen, alignments, strict=True):
                    w_aligned = reader.read(pair.aligned)
                    d = alignment_matrix(w_aligned, reader.read(pair.ft), device)
                    _, pd = score_weight(alignment, d, pair, spec, alignment_norm=False)
                    assert pd is not None  # selected, so scored: neither V nor D is zero
                    update = pd.T if pair.transpose else pd
                    dtype = TORCH_DTYPES[pair.ft.dtype]
                    writer.replace(pair.ft, merged_weight(w_aligned, update, dtype, pair.name))
                writer.finalize()
        model = self.model_input
        notices = scored.target.notices
        out.copy_files(model.path, model.trusted_root, notices, CARD_SKIP, model=True)


def score_weight(
    alignment: Alignment,
    d: torch.Tensor,
    pair: FullPair,
    spec: ProjectionSpec,
    *,
    alignment_norm: bool,
    d_norm: float | None = None,
) -> tuple[ModuleScore, Factored | None]:
    """P D and its score for one weight; D (float32) and V as stored, each turned to the
    module's orientation: on V (``score_delta``), or on the profile entry
    (``score_delta_entry``). ``alignment_norm``: use the stream's ‖V‖_F (else computed anew)."""
    d = d.T if pair.transpose else d
    if isinstance(alignment, Dense):
        v = alignment.v.T if pair.transpose else alignment.v
        return score_delta(v, d, spec, alignment.norm if alignment_norm else None, d_norm)
    return score_delta_entry(alignment, d.to(torch.float32), spec, d_norm, pair.module)


def _module_shape(pair: FullPair) -> tuple[int, int]:
    out_dim, in_dim = pair.ft.shape[-2:]
    return (in_dim, out_dim) if pair.transpose else (out_dim, in_dim)


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


def check_full_settings(settings: Settings, merge: bool) -> None:
    """Options that mean nothing for a full fine-tune."""
    if merge:
        raise UsageError(
            "--merge applies to adapters; a full fine-tune is written as a full model already"
        )
    if settings.adapter_name is not None:
        raise UsageError("--adapter-name applies to adapters, not to a full fine-tune")

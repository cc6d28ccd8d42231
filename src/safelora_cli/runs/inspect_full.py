"""Inspecting a full fine-tune: which weights it changed, and by how much (``safelora inspect``
given a model folder and ``--aligned``).

Both models are read once, streamed (``stream.alignment_stream`` over (W_aligned, W_ft): D and
‖D‖_F per weight); nothing is written.
"""

from __future__ import annotations

from typing import Any

import torch

from safelora_cli.errors import IncompatibleInputError, UsageError
from safelora_cli.inputs.full_targets import model_problems, select_targets
from safelora_cli.inputs.index import FLOAT_DTYPES, index_folder
from safelora_cli.inputs.loader import TensorReader
from safelora_cli.inputs.resolve import resolve
from safelora_cli.output import report as reporting
from safelora_cli.runs.fullmodel import KIND, Delta
from safelora_cli.runs.source import PathLike
from safelora_cli.sources.stream import alignment_stream


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
            Delta(reference.tensors[name], info)
            for name, info in ft.tensors.items()
            if info.dtype in FLOAT_DTYPES and reference.tensors[name].dtype in FLOAT_DTYPES
        ),
        key=lambda diff: diff.aligned.location,
    )
    matrices = [diff for diff in diffs if len(diff.aligned.shape) == 2]
    entries: list[dict[str, Any]] = []
    with torch.inference_mode(), TensorReader() as reader:

        def entry(diff: Delta, d_norm: float) -> dict[str, Any]:
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

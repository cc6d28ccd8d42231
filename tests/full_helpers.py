"""Shared helpers for the full-fine-tune and merge tests: the flows the pipeline will run,
written out with the library's pieces, and the dense float64 references they are checked against.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli.inputs.adapter import load_adapter
from safelora_cli.inputs.index import TensorIndex, index_folder
from safelora_cli.inputs.loader import TensorReader
from safelora_cli.inputs.pairing import pair_modules
from safelora_cli.output.merge import merged_tensors
from safelora_cli.output.merge_plan import MergePlan, plan_merge
from safelora_cli.output.shards import ShardWriter
from safelora_cli.output.sidecars import plan_sidecars
from safelora_cli.settings import ProjectionSpec, Settings

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Scored:
    """A weight's score as the report gives it."""

    cosine: float | None
    skipped: str | None


@dataclass(frozen=True)
class Target:
    name: str


@dataclass(frozen=True)
class FullRun:
    """What ``safelora patch FT_MODEL`` did, read back from its report (keys: weight names)."""

    pairs: list[Target]
    scores: dict[str, Scored]
    selected: set[str]
    report: dict[str, Any]


def patch_full(
    ft: Path,
    base: Path,
    aligned: Path,
    out: Path,
    spec: ProjectionSpec | None = None,
    select: str = "threshold",
    num_layers: int = 10,
    threshold: float = 1.0,
    targets: tuple[str, ...] = (),
) -> FullRun:
    """Patch a full fine-tune through the library (``pipeline.patch``) into ``out``."""
    from safelora_cli import api as pipeline

    spec = spec or ProjectionSpec()
    settings = Settings(select=select, num_layers=num_layers, threshold=threshold,
                        projection=spec.kind, rank=spec.rank, energy=spec.energy,
                        targets=targets)  # fmt: skip
    report = pipeline.patch(ft, base, aligned, out, settings).report
    modules = report["modules"]
    return FullRun(
        pairs=[Target(m["weight"]) for m in modules],
        scores={m["weight"]: Scored(m["cosine"], m["skipped"]) for m in modules},
        selected={m["weight"] for m in modules if m["projected"]},
        report=report,
    )


def merge_to(
    adapter_dir: Path,
    aligned: Path,
    out: Path,
    lora_b: dict[str, torch.Tensor] | None = None,
    adapter_name: str | None = None,
) -> MergePlan:
    """Merge the adapter into the aligned model, written to ``out`` (created)."""
    adapter = load_adapter(adapter_dir, adapter_name)
    index = index_folder(aligned)
    config = json.loads((aligned / "config.json").read_text())
    pairs = pair_modules(adapter, index, index)
    plan = plan_merge(adapter, pairs, index, adapter_name, config.get("tie_word_embeddings"))
    out.mkdir()
    with TensorReader() as reader, ShardWriter(index, out) as writer:
        for info, tensor in merged_tensors(plan, reader.read, lora_b):
            writer.replace(info, tensor)
        writer.finalize()
    for path in plan_sidecars(aligned, aligned.resolve(), model=True)[0]:
        shutil.copyfile(path, out / path.name)
    return plan


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single file or sharded)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (
        x.dtype == y.dtype
        and x.shape == y.shape
        and x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8))
    )


def byte_ranges(index: TensorIndex, names: set[str]) -> dict[Path, list[tuple[int, int]]]:
    """File -> [(start, stop)] of the named tensors' data."""
    ranges: dict[Path, list[tuple[int, int]]] = {}
    for name in names:
        info = index.tensors[name]
        ranges.setdefault(info.path, []).append((info.offset, info.offset + info.nbytes))
    return ranges


def masked_bytes(path: Path, ranges: list[tuple[int, int]]) -> bytes:
    """The file's bytes with the given ranges zeroed (what must stay identical)."""
    data = bytearray(path.read_bytes())
    for start, stop in ranges:
        data[start:stop] = bytes(stop - start)
    return bytes(data)


def header_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[: 8 + length]


def dense_paper(v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Ĉ D with the out x out Ĉ = V Vᵀ / ‖V‖_F built densely, in float64."""
    v64 = v.double()
    return (v64 @ v64.T / torch.linalg.matrix_norm(v64)) @ d.double()


def dense_subspace(v: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
    """U_k U_kᵀ D with U_k from a float64 SVD of V."""
    u = torch.linalg.svd(v.double(), full_matrices=False)[0][:, :k]
    return u @ (u.T @ d.double())


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0))


def json_of(path: Path) -> Any:
    return json.loads(path.read_text())


def load_in_transformers(folder: Path) -> Any:
    """The model folder loaded by transformers, asserting no missing, unexpected or mismatched
    key: what we write loads as it is."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    return model

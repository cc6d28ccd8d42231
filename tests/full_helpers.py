"""Shared helpers for the full-fine-tune and merge tests: the flows the pipeline will run,
written out with the library's pieces, and the dense float64 references they are checked against.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli.adapter import load_adapter
from safelora_cli.full import merged_weight, score_delta
from safelora_cli.full_targets import FullPair, Targets, pair_full_weights
from safelora_cli.index import TensorIndex, index_folder
from safelora_cli.loader import TORCH_DTYPES, TensorReader
from safelora_cli.merge import merged_tensors
from safelora_cli.merge_plan import MergePlan, plan_merge
from safelora_cli.pairing import pair_modules
from safelora_cli.projection import ModuleScore, alignment_matrix
from safelora_cli.selection import select_modules
from safelora_cli.settings import ProjectionSpec
from safelora_cli.shards import ShardWriter

CPU = torch.device("cpu")


@dataclass(frozen=True)
class FullRun:
    pairs: list[FullPair]
    scores: dict[str, ModuleScore]
    selected: set[str]
    written: list[Path]


def _deltas(
    reader: TensorReader, pair: FullPair
) -> tuple[torch.Tensor, float, torch.Tensor, float]:
    assert pair.base is not None
    w_base, w_aligned, w_ft = (
        reader.read(pair.base),
        reader.read(pair.aligned),
        reader.read(pair.ft),
    )
    v, d = alignment_matrix(w_base, w_aligned, CPU), alignment_matrix(w_aligned, w_ft, CPU)
    if pair.transpose:
        v, d = v.T, d.T
    return v, float(torch.linalg.vector_norm(v)), d, float(torch.linalg.vector_norm(d))


def patch_full(
    ft: Path,
    base: Path,
    aligned: Path,
    out: Path,
    spec: ProjectionSpec | None = None,
    select: str = "threshold",
    num_layers: int = 10,
    threshold: float = 1.0,
    targets: Targets | None = None,
) -> FullRun:
    """Score every targeted weight, select, then write the selected ones (a second pass)."""
    spec, targets = spec or ProjectionSpec(), targets or Targets()
    ft_index = index_folder(ft)
    config = json.loads((ft / "config.json").read_text())
    pairs = pair_full_weights(
        ft_index, index_folder(aligned), index_folder(base), targets, config.get("model_type")
    )
    scores = {}
    with torch.inference_mode(), TensorReader() as reader:
        for pair in pairs:
            v, v_norm, d, d_norm = _deltas(reader, pair)
            scores[pair.name], _ = score_delta(v, d, spec, v_norm, d_norm)
        cosines = {n: s.cosine for n, s in scores.items() if s.cosine is not None}
        selected, _ = select_modules(cosines, select, num_layers, threshold)
        out.mkdir()
        with ShardWriter(ft_index, out) as writer:
            for pair in pairs:
                if pair.name not in selected:
                    continue
                v, v_norm, d, d_norm = _deltas(reader, pair)
                _, pd = score_delta(v, d, spec, v_norm, d_norm)
                assert pd is not None
                dtype = TORCH_DTYPES[pair.ft.dtype]
                w_out = merged_weight(
                    reader.read(pair.aligned), pd.T if pair.transpose else pd, dtype, pair.name
                )
                writer.replace(pair.ft, w_out)
            written = writer.finalize()
    return FullRun(pairs, scores, selected, written)


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

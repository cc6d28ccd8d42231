"""Index: tensor name -> (file, dtype, shape, offset), from safetensors headers only.

Every file is validated before anything reads a tensor from it: what the safetensors library checks
(offsets, sizes) plus what it does not (git-lfs pointers, duplicate names, header sizes that would
exhaust memory, index shard names that leave the folder). No tensor data is read here.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safelora_cli.errors import CorruptFileError, IncompatibleInputError
from safelora_cli.inputs.smallfiles import DuplicateKey, load_json, open_regular, reject_duplicates

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIM = 2**63  # no tensor is this long (torch's sizes are signed 64-bit)
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"  # adapter.CONFIG_NAME (adapter.py imports this module)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LFS_PREFIX = b"version https://git-lfs"

# Bits per element of every dtype the safetensors format names.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype string ("BF16"), shape, data start in the file."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    file_size: int  # of the whole file when indexed: a changed file is caught on open

    @property
    def location(self) -> tuple[str, int]:
        """Sort key for reading in shard/offset order, the cheapest order to read in."""
        return (str(self.path), self.offset)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    size: int


def _payload_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    return (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file, without reading tensor data.

    Args:
        path: a ``.safetensors`` file.
    Returns:
        The header, with every tensor's absolute byte range checked against the file size.
    Raises:
        CorruptFileError: on any malformed header, with what was expected and found.
    """
    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise CorruptFileError(
                    f"{path}: file is {size} bytes, too short to be safetensors",
                    "the download or export was interrupted; fetch the file again",
                )
            if head.startswith(LFS_PREFIX[:8]) and fh.read(len(LFS_PREFIX) - 8) == LFS_PREFIX[8:]:
                raise CorruptFileError(
                    f"{path}: is a git-lfs pointer, not the weights",
                    "run `git lfs pull` in that repository",
                )
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                problem = (
                    f"is over the {MAX_HEADER_BYTES}-byte limit"
                    if header_len > MAX_HEADER_BYTES
                    else f"is past the end of the {size}-byte file"
                )
                raise CorruptFileError(
                    f"{path}: header length {header_len} {problem}",
                    "the file is truncated or not safetensors",
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicates)
    except DuplicateKey as exc:
        raise CorruptFileError(
            f"{path}: tensor {exc.key!r} appears twice in the header",
            "the file was written by a broken exporter; re-export it",
        ) from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptFileError(f"{path}: header is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: header is not a JSON object")
    return _parse_header(path, header, size, 8 + header_len)


def _parse_header(
    path: Path, header: dict[str, Any], size: int, data_start: int
) -> SafetensorsHeader:
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CorruptFileError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(path, name, entry, data_start, size)
    end = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.offset, t.offset + t.nbytes)):
        if info.offset != end:
            kind = "overlaps the previous tensor" if info.offset < end else "leaves a gap"
            raise CorruptFileError(f"{path}: tensor {info.name!r} {kind} (data offsets)")
        end = info.offset + info.nbytes
    if end != size:
        raise CorruptFileError(
            f"{path}: expected {end} bytes from the header, the file has {size}",
            "the file is truncated or has extra bytes; fetch it again",
        )
    return SafetensorsHeader(path, tensors, metadata, size)


def _parse_entry(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CorruptFileError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CorruptFileError(f"{where}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise CorruptFileError(f"{where}: shape {shape!r} is not a list of sizes")
    if any(d >= MAX_DIM for d in shape):  # with a 0 elsewhere the byte count alone is fine
        raise CorruptFileError(f"{where}: shape {shape!r} has a size past any tensor's")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise CorruptFileError(f"{where}: data_offsets {offsets!r} is not [start, end]")
    start, stop = offsets
    expected = _payload_bytes(dtype, tuple(shape))
    if stop - start != expected:
        raise CorruptFileError(
            f"{where}: holds {stop - start} bytes, shape {shape} in {dtype} needs {expected}"
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + start, expected, size)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class TensorIndex:
    """All tensors of a model folder, by name, with the files they come from."""

    root: Path
    tensors: dict[str, TensorInfo]
    files: tuple[Path, ...]

    def get(self, name: str) -> TensorInfo | None:
        return self.tensors.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)


def index_folder(root: Path) -> TensorIndex:
    """Index a model folder: its ``model.safetensors.index.json``, else its ``*.safetensors``.

    Args:
        root: a local folder holding a model's weights.
    Returns:
        The index, built from headers only.
    Raises:
        CorruptFileError: a malformed file, an index naming a missing or foreign shard.
        IncompatibleInputError: no safetensors weights at all (pickle-only folders included), or
            a LoRA adapter's folder where a model's is due.
    """
    if (root / ADAPTER_CONFIG).exists():
        raise IncompatibleInputError(
            f"{root}: is a LoRA adapter's folder (it holds {ADAPTER_CONFIG}), not a model's",
            "give the model's folder here, and the adapter as ADAPTER",
        )
    index_path = root / INDEX_NAME
    if index_path.is_file():
        return _index_from_json(root, index_path)
    files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not files:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise IncompatibleInputError(
                f"{root}: only pickle weights ({', '.join(pickles[:3])}); safelora never unpickles",
                "convert them to safetensors first, e.g. load with transformers and "
                "save_pretrained(..., safe_serialization=True)",
            )
        raise IncompatibleInputError(f"{root}: no *.safetensors weights in this folder")
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        _merge(tensors, read_header(path).tensors)
    return TensorIndex(root, tensors, tuple(files))


def _merge(into: dict[str, TensorInfo], new: dict[str, TensorInfo]) -> None:
    for name, info in new.items():
        if name in into:
            raise CorruptFileError(
                f"{info.path}: tensor {name!r} is also in {into[name].path.name}",
                "the folder mixes two exports; keep one",
            )
        into[name] = info


def _index_from_json(root: Path, index_path: Path) -> TensorIndex:
    weight_map = load_json(index_path, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptFileError(f"{index_path}: weight_map must map tensor names to shard files")
    by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(name)
    # every shard name is checked before any file is opened: nothing outside root is ever read
    paths = {shard: _shard_path(root, index_path, shard) for shard in sorted(by_shard)}
    tensors: dict[str, TensorInfo] = {}
    files = []
    for shard, path in paths.items():
        header = read_header(path)
        missing = sorted(by_shard[shard] - header.tensors.keys())
        extra = sorted(header.tensors.keys() - by_shard[shard])
        if missing or extra:
            first = (missing or extra)[0]
            what = "the index lists" if missing else "the shard holds"
            raise CorruptFileError(
                f"{path}: does not match {INDEX_NAME}: {what} {first!r} "
                f"({len(missing)} listed but absent, {len(extra)} present but unlisted)",
                "the index and shards come from different exports; fetch them again",
            )
        _merge(tensors, header.tensors)
        files.append(path)
    return TensorIndex(root, tensors, tuple(files))


def _shard_path(root: Path, index_path: Path, shard: str) -> Path:
    if not shard or shard != Path(shard).name or shard in (".", "..") or "\\" in shard:
        raise CorruptFileError(
            f"{index_path}: shard name {shard!r} is not a plain file name",
            "shard names must not contain '..', separators or absolute paths",
        )
    path = root / shard
    if not path.is_file():
        raise CorruptFileError(
            f"{index_path}: names shard {shard!r}, which is not in {root}",
            "fetch the missing shard (or the whole folder) again",
        )
    return path

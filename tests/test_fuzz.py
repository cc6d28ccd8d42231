"""Property tests: whatever the bytes, the readers succeed or raise a SafeLoraError, nothing else;
and, as the positive control, every valid input is accepted and read back exactly.

Targets: ``index.read_header`` (random bytes; valid headers mutated at the JSON level, in their
offsets, dtypes, shapes and length field, and byte by byte), ``index.index_folder`` with a mutated
``model.safetensors.index.json``, and ``adapter.load_adapter`` with a mutated
``adapter_config.json`` or a header of arbitrary LoRA-like keys (then ``pairing.pair_modules``).
A header that is accepted must also be readable: every tensor it lists is read back, or the read
fails with a SafeLoraError. A reader that refused everything would pass those, so each target also
has its control: the unmutated files, and files changed in ways that keep them valid (random
tensor layouts and bytes, header padding, key order, metadata, extra config keys) must be accepted
with exactly the tensors, shards and modules they hold.
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from safelora_cli.errors import ExitCode, SafeLoraError
from safelora_cli.inputs.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from safelora_cli.inputs.index import DTYPE_BITS, INDEX_NAME, TensorIndex, index_folder, read_header
from safelora_cli.inputs.loader import TensorReader
from safelora_cli.inputs.pairing import pair_modules
from tests.helpers import Q0

FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = sorted(DTYPE_BITS)
JUNK_DTYPES = ["", "F31", "int8", "f32", "Q4_K", "F32 "]
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
DOWN = "model.layers.0.mlp.down_proj"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
counts = st.integers(min_value=-3, max_value=2**64 + 3) | st.integers(min_value=0, max_value=64)


def build(
    tensors: dict[str, tuple[str, list[int]]],
    metadata: Any = None,
    seed: int | None = None,
    order: list[str] | None = None,
    pad: int = 0,
) -> bytes:
    """A valid safetensors file: tensors laid out in ``order`` (default: as given), data bytes
    0x01 (random with ``seed``), the header followed by ``pad`` spaces (the format allows it)."""
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name in order or list(tensors):
        dtype, shape = tensors[name]
        size = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode() + b" " * pad
    data = b"\x01" * offset if seed is None else random.Random(seed).randbytes(offset)
    return struct.pack("<Q", len(text)) + text + data


VALID = {
    "model.embed_tokens.weight": ("BF16", [5, 4]),
    f"{Q0}.weight": ("F32", [4, 4]),
    f"{DOWN}.weight": ("F16", [4, 6]),
    "model.norm.weight": ("F64", [4]),
    "empty": ("F32", [0, 3]),
    "scalar": ("I64", []),
    "flags": ("BOOL", [3]),
}
VALID_FILE = build(VALID, {"format": "pt"})


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def only_safelora_errors(call: Callable[[], Any]) -> Any:
    """Run ``call``; a SafeLoraError must carry a one-line message, anything else fails the test."""
    try:
        result = call()
    except SafeLoraError as exc:
        error: SafeLoraError = exc
    else:
        event("accepted")
        return result
    line = error.one_line()
    assert line
    assert "\n" not in line
    # an input's fault, never the internal-error code of a bug, nor 0 or the gate's 1
    assert error.exit_code in {
        ExitCode.USAGE, ExitCode.CORRUPT, ExitCode.INCOMPATIBLE, ExitCode.NUMERICAL,
        ExitCode.FILESYSTEM, ExitCode.HUB,
    }  # fmt: skip
    event(type(error).__name__)
    return None


def read_everything(path: Path) -> None:
    """Headers that pass validation must be readable tensor by tensor (or fail cleanly)."""
    header = read_header(path)
    with TensorReader() as reader:
        for info in header.tensors.values():
            reader.read(info)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --- read_header -----------------------------------------------------------------------------

# dtypes safetensors hands back as torch tensors (it cannot read F6_E2M3, F6_E3M2 and E8M0)
READABLE = sorted(set(DTYPE_BITS) - {"F6_E2M3", "F6_E3M2", "E8M0"})
CONTROL = settings(FUZZ, max_examples=150)


def check_read_back(path: Path, tensors: dict[str, tuple[str, list[int]]], raw: bytes) -> None:
    """``path`` (holding ``raw``) is accepted, lists exactly ``tensors`` with their dtypes and
    shapes, and every tensor reads back as the bytes the file holds for it."""
    header, payload = split(raw)
    parsed = read_header(path)
    assert parsed.tensors.keys() == tensors.keys()
    assert parsed.metadata == header.get("__metadata__")
    with TensorReader() as reader:
        for name, (dtype, shape) in tensors.items():
            info = parsed.tensors[name]
            assert (info.dtype, list(info.shape)) == (dtype, shape)
            start, stop = header[name]["data_offsets"]
            got = reader.read(info).reshape(-1).view(torch.uint8).numpy().tobytes()
            assert got == payload[start:stop], name


def test_the_unmutated_file_is_accepted_and_read_back(workdir: Path) -> None:
    path = workdir / "valid.safetensors"
    path.write_bytes(VALID_FILE)
    check_read_back(path, VALID, VALID_FILE)
    folder = workdir / "valid-folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(VALID_FILE)
    assert index_folder(folder).tensors.keys() == VALID.keys()


tensor_names = st.text(min_size=1, max_size=12).filter(lambda name: name != "__metadata__")
valid_tensors = st.dictionaries(
    tensor_names,
    st.tuples(st.sampled_from(READABLE), st.lists(st.integers(0, 5), max_size=3)).filter(
        # torch holds F4 as packed pairs along the last dimension
        lambda entry: entry[0] != "F4" or (len(entry[1]) > 0 and entry[1][-1] % 2 == 0)
    ),
    min_size=1,
    max_size=6,
)
string_maps = st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)


@CONTROL
@given(
    tensors=valid_tensors,
    metadata=st.none() | string_maps,
    seed=st.integers(0, 2**32 - 1),
    pad=st.integers(0, 16),
    data=st.data(),
)
def test_any_valid_file_is_accepted_and_read_back(
    workdir: Path,
    tensors: dict[str, tuple[str, list[int]]],
    metadata: dict[str, str] | None,
    seed: int,
    pad: int,
    data: st.DataObject,
) -> None:
    """Random names, dtypes, shapes (empty ones included), bytes, metadata, data laid out in
    another order than the header's, and a header padded with spaces: all valid, all accepted."""
    order = data.draw(st.permutations(list(tensors)), label="data order")
    raw = build({k: (d, list(s)) for k, (d, s) in tensors.items()}, metadata, seed, order, pad)
    path = workdir / "control.safetensors"
    path.write_bytes(raw)
    check_read_back(path, {k: (d, list(s)) for k, (d, s) in tensors.items()}, raw)


@FUZZ
@given(
    head=st.one_of(
        st.binary(max_size=16),
        st.integers(min_value=0, max_value=2**64 - 1).map(lambda n: struct.pack("<Q", n)),
        st.integers(min_value=0, max_value=300).map(lambda n: struct.pack("<Q", n)),
    ),
    body=st.binary(max_size=300),
)
def test_random_bytes(workdir: Path, head: bytes, body: bytes) -> None:
    path = workdir / "random.safetensors"
    path.write_bytes(head + body)
    only_safelora_errors(lambda: read_everything(path))


def _mutate_header(data: st.DataObject, header: dict[str, Any]) -> None:
    names = sorted(header)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4), label="edits")):
        name = data.draw(st.sampled_from(names), label="tensor")
        entry = header.get(name)
        op = data.draw(
            st.sampled_from(
                ["dtype", "shape", "offsets", "drop-field", "entry", "metadata", "add", "drop"]
            ),
            label="op",
        )
        if op == "dtype" and isinstance(entry, dict):
            entry["dtype"] = data.draw(st.sampled_from(DTYPES + JUNK_DTYPES) | json_values)
        elif op == "shape" and isinstance(entry, dict):
            entry["shape"] = data.draw(st.lists(counts, max_size=4) | json_values)
        elif op == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = data.draw(st.lists(counts, max_size=3) | json_values)
        elif op == "drop-field" and isinstance(entry, dict) and entry:
            del entry[data.draw(st.sampled_from(sorted(entry)))]
        elif op == "entry":
            header[name] = data.draw(json_values)
        elif op == "metadata":
            header["__metadata__"] = data.draw(
                st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3) | json_values
            )
        elif op == "add":
            header[data.draw(st.text(max_size=10))] = {
                "dtype": data.draw(st.sampled_from(DTYPES)),
                "shape": data.draw(st.lists(st.integers(0, 5), max_size=3)),
                "data_offsets": data.draw(st.lists(counts, min_size=2, max_size=2)),
            }
        elif op == "drop":
            header.pop(name, None)


def _sometimes(data: st.DataObject, label: str) -> bool:
    """One mutation stage in three applies: mutated files are often still valid enough to read."""
    return data.draw(st.sampled_from([False, False, True]), label=label)


@FUZZ
@given(data=st.data())
def test_mutated_valid_header(workdir: Path, data: st.DataObject) -> None:
    header, payload = split(VALID_FILE)
    if _sometimes(data, "edit json"):
        _mutate_header(data, header)
    text = json.dumps(header).encode()
    if _sometimes(data, "duplicate a name"):
        first = next(iter(header), "x")
        text = text[:-1] + f", {json.dumps(first)}: {{}}}}".encode()
    length = len(text)
    if _sometimes(data, "length field"):
        length = data.draw(
            st.integers(length - 9, length + 9) | st.integers(min_value=0, max_value=2**64 - 1)
        )
    raw = bytearray(struct.pack("<Q", max(0, min(length, 2**64 - 1))) + text + payload)
    if _sometimes(data, "flip bytes"):
        for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
            at = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
            raw[at] = data.draw(st.integers(min_value=0, max_value=255))
    if _sometimes(data, "cut"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    if _sometimes(data, "append"):
        raw += data.draw(st.binary(min_size=1, max_size=9))
    path = workdir / "mutated.safetensors"
    path.write_bytes(bytes(raw))
    only_safelora_errors(lambda: read_everything(path))
    folder = workdir / "mutated-folder"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(bytes(raw))
    only_safelora_errors(lambda: index_folder(folder))


# --- index_folder with a mutated model.safetensors.index.json --------------------------------

_names = sorted(VALID)
_SHARD_FILES = {
    SHARDS[0]: build({n: VALID[n] for n in _names[:3]}),
    SHARDS[1]: build({n: VALID[n] for n in _names[3:]}),
}
_VALID_INDEX = {
    "metadata": {"total_size": 1},
    "weight_map": {n: SHARDS[0] if i < 3 else SHARDS[1] for i, n in enumerate(_names)},
}
shard_names = st.sampled_from(
    [*SHARDS, "missing.safetensors", "../" + SHARDS[0], "/etc/passwd", "", ".", "..",
     "sub/" + SHARDS[0], "sub\\" + SHARDS[0], "model.safetensors.index.json", "\x00"]
) | st.text(max_size=12)  # fmt: skip


@pytest.fixture(scope="module")
def sharded(workdir: Path) -> Path:
    folder = workdir / "sharded"
    folder.mkdir()
    for name, raw in _SHARD_FILES.items():
        (folder / name).write_bytes(raw)
    return folder


@FUZZ
@given(data=st.data())
def test_mutated_index_json(sharded: Path, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["bytes", "json", "edit", "edit", "edit"]), label="kind")
    if kind == "bytes":
        text = data.draw(st.binary(max_size=200))
    elif kind == "json":
        text = json.dumps(data.draw(json_values)).encode()
    else:
        index: dict[str, Any] = copy.deepcopy(_VALID_INDEX)
        weight_map: dict[str, Any] = index["weight_map"]
        for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
            op = data.draw(st.sampled_from(["shard", "name", "drop", "add", "map", "value"]))
            name = data.draw(st.sampled_from(sorted(weight_map) or ["x"]))
            if op == "shard" and name in weight_map:
                weight_map[name] = data.draw(shard_names)
            elif op == "name" and name in weight_map:
                weight_map[data.draw(st.text(max_size=10))] = weight_map.pop(name)
            elif op == "drop":
                weight_map.pop(name, None)
            elif op == "add":
                weight_map[data.draw(st.text(max_size=10))] = data.draw(shard_names)
            elif op == "value":
                weight_map[name] = data.draw(json_values)
            else:
                index["weight_map"] = data.draw(json_values)
                break
        text = json.dumps(index).encode()
    (sharded / INDEX_NAME).write_bytes(text)
    result = only_safelora_errors(lambda: index_folder(sharded))
    if result is not None:
        assert all(info.path.parent == sharded for info in result.tensors.values())


def check_index(sharded: Path, weight_map: dict[str, str]) -> None:
    index = index_folder(sharded)
    assert {name: info.path for name, info in index.tensors.items()} == {
        name: sharded / shard for name, shard in weight_map.items()
    }
    for name, info in index.tensors.items():
        assert (info.dtype, list(info.shape)) == VALID[name]


def test_the_unmutated_index_is_accepted(sharded: Path) -> None:
    (sharded / INDEX_NAME).write_text(json.dumps(_VALID_INDEX))
    check_index(sharded, _VALID_INDEX["weight_map"])


@CONTROL
@given(
    data=st.data(),
    metadata=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    extra=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k != "weight_map"), json_values, max_size=2
    ),
)
def test_any_valid_index_is_accepted(
    sharded: Path, data: st.DataObject, metadata: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Keys in any order, any metadata (total_size is not checked against anything), extra keys."""
    weight_map: dict[str, str] = _VALID_INDEX["weight_map"]
    order = data.draw(st.permutations(list(weight_map)), label="key order")
    index = {**extra, "metadata": metadata, "weight_map": {k: weight_map[k] for k in order}}
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    check_index(sharded, weight_map)


# --- load_adapter: mutated adapter_config.json, arbitrary LoRA-like headers ------------------

ADAPTER_TENSORS = {
    f"base_model.model.{Q0}.lora_A.weight": ("F32", [2, 4]),
    f"base_model.model.{Q0}.lora_B.weight": ("F32", [4, 2]),
    f"base_model.model.{DOWN}.lora_A.weight": ("BF16", [2, 6]),
    f"base_model.model.{DOWN}.lora_B.weight": ("BF16", [4, 2]),
}
VALID_CONFIG = {
    "peft_type": "LORA",
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["q_proj", "down_proj"],
    "fan_in_fan_out": False,
    "use_dora": False,
    "use_rslora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
}
CONFIG_KEYS = [*VALID_CONFIG, "modules_to_save", "unknown"]
pattern_maps = st.dictionaries(
    st.sampled_from(["q_proj", "down_proj", Q0, "(", "[a-", ".*", "q_proj|down", "", "*"])
    | st.text(max_size=6),
    st.integers(-2, 8) | json_values,
    max_size=3,
)


@pytest.fixture(scope="module")
def base_index(workdir: Path) -> TensorIndex:
    folder = workdir / "base"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(VALID_FILE)
    return index_folder(folder)


@FUZZ
@given(data=st.data())
def test_mutated_adapter_config(
    workdir: Path, base_index: TensorIndex, data: st.DataObject
) -> None:
    folder = workdir / "adapter-config"
    folder.mkdir(exist_ok=True)
    (folder / WEIGHTS_NAME).write_bytes(build(ADAPTER_TENSORS))
    kind = data.draw(st.sampled_from(["bytes", "json", "edit", "edit", "edit"]), label="kind")
    if kind == "bytes":
        text = data.draw(st.binary(max_size=200))
    elif kind == "json":
        text = json.dumps(data.draw(json_values)).encode()
    else:
        config = copy.deepcopy(VALID_CONFIG)
        for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
            key = data.draw(st.sampled_from(CONFIG_KEYS), label="key")
            if data.draw(st.booleans(), label="drop"):
                config.pop(key, None)
            elif key in ("rank_pattern", "alpha_pattern"):
                config[key] = data.draw(pattern_maps | json_values)
            elif key == "r":
                config[key] = data.draw(st.integers(-1, 4) | json_values)
            else:
                config[key] = data.draw(json_values)
        text = json.dumps(config).encode()
    (folder / CONFIG_NAME).write_bytes(text)
    adapter = only_safelora_errors(lambda: load_adapter(folder))
    if adapter is not None:
        only_safelora_errors(lambda: pair_modules(adapter, base_index, base_index))


def check_adapter(folder: Path, base_index: TensorIndex, rank: int = 2) -> None:
    """The adapter loads with its two modules at ``rank``, and both pair with the base."""
    adapter = load_adapter(folder)
    assert sorted(m.module for m in adapter.modules) == sorted([Q0, DOWN])
    assert all(m.rank == rank for m in adapter.modules)
    pairs = pair_modules(adapter, base_index, base_index)
    assert sorted(p.base.name for p in pairs) == sorted([f"{Q0}.weight", f"{DOWN}.weight"])


def test_the_unmutated_adapter_is_accepted_and_pairs(
    workdir: Path, base_index: TensorIndex
) -> None:
    folder = workdir / "adapter-valid"
    folder.mkdir()
    (folder / WEIGHTS_NAME).write_bytes(build(ADAPTER_TENSORS))
    (folder / CONFIG_NAME).write_text(json.dumps(VALID_CONFIG))
    check_adapter(folder, base_index)


positive_numbers = st.integers(1, 1024) | st.floats(1e-3, 1e3, allow_nan=False)


@CONTROL
@given(
    lora_alpha=positive_numbers,
    targets=st.sampled_from([["q_proj", "down_proj"], "all-linear", r".*\.(q_proj|down_proj)"]),
    rslora=st.booleans(),
    rank_pattern=st.sampled_from([{}, {"q_proj": 2}, {"down_proj": 2, "lm_head": 9}]),
    alpha_pattern=st.dictionaries(st.sampled_from(["q_proj", "down_proj"]), positive_numbers),
    unknown=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in VALID_CONFIG), json_values, max_size=3
    ),
    prefix=st.sampled_from(["", "base_model.model."]),
    name=st.sampled_from(["", ".default"]),
)
def test_any_valid_adapter_is_accepted_and_pairs(
    workdir: Path,
    base_index: TensorIndex,
    lora_alpha: float,
    targets: Any,
    rslora: bool,
    rank_pattern: dict[str, int],
    alpha_pattern: dict[str, float],
    unknown: dict[str, Any],
    prefix: str,
    name: str,
) -> None:
    """PEFT's config variants, unknown keys and the key layouts PEFT writes are all accepted."""
    folder = workdir / "adapter-control"
    folder.mkdir(exist_ok=True)
    tensors = {
        key.replace("base_model.model.", prefix, 1).replace(".weight", f"{name}.weight"): value
        for key, value in ADAPTER_TENSORS.items()
    }
    (folder / WEIGHTS_NAME).write_bytes(build(tensors))
    config = {**unknown, **VALID_CONFIG, "lora_alpha": lora_alpha, "target_modules": targets}
    config |= {"use_rslora": rslora, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    check_adapter(folder, base_index)


lora_keys = st.builds(
    lambda prefix, module, kind, name, suffix: f"{prefix}{module}.{kind}{name}{suffix}",
    st.sampled_from(["", "base_model.model.", "base_model.model.base_model.model."]),
    st.sampled_from([Q0, DOWN, "lm_head", "model.embed_tokens", "x", "a.b"]),
    st.sampled_from(["lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "bias"]),
    st.sampled_from(["", ".default", ".other", ".a.b"]),
    st.sampled_from([".weight", ".weight", ".bias", ""]),
) | st.text(max_size=20)
float_dtypes = st.sampled_from(["F32", "F32", "BF16", "F16", "F64"])
any_dtypes = float_dtypes | st.sampled_from(["I8", "U8", "BOOL", "F8_E4M3"])
# (out, in) of each module in the base file; lm_head falls back to the embedding (tied)
DIMS = {Q0: (4, 4), DOWN: (4, 6), "lm_head": (5, 4), "model.norm": (4, 1), "missing.proj": (3, 3)}


@st.composite
def lora_files(draw: st.DrawFn) -> dict[str, tuple[str, list[int]]]:
    """Mostly well-formed LoRA pairs, each possibly broken: rank, dims, dtype, a factor missing."""
    tensors: dict[str, tuple[str, list[int]]] = {}
    prefix = draw(st.sampled_from(["base_model.model.", ""]))
    name = draw(st.sampled_from(["", ".default"]))
    for module in draw(
        st.lists(st.sampled_from(sorted(DIMS)), min_size=1, max_size=4, unique=True)
    ):
        out, inp = DIMS[module]
        if draw(st.booleans()):
            out, inp = draw(st.integers(0, 7)), draw(st.integers(0, 7))
        rank = draw(st.integers(1, 3))
        a_shape, b_shape = [rank, inp], [out, rank]
        if draw(st.sampled_from([False, False, False, True])):
            a_shape = draw(st.lists(st.integers(0, 5), max_size=3))
        dtype = draw(st.sampled_from([draw(float_dtypes), draw(any_dtypes)]))
        keep = draw(st.sampled_from(["both", "both", "both", "A", "B"]))
        if keep != "B":
            tensors[f"{prefix}{module}.lora_A{name}.weight"] = (dtype, a_shape)
        if keep != "A":
            tensors[f"{prefix}{module}.lora_B{name}.weight"] = (dtype, b_shape)
    for key in draw(st.lists(lora_keys, max_size=2)):
        tensors[key] = (draw(any_dtypes), draw(st.lists(st.integers(0, 4), max_size=3)))
    return tensors


@FUZZ
@given(
    tensors=lora_files(),
    rank=st.integers(min_value=1, max_value=3),
    rank_pattern=st.sampled_from([{}, {}, {"q_proj": 2}, {"down_proj": 1, "lm_head": 3}])
    | pattern_maps,
    adapter_name=st.sampled_from([None, None, "default", "other"]),
    fan_in_fan_out=st.sampled_from([False, False, True]),
)
def test_arbitrary_adapter_headers(
    workdir: Path,
    base_index: TensorIndex,
    tensors: dict[str, tuple[str, list[int]]],
    rank: int,
    rank_pattern: dict[str, Any],
    adapter_name: str | None,
    fan_in_fan_out: bool,
) -> None:
    folder = workdir / "adapter-header"
    folder.mkdir(exist_ok=True)
    (folder / WEIGHTS_NAME).write_bytes(build(tensors))
    config = {**VALID_CONFIG, "r": rank, "rank_pattern": rank_pattern}
    config["fan_in_fan_out"] = fan_in_fan_out
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    adapter = only_safelora_errors(lambda: load_adapter(folder, adapter_name))
    if adapter is None:
        return
    assert adapter.modules
    for module in adapter.modules:
        assert module.a.shape[0] == module.b.shape[1] == module.rank
    pairs = only_safelora_errors(lambda: pair_modules(adapter, base_index, base_index))
    for pair in pairs or []:
        stored = pair.shape[::-1] if pair.transpose else pair.shape
        assert pair.base.shape == stored

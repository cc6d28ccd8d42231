"""Malformed input files: every broken safetensors file, shard index or pickle is refused with one
clear line naming the file (and the tensor), before anything is written.

Each broken input starts from a seeded ``make_trio()`` trio: bytes corrupted, a git-lfs pointer
written, the header or the index edited by hand, or pickles put in place of the weights. Then
``safelora patch`` runs in-process and ``expect_error`` checks the exit code, the one stderr line,
an empty stdout and that neither the output nor a staging folder is left behind.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from safelora_cli.errors import ExitCode
from safelora_cli.inputs.index import MAX_HEADER_BYTES
from tests.conftest import Trio, TrioFactory
from tests.helpers import (
    CONFIG,
    INDEX,
    K0,
    MODEL,
    Q0,
    WEIGHTS,
    Cli,
    edit_config,
    edit_tensors,
    expect_error,
    expect_ok,
    lora_key,
    read_raw,
    tensors_by_offset,
    truncate,
    write_lfs_pointer,
    write_raw,
)

CORRUPT, INCOMPATIBLE = ExitCode.CORRUPT, ExitCode.INCOMPATIBLE


def target_file(trio: Trio, which: str) -> Path:
    return {
        "base": trio.base / MODEL,
        "aligned": trio.aligned / MODEL,
        "adapter": trio.adapter / WEIGHTS,
    }[which]


# --- malformed safetensors files --------------------------------------------------------------


def _set_bytes(data: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(data)


def _append(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 16)


def _length_field(value: Callable[[int], int]) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value(len(raw))) + raw[8:])

    return mutate


def _header_text(text: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Replace the header bytes, keeping their length (so only the header is wrong)."""

    def mutate(path: Path) -> None:
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        new = text(raw[8 : 8 + length])
        assert len(new) == length
        path.write_bytes(raw[:8] + new + raw[8 + length :])

    return mutate


def _pad(text: bytes) -> Callable[[bytes], bytes]:
    return lambda old: text.ljust(len(old))


def _edit_header(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        raw = read_raw(path)
        header = dict(raw.header)
        edit(header)
        write_raw(path, header, raw.payload)

    return mutate


def _shift(index: int, by: int, *, end_only: bool = False) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        entry = header[tensors_by_offset(header)[index]]
        start, stop = entry["data_offsets"]
        entry["data_offsets"] = [start if end_only else start + by, stop + by]

    return edit


def _set_entry(field: str, value: Any, index: int = 0) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header[tensors_by_offset(header)[index]][field] = value

    return edit


def _shrink_shape(header: dict[str, Any]) -> None:
    entry = header[tensors_by_offset(header)[0]]
    entry["shape"] = [entry["shape"][0] - 1, *entry["shape"][1:]]


def _duplicate_name(path: Path) -> None:
    raw = read_raw(path)
    first = tensors_by_offset(raw.header)[0]
    text = json.dumps(raw.header)
    twice = f", {json.dumps(first)}: {json.dumps(raw.header[first])}}}"
    write_raw(path, (text[:-1] + twice).encode(), raw.payload)


def _huge_header(path: Path) -> None:
    """A header length field of twice the limit in a (sparse) file that is really that long."""
    length = 2 * MAX_HEADER_BYTES
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", length) + b"{")
        fh.truncate(8 + length)


MALFORMED = [
    pytest.param(write_lfs_pointer, ("git-lfs pointer", "git lfs pull"), id="lfs-pointer"),
    pytest.param(_set_bytes(b""), ("0 bytes", "too short"), id="empty"),
    pytest.param(_set_bytes(b"\x01\x02\x03"), ("3 bytes", "too short"), id="3-bytes"),
    pytest.param(truncate, ("expected", "the file has"), id="truncated"),
    pytest.param(_append, ("expected", "the file has"), id="extra-bytes"),
    pytest.param(
        _length_field(lambda n: n), ("header length", "past the end"), id="length-past-end"
    ),
    pytest.param(_length_field(lambda n: 2**63), ("header length",), id="length-absurd"),
    pytest.param(
        _huge_header, ("header length", f"over the {MAX_HEADER_BYTES}-byte limit"),
        id="header-over-limit",
    ),
    pytest.param(
        _header_text(lambda t: t.replace(b"__metadata__", b"__metadat\xff\xfe_", 1)),
        ("not valid UTF-8 JSON",), id="header-not-utf8",
    ),
    pytest.param(_header_text(_pad(b"not json")), ("not valid UTF-8 JSON",), id="header-not-json"),
    pytest.param(_header_text(_pad(b"[1, 2]")), ("not a JSON object",), id="header-a-list"),
    pytest.param(_header_text(_pad(b'"text"')), ("not a JSON object",), id="header-a-string"),
    pytest.param(
        _header_text(lambda t: (b"[" * (len(t) // 2)).ljust(len(t))),
        ("not valid UTF-8 JSON",), id="header-nesting-bomb",
    ),
    pytest.param(_edit_header(_shift(1, -4)), ("overlaps",), id="offsets-overlap"),
    pytest.param(_edit_header(_shift(0, 4)), ("leaves a gap",), id="offsets-gap"),
    pytest.param(_edit_header(_shift(-1, 10**9)), ("leaves a gap",), id="offset-out-of-range"),
    pytest.param(
        _edit_header(_set_entry("data_offsets", [-4, 12])), ("data_offsets",), id="offset-negative"
    ),
    pytest.param(
        _edit_header(_set_entry("data_offsets", [0])), ("data_offsets",), id="offsets-not-a-pair"
    ),
    pytest.param(_edit_header(_shrink_shape), ("bytes", "needs"), id="shape-vs-byte-count"),
    pytest.param(
        _edit_header(_set_entry("dtype", "F16")), ("bytes", "needs"), id="dtype-vs-byte-count"
    ),
    pytest.param(
        _edit_header(_set_entry("shape", [2**40, 2**40])), ("bytes", "needs"),
        id="shape-exhausting-memory",
    ),
    pytest.param(_edit_header(_set_entry("shape", "64x64")), ("shape",), id="shape-not-a-list"),
    pytest.param(_edit_header(_set_entry("dtype", "Q4_K")), ("unknown dtype",), id="dtype-unknown"),
    pytest.param(
        _edit_header(_set_entry("dtype", None)), ("unknown dtype",), id="dtype-missing"
    ),
    pytest.param(
        _edit_header(lambda h: h.update({"__metadata__": {"format": 1}})),
        ("__metadata__",), id="metadata-not-strings",
    ),
    pytest.param(_duplicate_name, ("appears twice",), id="duplicate-tensor-name"),
]  # fmt: skip


@pytest.mark.parametrize("which", ["base", "aligned", "adapter"])
@pytest.mark.parametrize(("mutate", "phrases"), MALFORMED)
def test_malformed_safetensors_is_refused_naming_file_and_problem(
    trio: Trio,
    cli: Cli,
    tmp_path: Path,
    which: str,
    mutate: Callable[[Path], None],
    phrases: tuple[str, ...],
) -> None:
    path = target_file(trio, which)
    mutate(path)
    out = tmp_path / "out"
    line = expect_error(cli(trio.patch_args(out, "--quiet")), CORRUPT, *phrases, output=out)
    assert f"{path.parent.name}/{path.name}" in line
    problem = line.split(path.name, 1)[1]
    if " tensor " in problem:  # a tensor-level problem names the tensor too
        assert "tensor '" in problem


def test_truncated_file_is_refused_naming_expected_and_actual_size(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    path = trio.aligned / MODEL
    size = path.stat().st_size
    truncate(path, by=10)
    out = tmp_path / "out"
    line = expect_error(cli(trio.patch_args(out, "--quiet")), CORRUPT, output=out)
    assert str(size) in line
    assert str(size - 10) in line


def test_huge_header_length_is_refused_before_the_header_is_read(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header over the limit is refused from its length field alone, never read into memory."""
    _huge_header(trio.base / MODEL)
    reads: list[int] = []
    real_loads = json.loads

    def spying_loads(text: Any, **kwargs: Any) -> Any:
        reads.append(len(text))
        return real_loads(text, **kwargs)

    monkeypatch.setattr("safelora_cli.inputs.index.json.loads", spying_loads)
    out = tmp_path / "out"
    expect_error(cli(trio.patch_args(out, "--quiet")), CORRUPT, "header length", output=out)
    assert max(reads, default=0) < 1024 * 1024


# --- unsupported dtypes ---------------------------------------------------------------------


def _retype(module: str, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{module}.weight"] = tensors[f"{module}.weight"].to(dtype)

    return edit


def _pack_4bit(module: str) -> Callable[[dict[str, torch.Tensor]], None]:
    """What bitsandbytes stores for a 4-bit weight: uint8, two values a byte, shape (n/2, 1)."""

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        weight = tensors[f"{module}.weight"]
        tensors[f"{module}.weight"] = torch.zeros(weight.numel() // 2, 1, dtype=torch.uint8)

    return edit


@pytest.mark.parametrize(
    ("edit", "both", "phrases"),
    [
        pytest.param(_retype(Q0, torch.int8), False, ("dtype I8", "not supported"), id="int8"),
        pytest.param(
            _retype(Q0, torch.float8_e4m3fn), False, ("dtype F8_E4M3", "not supported"), id="fp8"
        ),
        pytest.param(_pack_4bit(Q0), True, ("dtype U8", "not supported"), id="4bit-both"),
        pytest.param(_pack_4bit(Q0), False, ("differ in shape",), id="4bit-base-only"),
    ],
)
def test_quantized_weight_that_must_be_read_is_refused_naming_it(
    trio: Trio,
    cli: Cli,
    tmp_path: Path,
    edit: Callable[[dict[str, torch.Tensor]], None],
    both: bool,
    phrases: tuple[str, ...],
) -> None:
    for folder in (trio.base, trio.aligned) if both else (trio.base,):
        edit_tensors(folder / MODEL, edit)
    out = tmp_path / "out"
    line = expect_error(cli(trio.patch_args(out, "--quiet")), INCOMPATIBLE, *phrases, output=out)
    assert Q0 in line


def test_integer_lora_factor_is_refused_naming_file_and_module(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    key = lora_key(K0, "lora_A")
    edit_tensors(trio.adapter / WEIGHTS, lambda t: t.update({key: t[key].to(torch.int8)}))
    out = tmp_path / "out"
    expect_error(
        cli(trio.patch_args(out, "--quiet")), INCOMPATIBLE, WEIGHTS, K0, "dtype I8", output=out
    )


def test_quantized_weight_no_module_targets_is_fine(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    """Only tensors that must be read are checked: an int8 embedding no module targets is fine."""
    for folder in (trio.base, trio.aligned):
        edit_tensors(folder / MODEL, _retype("model.embed_tokens", torch.int8))
    out = tmp_path / "out"
    expect_ok(cli(trio.patch_args(out, "--quiet")), out)


# --- the shard index --------------------------------------------------------------------------

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def _edit_index(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        index = json.loads((folder / INDEX).read_text())
        edit(index)
        (folder / INDEX).write_text(json.dumps(index))

    return mutate


def _move_first(to: str) -> Callable[[dict[str, Any]], None]:
    def edit(index: dict[str, Any]) -> None:
        first = sorted(index["weight_map"])[0]
        index["weight_map"][first] = to

    return edit


def _unlist(index: dict[str, Any]) -> None:
    del index["weight_map"][sorted(index["weight_map"])[0]]


def _misplace(index: dict[str, Any]) -> None:
    weight_map = index["weight_map"]
    name = next(k for k, v in sorted(weight_map.items()) if v == SHARD1)
    weight_map[name] = SHARD2


def _write_index_text(text: str) -> Callable[[Path], object]:
    return lambda folder: (folder / INDEX).write_text(text)


@pytest.mark.parametrize(
    ("mutate", "phrases"),
    [
        pytest.param(lambda f: (f / SHARD2).unlink(), (SHARD2, "not in"), id="shard-missing"),
        pytest.param(
            _edit_index(_misplace), (SHARD1, "does not match"), id="tensor-in-other-shard"
        ),
        pytest.param(_edit_index(_unlist), ("does not match", "unlisted"), id="tensor-unlisted"),
        pytest.param(
            _edit_index(lambda i: i.update(weight_map=[1, 2])), ("weight_map",), id="map-a-list"
        ),
        pytest.param(_edit_index(lambda i: i.pop("weight_map")), ("weight_map",), id="no-map"),
        pytest.param(_write_index_text("{not json"), ("not valid JSON",), id="not-json"),
        pytest.param(_write_index_text("[]"), ("not a JSON object",), id="not-an-object"),
    ],
)  # fmt: skip
def test_bad_shard_index_is_refused_naming_the_folder(
    make_trio: TrioFactory,
    cli: Cli,
    tmp_path: Path,
    mutate: Callable[[Path], None],
    phrases: tuple[str, ...],
) -> None:
    trio = make_trio(shards=2)
    mutate(trio.aligned)
    out = tmp_path / "out"
    line = expect_error(cli(trio.patch_args(out, "--quiet")), CORRUPT, *phrases, output=out)
    assert "aligned" in line


@pytest.mark.parametrize(
    "shard",
    ["../aligned/" + SHARD1, "/etc/passwd", "sub/" + SHARD1, "..", "sub\\" + SHARD1, ""],
    ids=["dotdot", "absolute", "separator", "dots", "backslash", "empty"],
)
def test_shard_name_that_is_not_a_plain_file_name_is_refused(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, shard: str
) -> None:
    trio = make_trio(shards=2)
    _edit_index(_move_first(shard))(trio.aligned)
    out = tmp_path / "out"
    line = expect_error(
        cli(trio.patch_args(out, "--quiet")), CORRUPT, "not a plain file name", output=out
    )
    assert "aligned" in line


def test_shard_outside_the_folder_is_never_opened(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid shard one folder up is refused by name, never opened."""
    trio = make_trio(shards=2)
    shutil.copy(trio.aligned / SHARD1, trio.root / SHARD1)
    _edit_index(_move_first("../" + SHARD1))(trio.aligned)
    opened: list[Path] = []
    real, real_os_open = Path.open, os.open

    def spying_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        opened.append(self)
        return real(self, *args, **kwargs)

    def spying_os_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spying_open)
    monkeypatch.setattr(os, "open", spying_os_open)
    out = tmp_path / "out"
    expect_error(cli(trio.patch_args(out, "--quiet")), CORRUPT, "not a plain file name", output=out)
    assert opened  # the spy sees the reads
    assert trio.root / SHARD1 not in opened


# --- pickles are never loaded -----------------------------------------------------------------


class _Tripwire:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize(
    "name", ["pytorch_model.bin", "model.pt", "weights.pth", "model.ckpt", "model.pkl"]
)
def test_base_with_only_pickle_weights_is_refused_without_unpickling(
    trio: Trio, cli: Cli, tmp_path: Path, name: str
) -> None:
    tripwire = tmp_path / "unpickled"
    (trio.base / MODEL).unlink()
    (trio.base / name).write_bytes(pickle.dumps(_Tripwire(tripwire)))
    out = tmp_path / "out"
    expect_error(
        cli(trio.patch_args(out, "--quiet")), INCOMPATIBLE, name, "never unpickles",
        "safe_serialization", output=out,
    )  # fmt: skip
    assert not tripwire.exists()


def test_adapter_with_only_pickle_weights_is_refused_without_unpickling(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    tripwire = tmp_path / "unpickled"
    (trio.adapter / WEIGHTS).unlink()
    (trio.adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Tripwire(tripwire)))
    out = tmp_path / "out"
    expect_error(
        cli(trio.patch_args(out, "--quiet")), INCOMPATIBLE, WEIGHTS, "adapter_model.bin", "pickle",
        output=out,
    )  # fmt: skip
    assert not tripwire.exists()


def test_pickles_beside_safetensors_and_base_model_name_are_ignored(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pickles next to the safetensors are never loaded; base_model_name_or_path never followed."""
    import huggingface_hub

    tripwire = tmp_path / "unpickled"
    payload = pickle.dumps(_Tripwire(tripwire))
    for folder in (trio.base, trio.aligned):
        (folder / "pytorch_model.bin").write_bytes(payload)
    edit_config(
        trio.adapter, base_model_name_or_path="meta-llama/Llama-2-7b-hf", auto_map={"x": "y.Z"}
    )

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"hub contacted: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.setattr(pickle, "load", no_download)
    monkeypatch.setattr(pickle, "loads", no_download)
    monkeypatch.setattr(torch, "load", no_download)
    out = tmp_path / "out"
    report = expect_ok(cli(trio.patch_args(out, "--quiet")), out)
    assert not tripwire.exists()
    assert report["inputs"]["base"]["hub_id"] is None
    assert (out / CONFIG).read_bytes() == (trio.adapter / CONFIG).read_bytes()

"""One test per row of shared/BAD_INPUTS.md: every bad input gets a clear error, nothing is lost.

Each broken input is built from a seeded ``make_trio()`` trio (bytes corrupted, a git-lfs pointer
written, the index or the config edited...), then ``safelora patch`` runs in-process. An error must
be exactly one ``error: ...`` line on stderr naming the file, tensor or flag, with the row's exit
code, nothing on stdout, and neither the output folder nor a staging folder left behind. Rows the
design accepts get tests of the accepted behaviour: exit 0, a valid output and the report's content.

Row 32 (signals) is in test_signals.py, rows 34-35 (hub) in test_hub.py.
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file
from typer.testing import Result

from safelora_cli import pipeline, writer
from safelora_cli.synthetic import LlamaShape
from safelora_cli.writer import STAGE_PREFIX
from tests.conftest import Trio, TrioFactory

Cli = Callable[..., Result]
MODEL = "model.safetensors"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
REPORT = "safelora_report.json"
PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
K0 = "model.layers.0.self_attn.k_proj"
V1 = "model.layers.1.self_attn.v_proj"
DOWN1 = "model.layers.1.mlp.down_proj"


# --- checking a run --------------------------------------------------------------------------


def staging_left(folder: Path) -> list[str]:
    """Staging folders (``.safelora-tmp-*``) left in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(STAGE_PREFIX))


def expect_error(
    result: Result, code: int, *phrases: str, output: Path, output_existed: bool = False
) -> str:
    """Assert a clean failure: exit ``code``, one stderr line with every phrase, nothing left."""
    detail = f"exit {result.exit_code}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.exit_code == code, f"{detail}\nexception: {result.exception!r}"
    assert "Traceback" not in result.stderr, detail
    lines = result.stderr.splitlines()
    assert len(lines) == 1, detail
    line = lines[0]
    assert line.startswith("error: "), detail
    for phrase in phrases:
        assert phrase in line, f"{phrase!r} not in {line!r}"
    assert result.stdout == "", detail
    if not output_existed:
        assert not output.exists(), f"{output} left behind"
        assert not output.is_symlink(), f"{output} left behind"
    assert staging_left(output.parent) == []
    return line


def expect_ok(result: Result, output: Path) -> dict[str, Any]:
    """Assert a clean success and return the report written in ``output``."""
    assert result.exit_code == 0, f"stderr: {result.stderr!r}\nexception: {result.exception!r}"
    assert result.stdout == f"{output}\n"
    assert staging_left(output.parent) == []
    report: dict[str, Any] = json.loads((output / REPORT).read_text())
    tensors = load_file(str(output / WEIGHTS))
    usual = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.dtype in usual)
    return report


def run_patch(cli: Cli, trio: Trio, output: Path, *extra: str) -> Result:
    return cli(trio.patch_args(output, "--quiet", *extra))


# --- building broken inputs ------------------------------------------------------------------


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file as (header dict, data bytes), read by hand."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_raw(
    path: Path, header: dict[str, Any] | bytes, data: bytes, length: int | None = None
) -> None:
    """Write a safetensors file by hand; ``length`` overrides the header length field."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def tensors_by_offset(header: dict[str, Any]) -> list[str]:
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load a safetensors file, let ``edit`` change the dict, save it back."""
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def lora_key(module: str, kind: str) -> str:
    return f"{PREFIX}{module}.{kind}.weight"


def edit_config(trio: Trio, **changes: Any) -> dict[str, Any]:
    path = trio.adapter / CONFIG
    config: dict[str, Any] = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))
    return config


def target_file(trio: Trio, which: str) -> Path:
    return {
        "base": trio.base / MODEL,
        "aligned": trio.aligned / MODEL,
        "adapter": trio.adapter / WEIGHTS,
    }[which]


# --- rows 1-7, 37: malformed safetensors files -----------------------------------------------


def _lfs(path: Path) -> None:
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 123456789\n"
    )


def _set_bytes(data: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(data)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


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
        header, data = read_raw(path)
        edit(header)
        write_raw(path, header, data)

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
    header, data = read_raw(path)
    first = tensors_by_offset(header)[0]
    text = json.dumps(header)
    twice = f", {json.dumps(first)}: {json.dumps(header[first])}}}"
    write_raw(path, (text[:-1] + twice).encode(), data)


def _huge_header(path: Path) -> None:
    """A header length field of 200 MB in a (sparse) file that is really that long."""
    length = 200 * 1024 * 1024
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", length) + b"{")
        fh.truncate(8 + length)


MALFORMED = [
    pytest.param(_lfs, ("git-lfs pointer", "git lfs pull"), id="row01-lfs-pointer"),
    pytest.param(_set_bytes(b""), ("0 bytes", "too short"), id="row02-empty"),
    pytest.param(_set_bytes(b"\x01\x02\x03"), ("3 bytes", "too short"), id="row02-3-bytes"),
    pytest.param(_truncate, ("expected", "the file has"), id="row03-truncated"),
    pytest.param(_append, ("expected", "the file has"), id="row03-extra-bytes"),
    pytest.param(
        _length_field(lambda n: n), ("header length", "past the end"), id="row04-past-end"
    ),
    pytest.param(_length_field(lambda n: 2**63), ("header length",), id="row04-absurd-length"),
    pytest.param(
        _huge_header,
        ("header length", "over the 104857600-byte limit"),
        id="row04-row37-200MB-header",
    ),
    pytest.param(
        _header_text(lambda t: t.replace(b"__metadata__", b"__metadat\xff\xfe_", 1)),
        ("not valid UTF-8 JSON",),
        id="row05-not-utf8",
    ),
    pytest.param(_header_text(_pad(b"not json")), ("not valid UTF-8 JSON",), id="row05-not-json"),
    pytest.param(_header_text(_pad(b"[1, 2]")), ("not a JSON object",), id="row05-not-object"),
    pytest.param(_header_text(_pad(b'"text"')), ("not a JSON object",), id="row05-json-string"),
    pytest.param(
        _header_text(lambda t: (b"[" * (len(t) // 2)).ljust(len(t))),
        ("not valid UTF-8 JSON",),
        id="row05-nesting-bomb",
    ),
    pytest.param(_edit_header(_shift(1, -4)), ("overlaps",), id="row06-overlap"),
    pytest.param(_edit_header(_shift(0, 4)), ("leaves a gap",), id="row06-gap"),
    pytest.param(
        _edit_header(_shift(-1, 10**9)), ("leaves a gap",), id="row06-offset-out-of-range"
    ),
    pytest.param(
        _edit_header(_set_entry("data_offsets", [-4, 12])), ("data_offsets",), id="row06-negative"
    ),
    pytest.param(
        _edit_header(_set_entry("data_offsets", [0])), ("data_offsets",), id="row06-not-pair"
    ),
    pytest.param(_edit_header(_shrink_shape), ("bytes", "needs"), id="row06-shape-vs-bytes"),
    pytest.param(
        _edit_header(_set_entry("dtype", "F16")), ("bytes", "needs"), id="row06-dtype-vs-bytes"
    ),
    pytest.param(
        _edit_header(_set_entry("shape", [2**40, 2**40])),
        ("bytes", "needs"),
        id="row06-row37-huge-shape",
    ),
    pytest.param(_edit_header(_set_entry("shape", "64x64")), ("shape",), id="row06-shape-type"),
    pytest.param(_edit_header(_set_entry("dtype", "Q4_K")), ("unknown dtype",), id="row06-dtype"),
    pytest.param(
        _edit_header(_set_entry("dtype", None)), ("unknown dtype",), id="row06-dtype-missing"
    ),
    pytest.param(
        _edit_header(lambda h: h.update({"__metadata__": {"format": 1}})),
        ("__metadata__",),
        id="row06-metadata-type",
    ),
    pytest.param(_duplicate_name, ("appears twice",), id="row07-duplicate-name"),
]


@pytest.mark.parametrize("which", ["base", "aligned", "adapter"])
@pytest.mark.parametrize(("mutate", "phrases"), MALFORMED)
def test_malformed_safetensors_exit_3(
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
    line = expect_error(run_patch(cli, trio, out), 3, *phrases, output=out)
    assert f"{path.parent.name}/{path.name}" in line
    problem = line.split(path.name, 1)[1]
    if " tensor " in problem:  # a tensor-level problem names the tensor too
        assert "tensor '" in problem


def test_row04_header_length_checked_before_reading(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 200 MB header is refused from its length field alone, never read into memory."""
    _huge_header(trio.base / MODEL)
    reads: list[int] = []
    real_loads = json.loads

    def spying_loads(text: Any, **kwargs: Any) -> Any:
        reads.append(len(text))
        return real_loads(text, **kwargs)

    monkeypatch.setattr("safelora_cli.index.json.loads", spying_loads)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 3, "header length", output=out)
    assert max(reads, default=0) < 1024 * 1024


# --- row 8: unsupported dtypes ---------------------------------------------------------------


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
def test_row08_unsupported_dtype_in_read_weight_exit_4(
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
    line = expect_error(run_patch(cli, trio, out), 4, *phrases, output=out)
    assert Q0 in line


def test_row08_unsupported_dtype_in_adapter_exit_4(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    key = lora_key(K0, "lora_A")
    edit_tensors(trio.adapter / WEIGHTS, lambda t: t.update({key: t[key].to(torch.int8)}))
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 4, WEIGHTS, K0, "dtype I8", output=out)


def test_row08_quantized_weight_not_read_is_fine(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    """Only tensors that must be read are checked: an int8 embedding no module targets is fine."""
    for folder in (trio.base, trio.aligned):
        edit_tensors(folder / MODEL, _retype("model.embed_tokens", torch.int8))
    out = tmp_path / "out"
    expect_ok(run_patch(cli, trio, out), out)


# --- rows 9-10: the shard index --------------------------------------------------------------

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


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
        pytest.param(lambda f: (f / SHARD2).unlink(), (SHARD2, "not in"), id="row09-missing-shard"),
        pytest.param(_edit_index(_misplace), (SHARD1, "does not match"), id="row09-wrong-shard"),
        pytest.param(_edit_index(_unlist), ("does not match", "unlisted"), id="row09-unlisted"),
        pytest.param(
            _edit_index(lambda i: i.update(weight_map=[1, 2])), ("weight_map",), id="row09-not-map"
        ),
        pytest.param(_edit_index(lambda i: i.pop("weight_map")), ("weight_map",), id="row09-none"),
        pytest.param(_write_index_text("{not json"), ("not valid JSON",), id="row09-not-json"),
        pytest.param(_write_index_text("[]"), ("not a JSON object",), id="row09-not-object"),
        pytest.param(
            _edit_index(_move_first("../aligned/" + SHARD1)),
            ("not a plain file name",),
            id="row10-dotdot",
        ),
        pytest.param(
            _edit_index(_move_first("/etc/passwd")), ("not a plain file name",), id="row10-absolute"
        ),
        pytest.param(
            _edit_index(_move_first("sub/" + SHARD1)), ("not a plain file name",), id="row10-sep"
        ),
        pytest.param(_edit_index(_move_first("..")), ("not a plain file name",), id="row10-dots"),
        pytest.param(
            _edit_index(_move_first("sub\\" + SHARD1)),
            ("not a plain file name",),
            id="row10-backslash",
        ),
        pytest.param(_edit_index(_move_first("")), ("not a plain file name",), id="row10-empty"),
    ],
)
def test_rows09_10_bad_shard_index_exit_3(
    make_trio: TrioFactory,
    cli: Cli,
    tmp_path: Path,
    mutate: Callable[[Path], None],
    phrases: tuple[str, ...],
) -> None:
    trio = make_trio(shards=2)
    mutate(trio.aligned)
    out = tmp_path / "out"
    line = expect_error(run_patch(cli, trio, out), 3, *phrases, output=out)
    assert "aligned" in line


def test_row10_shard_outside_folder_is_never_opened(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid shard one folder up is refused by name, never opened."""
    trio = make_trio(shards=2)
    shutil.copy(trio.aligned / SHARD1, trio.root / SHARD1)
    _edit_index(_move_first("../" + SHARD1))(trio.aligned)
    opened: list[Path] = []
    real = Path.open

    def spying_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        opened.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spying_open)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 3, "not a plain file name", output=out)
    assert trio.root / SHARD1 not in opened


# --- rows 11, 36: pickle weights are never loaded --------------------------------------------


class _Tripwire:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize(
    "name", ["pytorch_model.bin", "model.pt", "weights.pth", "model.ckpt", "model.pkl"]
)
def test_row11_base_with_only_pickle_weights_exit_4(
    trio: Trio, cli: Cli, tmp_path: Path, name: str
) -> None:
    tripwire = tmp_path / "unpickled"
    (trio.base / MODEL).unlink()
    (trio.base / name).write_bytes(pickle.dumps(_Tripwire(tripwire)))
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out), 4, name, "never unpickles", "safe_serialization", output=out
    )
    assert not tripwire.exists()


def test_row11_adapter_with_only_pickle_weights_exit_4(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    tripwire = tmp_path / "unpickled"
    (trio.adapter / WEIGHTS).unlink()
    (trio.adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Tripwire(tripwire)))
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 4, WEIGHTS, "adapter_model.bin", "pickle", output=out)
    assert not tripwire.exists()


def test_row36_pickles_beside_safetensors_and_base_model_name_are_ignored(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pickles next to the safetensors are never loaded; base_model_name_or_path never followed."""
    import huggingface_hub

    tripwire = tmp_path / "unpickled"
    payload = pickle.dumps(_Tripwire(tripwire))
    for folder in (trio.base, trio.aligned):
        (folder / "pytorch_model.bin").write_bytes(payload)
    edit_config(trio, base_model_name_or_path="meta-llama/Llama-2-7b-hf", auto_map={"x": "y.Z"})

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"hub contacted: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.setattr(pickle, "load", no_download)
    monkeypatch.setattr(pickle, "loads", no_download)
    monkeypatch.setattr(torch, "load", no_download)
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out), out)
    assert not tripwire.exists()
    assert report["inputs"]["base"]["hub_id"] is None


# --- row 12: adapter folder incomplete --------------------------------------------------------


@pytest.mark.parametrize(
    ("missing", "phrases"),
    [
        pytest.param(CONFIG, (f"no {CONFIG}", "save_pretrained"), id="config"),
        pytest.param(WEIGHTS, (f"no {WEIGHTS}", "save_pretrained"), id="weights"),
    ],
)
def test_row12_adapter_file_missing_exit_4(
    trio: Trio, cli: Cli, tmp_path: Path, missing: str, phrases: tuple[str, ...]
) -> None:
    (trio.adapter / missing).unlink()
    out = tmp_path / "out"
    line = expect_error(run_patch(cli, trio, out), 4, *phrases, output=out)
    assert "adapter" in line


def test_row12_adapter_path_that_is_a_file_exit_2(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = trio.patch_args(out, "--quiet")
    args[1] = str(trio.adapter / WEIGHTS)
    expect_error(cli(args), 2, "ADAPTER", "is a file", output=out)


# --- row 13: unpaired factors, rank mismatch -------------------------------------------------


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[key]

    return edit


@pytest.mark.parametrize(
    ("edit", "phrases"),
    [
        pytest.param(
            _drop(lora_key(V1, "lora_B")), (V1, "has lora_A but no lora_B"), id="A-without-B"
        ),
        pytest.param(
            _drop(lora_key(V1, "lora_A")), (V1, "has lora_B but no lora_A"), id="B-without-A"
        ),
        pytest.param(
            lambda t: t.update({lora_key(V1, "lora_B"): t[lora_key(V1, "lora_B")][:, :3].clone()}),
            (V1, "disagree on the rank"),
            id="A-B-rank-differ",
        ),
    ],
)
def test_row13_unpaired_or_misranked_factors_exit_4(
    trio: Trio,
    cli: Cli,
    tmp_path: Path,
    edit: Callable[[dict[str, torch.Tensor]], None],
    phrases: tuple[str, ...],
) -> None:
    edit_tensors(trio.adapter / WEIGHTS, edit)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 4, WEIGHTS, *phrases, output=out)


def test_row13_rank_not_matching_r_exit_4(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    edit_config(trio, r=8)
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out), 4, "rank 4 in the file, 8 in adapter_config.json", output=out
    )


# --- row 14: key variants, several adapters --------------------------------------------------


@pytest.mark.parametrize(
    ("key_prefix", "adapter_name"),
    [("", ""), ("base_model.model.", "default"), ("", "default")],
    ids=["no-prefix", "default-name", "no-prefix-default-name"],
)
def test_row14_key_variants_accepted(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, key_prefix: str, adapter_name: str
) -> None:
    trio = make_trio(key_prefix=key_prefix, adapter_name=adapter_name)
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out), out)
    assert sorted(m["module"] for m in report["modules"]) == sorted(trio.modules)
    assert report["summary"]["projected"] == 10
    assert report["passthrough"] == []
    original = load_file(str(trio.adapter / WEIGHTS))
    assert load_file(str(out / WEIGHTS)).keys() == original.keys()  # keys kept as they were


def _add_second_adapter(trio: Trio) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.startswith(PREFIX + "model.layers.0.")]:
            other = key.replace(".default.", ".other.")
            tensors[other] = tensors[key].clone()

    edit_tensors(trio.adapter / WEIGHTS, edit)


def test_row14_several_adapters_exit_4_unless_one_is_chosen(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    trio = make_trio(adapter_name="default")
    _add_second_adapter(trio)
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out), 4, WEIGHTS, "several adapters", "default, other",
        "--adapter-name", output=out,
    )  # fmt: skip

    report = expect_ok(run_patch(cli, trio, out, "--adapter-name", "default"), out)
    assert sorted(m["module"] for m in report["modules"]) == sorted(trio.modules)
    assert report["passthrough"]
    assert all(".other." in k for k in report["passthrough"])
    before, after = load_file(str(trio.adapter / WEIGHTS)), load_file(str(out / WEIGHTS))
    for key in report["passthrough"]:
        assert torch.equal(before[key], after[key])


def test_row14_adapter_name_not_in_file_exit_4(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    trio = make_trio(adapter_name="default")
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out, "--adapter-name", "nope"), 4, "--adapter-name nope", "default",
        output=out,
    )  # fmt: skip


# --- row 15: wrong model pair ----------------------------------------------------------------


def test_row15_modules_missing_from_both_models_listed_with_count(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    def rename(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            tensors[key.replace("layers.", "layers.1")] = tensors.pop(key)

    edit_tensors(trio.adapter / WEIGHTS, rename)
    out = tmp_path / "out"
    line = expect_error(
        run_patch(cli, trio, out), 4,
        "14 adapter module(s) have no weight in the base model",
        "14 adapter module(s) have no weight in the aligned model",
        "model.layers.10.mlp.down_proj.weight", ", ...", "--base and --aligned",
        output=out,
    )  # fmt: skip
    assert line.count("model.layers.1") <= 2 * 5 + 2  # the first few, not all 14


def test_row15_module_missing_from_aligned_only(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    edit_tensors(trio.aligned / MODEL, _drop(f"{Q0}.weight"))
    out = tmp_path / "out"
    line = expect_error(
        run_patch(cli, trio, out), 4,
        f"1 adapter module(s) have no weight in the aligned model ({Q0}.weight)", output=out,
    )  # fmt: skip
    assert "base model" not in line


# --- rows 16-17: shapes ----------------------------------------------------------------------


def test_row16_base_and_aligned_shapes_differ_exit_4(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    edit_tensors(trio.aligned / MODEL, lambda t: t.update({f"{Q0}.weight": torch.randn(72, 64)}))
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out), 4, Q0, "base [64, 64]", "aligned [72, 64]", "differ in shape",
        output=out,
    )  # fmt: skip


def test_row16_resized_vocabulary_exit_4(make_trio: TrioFactory, cli: Cli, tmp_path: Path) -> None:
    trio = make_trio()
    _add_lm_head_lora(trio)
    edit_tensors(trio.aligned / MODEL, lambda t: t.update({"lm_head.weight": torch.randn(130, 64)}))
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 4, "lm_head", "differ in shape", output=out)


def test_row17_factors_not_matching_base_exit_4(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    key = lora_key(K0, "lora_A")
    edit_tensors(trio.adapter / WEIGHTS, lambda t: t.update({key: torch.randn(4, 48)}))
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out), 4, K0, "lora_B @ lora_A is [32, 48]",
        "base weight is [32, 64]", output=out,
    )  # fmt: skip


def test_row17_fan_in_fan_out_with_untransposed_base_exit_4(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    edit_config(trio, fan_in_fan_out=True)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 4, K0, "fan_in_fan_out", output=out)


def test_row17_fan_in_fan_out_with_transposed_base_accepted(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    """GPT-2 style (in, out) weights with fan_in_fan_out give the same scores as (out, in)."""
    plain, transposed = make_trio(), make_trio()
    for folder in (transposed.base, transposed.aligned):
        edit_tensors(
            folder / MODEL,
            lambda t: t.update({k: v.T.contiguous() for k, v in t.items() if v.dim() == 2}),
        )
    edit_config(transposed, fan_in_fan_out=True)
    a, b = tmp_path / "a", tmp_path / "b"
    report_a = expect_ok(run_patch(cli, plain, a), a)
    report_b = expect_ok(run_patch(cli, transposed, b), b)
    assert all(m["transposed"] for m in report_b["modules"])
    cos_a = [m["cosine"] for m in report_a["modules"]]
    cos_b = [m["cosine"] for m in report_b["modules"]]
    assert cos_a == pytest.approx(cos_b, rel=1e-5)


# --- row 18: DoRA ----------------------------------------------------------------------------


def test_row18_dora_refused_exit_4(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    edit_config(trio, use_dora=True)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 4, CONFIG, "DoRA", "use_dora", output=out)


def test_row18_dora_magnitude_vectors_without_use_dora_exit_4(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    """DoRA weights with a config that says use_dora: false must not be projected as plain LoRA."""
    key = f"{PREFIX}{Q0}.lora_magnitude_vector.weight"
    edit_tensors(trio.adapter / WEIGHTS, lambda t: t.update({key: torch.ones(64)}))
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 4, WEIGHTS, "lora_magnitude_vector", output=out)


# --- row 19: non-LoRA tensors ----------------------------------------------------------------

PASSTHROUGH = {
    f"{PREFIX}lm_head.modules_to_save.default.weight": torch.randn(128, 64),
    f"{PREFIX}model.embed_tokens.lora_embedding_A": torch.randn(4, 128),
    f"{PREFIX}model.embed_tokens.lora_embedding_B": torch.randn(64, 4),
    f"{PREFIX}{Q0}.lora_B.bias": torch.randn(64),
    f"{PREFIX}model.embed_tokens.token_adapter.trainable_tokens_delta": torch.randn(3, 64),
    f"{PREFIX}model.norm.weight": torch.randn(64).to(torch.bfloat16),
}


def test_row19_non_lora_tensors_copied_through_and_listed(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    edit_tensors(trio.adapter / WEIGHTS, lambda t: t.update(PASSTHROUGH))
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out, "--select", "threshold", "--threshold", "1"), out)
    assert report["passthrough"] == sorted(PASSTHROUGH)
    assert report["summary"]["projected"] == len(trio.modules)
    assert sorted(m["module"] for m in report["modules"]) == sorted(trio.modules)
    after = load_file(str(out / WEIGHTS))
    for key, tensor in PASSTHROUGH.items():
        assert after[key].dtype == tensor.dtype
        assert torch.equal(after[key], tensor)


def test_row19_passthrough_in_exotic_dtypes_kept_byte_for_byte(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    """fp8, packed fp4 and int8 tensors nobody projects: copied through, header and bytes."""
    exotic = {
        f"{PREFIX}model.embed_tokens.fp4": torch.arange(8, dtype=torch.uint8)
        .view(torch.float4_e2m1fn_x2)
        .reshape(4, 2),
        f"{PREFIX}model.embed_tokens.fp8": torch.ones(3).to(torch.float8_e4m3fn),
        f"{PREFIX}model.embed_tokens.int8": torch.arange(5, dtype=torch.int8),
    }
    edit_tensors(trio.adapter / WEIGHTS, lambda t: t.update(exotic))
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out), out)
    assert report["passthrough"] == sorted(exotic)
    (before, data_before), (after, data_after) = (
        read_raw(trio.adapter / WEIGHTS),
        read_raw(out / WEIGHTS),
    )
    for key in exotic:
        start, stop = before[key]["data_offsets"]
        new_start, new_stop = after[key]["data_offsets"]
        assert (after[key]["dtype"], after[key]["shape"]) == (
            before[key]["dtype"],
            before[key]["shape"],
        )
        assert data_after[new_start:new_stop] == data_before[start:stop]


# --- row 20: config variants -----------------------------------------------------------------

CONFIG_VARIANTS = {
    "regex-targets": {"target_modules": r".*\.(q_proj|k_proj|v_proj|o_proj|\w+_proj)$"},
    "all-linear": {"target_modules": "all-linear"},
    "layers-to-transform": {"layers_to_transform": [0, 1], "layers_pattern": "layers"},
    "rslora": {"use_rslora": True},
    "alpha-pattern": {"alpha_pattern": {"q_proj": 64, r"model\.layers\.1\..*": 3.5}},
    "unknown-keys": {"my_tool": {"nested": [1, 2, {"x": None}]}, "lora_bias": False, "é": "ü"},
}


@pytest.mark.parametrize("changes", CONFIG_VARIANTS.values(), ids=CONFIG_VARIANTS.keys())
def test_row20_config_variants_accepted_and_config_kept(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, changes: dict[str, Any]
) -> None:
    """The projection does not depend on the scaling: same scores, config kept byte for byte."""
    plain, variant = make_trio(), make_trio()
    config_path = variant.adapter / CONFIG
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config, indent=3, ensure_ascii=False) + "\n\n")
    a, b = tmp_path / "plain", tmp_path / "variant"
    report_a = expect_ok(run_patch(cli, plain, a), a)
    report_b = expect_ok(run_patch(cli, variant, b), b)
    assert (b / CONFIG).read_bytes() == config_path.read_bytes()
    assert [m["cosine"] for m in report_a["modules"]] == [m["cosine"] for m in report_b["modules"]]
    assert [m["projected"] for m in report_a["modules"]] == [
        m["projected"] for m in report_b["modules"]
    ]


def _rerank(modules: list[str], rank: int) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        gen = torch.Generator().manual_seed(7)
        for module in modules:
            a, b = tensors[lora_key(module, "lora_A")], tensors[lora_key(module, "lora_B")]
            tensors[lora_key(module, "lora_A")] = torch.randn(rank, a.shape[1], generator=gen)
            tensors[lora_key(module, "lora_B")] = torch.randn(b.shape[0], rank, generator=gen)

    return edit


@pytest.mark.parametrize(
    "pattern",
    ["q_proj", "model.layers.0.self_attn.q_proj", r".*\.q_proj", "self_attn.q_proj"],
)
def test_row20_rank_pattern_honoured(trio: Trio, cli: Cli, tmp_path: Path, pattern: str) -> None:
    q_modules = [m for m in trio.modules if m.endswith("q_proj")]
    if pattern == "model.layers.0.self_attn.q_proj":
        q_modules = [Q0]
    edit_tensors(trio.adapter / WEIGHTS, _rerank(q_modules, 8))
    edit_config(trio, rank_pattern={pattern: 8})
    before = (trio.adapter / CONFIG).read_bytes()
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out), out)
    ranks = {m["module"]: m["rank"] for m in report["modules"]}
    assert {m for m, r in ranks.items() if r == 8} == set(q_modules)
    assert (out / CONFIG).read_bytes() == before


@pytest.mark.parametrize(
    ("rank_pattern", "phrases"),
    [
        pytest.param({"q_proj": 8}, (Q0, "rank 4 in the file, 8"), id="pattern-says-8"),
        pytest.param({"k_proj": 16, "q_proj": 4}, (K0, "rank 4 in the file, 16"), id="other"),
    ],
)
def test_row20_rank_pattern_mismatch_exit_4(
    trio: Trio, cli: Cli, tmp_path: Path, rank_pattern: dict[str, int], phrases: tuple[str, ...]
) -> None:
    edit_config(trio, rank_pattern=rank_pattern)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 4, "rank_pattern", *phrases, output=out)


# --- row 21: tied embeddings -----------------------------------------------------------------


def _add_lm_head_lora(trio: Trio, rank: int = 4) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        gen = torch.Generator().manual_seed(3)
        vocab, hidden = trio.shape.vocab, trio.shape.hidden
        tensors[lora_key("lm_head", "lora_A")] = torch.randn(rank, hidden, generator=gen)
        tensors[lora_key("lm_head", "lora_B")] = torch.randn(vocab, rank, generator=gen)

    edit_tensors(trio.adapter / WEIGHTS, edit)


def test_row21_tied_embeddings_use_embed_tokens(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    trio = make_trio(shape=LlamaShape(tie_embeddings=True))
    _add_lm_head_lora(trio)
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out), out)
    [entry] = [m for m in report["modules"] if m["module"] == "lm_head"]
    assert entry["tied"] is True
    assert entry["weight"] == "model.embed_tokens.weight"
    assert entry["cosine"] is not None
    assert not any(m["tied"] for m in report["modules"] if m["module"] != "lm_head")


# --- row 22: adapter_config.json broken ------------------------------------------------------


def _config_text(text: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(text)


def _config_change(**changes: Any) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    return mutate


def _huge_config(path: Path) -> None:
    with path.open("ab") as fh:
        fh.truncate(60 * 1024 * 1024)


CONFIG_FAULTS = [
    pytest.param(_config_text(b"[1, 2]"), ("not a JSON object",), id="list"),
    pytest.param(_config_text(b"null"), ("not a JSON object",), id="null"),
    pytest.param(_config_text(b'{"r": 4,'), ("not valid JSON",), id="not-json"),
    pytest.param(_config_text(b""), ("not valid JSON",), id="empty"),
    pytest.param(_config_text(b'{"r": "\xff"}'), ("not valid JSON",), id="not-utf8"),
    pytest.param(_config_text(b'{"r": 4, "r": 8}'), ("'r' twice",), id="duplicate-key"),
    pytest.param(_huge_config, ("bytes, more than",), id="huge"),
    pytest.param(_config_change(r="4"), ("'r'",), id="r-string"),
    pytest.param(_config_change(r=0), ("'r'",), id="r-zero"),
    pytest.param(_config_change(r=True), ("'r'",), id="r-bool"),
    pytest.param(_config_change(r=4.0), ("'r'",), id="r-float"),
    pytest.param(_config_change(peft_type="PREFIX_TUNING"), ("peft_type",), id="peft-type"),
    pytest.param(_config_change(use_dora="no"), ("'use_dora'",), id="use-dora-string"),
    pytest.param(_config_change(fan_in_fan_out=1), ("'fan_in_fan_out'",), id="fifo-int"),
    pytest.param(_config_change(use_rslora=None), ("'use_rslora'",), id="rslora-null"),
    pytest.param(_config_change(rank_pattern=[8]), ("'rank_pattern'",), id="rank-pattern-list"),
    pytest.param(
        _config_change(rank_pattern={"q_proj": "eight"}), ("'rank_pattern'",), id="rank-value"
    ),
    pytest.param(_config_change(rank_pattern={"q_proj": 0}), ("'rank_pattern'",), id="rank-0"),
    pytest.param(
        _config_change(rank_pattern={"q_proj(": 4}), ("'rank_pattern'", "q_proj("), id="rank-regex"
    ),
    pytest.param(_config_change(alpha_pattern="x"), ("'alpha_pattern'",), id="alpha-pattern-str"),
    pytest.param(
        _config_change(alpha_pattern={"q_proj": "big"}), ("'alpha_pattern'",), id="alpha-value"
    ),
    pytest.param(_config_change(lora_alpha="16"), ("'lora_alpha'",), id="lora-alpha-string"),
    pytest.param(
        _config_text(b'{"r": 4, "lora_alpha": NaN}'), ("lora_alpha is nan",), id="lora-alpha-nan"
    ),
    pytest.param(_config_change(target_modules=7), ("'target_modules'",), id="targets-int"),
    pytest.param(
        _config_change(target_modules=["q_proj", 3]), ("'target_modules'",), id="targets-mixed"
    ),
]


@pytest.mark.parametrize(("mutate", "phrases"), CONFIG_FAULTS)
def test_row22_bad_adapter_config_exit_4(
    trio: Trio, cli: Cli, tmp_path: Path, mutate: Callable[[Path], None], phrases: tuple[str, ...]
) -> None:
    mutate(trio.adapter / CONFIG)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 4, CONFIG, *phrases, output=out)


# --- rows 23-26: numbers ---------------------------------------------------------------------


def test_row23_identical_layer_skipped_with_reason(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    trio = make_trio(identical=(Q0, DOWN1))
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out, "--select", "threshold", "--threshold", "1"), out)
    skipped = {m["module"]: m for m in report["modules"] if m["skipped"]}
    assert set(skipped) == {Q0, DOWN1}
    for entry in skipped.values():
        assert entry["skipped"] == "base and aligned identical"
        assert (entry["cosine"], entry["projected"], entry["v_norm"]) == (None, False, 0.0)
    assert report["summary"]["skipped"] == 2
    assert report["summary"]["projected"] == len(trio.modules) - 2
    before, after = load_file(str(trio.adapter / WEIGHTS)), load_file(str(out / WEIGHTS))
    assert torch.equal(before[lora_key(Q0, "lora_B")], after[lora_key(Q0, "lora_B")])


@pytest.mark.parametrize("factor", ["lora_B", "lora_A"])
def test_row24_zero_delta_skipped_as_no_op(
    trio: Trio, cli: Cli, tmp_path: Path, factor: str
) -> None:
    key = lora_key(K0, factor)
    edit_tensors(trio.adapter / WEIGHTS, lambda t: t.update({key: torch.zeros_like(t[key])}))
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out, "--select", "threshold", "--threshold", "1"), out)
    [entry] = [m for m in report["modules"] if m["skipped"]]
    assert entry["module"] == K0
    assert entry["skipped"] == "LoRA delta is zero"
    assert (entry["cosine"], entry["projected"]) == (None, False)
    before, after = load_file(str(trio.adapter / WEIGHTS)), load_file(str(out / WEIGHTS))
    assert torch.equal(before[lora_key(K0, "lora_B")], after[lora_key(K0, "lora_B")])


def _poison(value: float, key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensor = tensors[key]
        tensor.view(-1)[tensor.numel() // 2] = value

    return edit


@pytest.mark.parametrize(
    ("which", "key", "value"),
    [
        pytest.param("base", f"{Q0}.weight", float("nan"), id="nan-base"),
        pytest.param("aligned", f"{DOWN1}.weight", float("inf"), id="inf-aligned"),
        pytest.param("adapter", lora_key(V1, "lora_A"), float("nan"), id="nan-lora-A"),
        pytest.param("adapter", lora_key(V1, "lora_B"), float("-inf"), id="inf-lora-B"),
    ],
)
def test_row25_nan_inf_in_read_tensor_exit_5(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, which: str, key: str, value: float
) -> None:
    trio = make_trio(dtype=torch.bfloat16)
    path = target_file(trio, which)
    edit_tensors(path, _poison(value, key))
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out), 5, f"{path.parent.name}/{path.name}", key, "NaN or Inf",
        output=out,
    )  # fmt: skip


def test_row25_nan_in_unread_tensor_is_fine(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    edit_tensors(trio.base / MODEL, _poison(float("nan"), "model.embed_tokens.weight"))
    out = tmp_path / "out"
    expect_ok(run_patch(cli, trio, out), out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_row26_half_precision_inputs_accepted_in_their_dtype(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, dtype: torch.dtype
) -> None:
    half, full = make_trio(dtype=dtype), make_trio(dtype=dtype, adapter_dtype=torch.float32)
    out, ref = tmp_path / "half", tmp_path / "full"
    report = expect_ok(run_patch(cli, half, out), out)
    expect_ok(run_patch(cli, full, ref), ref)
    before, after = load_file(str(half.adapter / WEIGHTS)), load_file(str(out / WEIGHTS))
    assert {t.dtype for t in after.values()} == {dtype}
    projected = {m["module"] for m in report["modules"] if m["projected"]}
    assert len(projected) == 10
    for module in half.modules:
        assert torch.equal(before[lora_key(module, "lora_A")], after[lora_key(module, "lora_A")])
        same = torch.equal(before[lora_key(module, "lora_B")], after[lora_key(module, "lora_B")])
        assert same == (module not in projected)
    # the math ran in fp32: the result is the fp32 adapter's, rounded once to the half dtype
    reference = load_file(str(ref / WEIGHTS))
    for module in projected:
        key = lora_key(module, "lora_B")
        torch.testing.assert_close(
            after[key].float(), reference[key], rtol=2e-2, atol=2e-3, check_dtype=False
        )


def test_row26_fp16_overflow_of_projected_b_exit_5(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    """Ĉ B = V (Vᵀ B)/‖V‖ can exceed fp16's range: refused, never written as inf."""
    big = 60000.0
    edit_tensors(trio.base / MODEL, lambda t: t.update({f"{Q0}.weight": torch.zeros(64, 64)}))
    edit_tensors(
        trio.aligned / MODEL, lambda t: t.update({f"{Q0}.weight": torch.full((64, 64), big)})
    )
    edit_tensors(
        trio.adapter / WEIGHTS,
        lambda t: t.update({k: (v + 8 if ".lora_B" in k else v).half() for k, v in t.items()}),
    )
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out, "--select", "threshold", "--threshold", "1"), 5,
        lora_key(Q0, "lora_B"), "not finite in float16", output=out,
    )  # fmt: skip


# --- row 27: selection flags -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        pytest.param(["--num-layers", "15"], "--num-layers 15", id="k-above-modules"),
        pytest.param(["--num-layers", "0"], "--num-layers 0", id="k-zero"),
        pytest.param(["--num-layers", "-3"], "--num-layers -3", id="k-negative"),
        pytest.param(["--select", "threshold", "--threshold", "1.5"], "--threshold", id="t-big"),
        pytest.param(["--select", "threshold", "--threshold", "-1.01"], "--threshold", id="t-low"),
        pytest.param(["--select", "threshold", "--threshold", "nan"], "--threshold", id="t-nan"),
        pytest.param(["--select", "lowest"], "--select", id="select-mode"),
        pytest.param(["--projection", "orthogonal"], "--projection", id="projection"),
        pytest.param(["--projection", "subspace"], "--rank", id="subspace-no-rank"),
        pytest.param(["--projection", "subspace", "--rank", "0"], "--rank", id="rank-zero"),
        pytest.param(["--projection", "subspace", "--energy", "1.5"], "--energy", id="energy"),
        pytest.param(["--device", "tpu"], "--device", id="device"),
        pytest.param(["--device", "cuda:7"], "--device", id="device-missing"),
    ],
)
def test_row27_bad_flags_exit_2(
    trio: Trio, cli: Cli, tmp_path: Path, flags: list[str], named: str
) -> None:
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out, *flags), 2, named, output=out)


# --- rows 28-31, 38: the output folder -------------------------------------------------------


def test_row28_non_empty_output_exit_6_untouched(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    expect_error(
        run_patch(cli, trio, out), 6, str(out), "not empty", "--force",
        output=out, output_existed=True,
    )  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    expect_ok(run_patch(cli, trio, out, "--force"), out)
    assert (out / "notes.txt").read_text() == "mine"


def test_row28_empty_output_folder_is_used(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    expect_ok(run_patch(cli, trio, out), out)


@pytest.mark.parametrize("inside", ["adapter", "adapter/sub", "base", "aligned/x/y"])
def test_row29_output_inside_an_input_exit_6(
    trio: Trio, cli: Cli, tmp_path: Path, inside: str
) -> None:
    out = trio.root / inside
    before = {p: p.read_bytes() for p in trio.root.rglob("*") if p.is_file()}
    line = expect_error(
        run_patch(cli, trio, out, "--force"), 6, "--output", "inside the input folder",
        output=out, output_existed=out.exists(),
    )  # fmt: skip
    assert inside.split("/")[0] in line
    assert {p: p.read_bytes() for p in trio.root.rglob("*") if p.is_file()} == before


def test_row29_output_is_a_file_exit_6(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    expect_error(
        run_patch(cli, trio, out, "--force"), 6, str(out), "not a folder",
        output=out, output_existed=True,
    )  # fmt: skip
    assert out.read_text() == "a file"


def test_row30_parent_missing_exit_6(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "missing" / "out"
    expect_error(run_patch(cli, trio, out), 6, "--output", "missing", "does not exist", output=out)
    assert not out.parent.exists()


@pytest.mark.skipif(
    not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
    reason="root writes anywhere: permissions cannot be tested as root",
)
def test_row30_parent_not_writable_exit_6(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        out = parent / "out"
        expect_error(run_patch(cli, trio, out), 6, "--output", str(parent), output=out)
    finally:
        parent.chmod(0o700)


def test_row30_staging_not_creatable_exit_6(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same failure as a read-only parent, as root sees it: creating the staging folder."""

    def refused(self: Path, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 6, "--output", "Permission denied", output=out)


def _disk_full_in_save_file(stage_files: list[Path]) -> Callable[..., None]:
    """safetensors' save_file on a full disk: a partial file, then its own (non-OSError) error."""

    def save(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        path = Path(filename)
        path.write_bytes(b"partial")
        stage_files.append(path)
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    return save


def test_row31_disk_full_writing_weights_exit_6(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial: list[Path] = []
    monkeypatch.setattr(writer, "save_file", _disk_full_in_save_file(partial))
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 6, str(out), "disk full", output=out)
    assert partial
    assert not any(p.exists() for p in partial)


def test_row31_disk_full_writing_report_exit_6(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_dump = json.dump

    def dump(value: Any, fh: Any, **kwargs: Any) -> None:
        real_dump({"partial": True}, fh)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", dump)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), 6, str(out), "disk full", output=out)


def test_row31_disk_full_with_force_keeps_existing_files(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / WEIGHTS).write_bytes(b"previous run")
    monkeypatch.setattr(writer, "save_file", _disk_full_in_save_file([]))
    expect_error(
        run_patch(cli, trio, out, "--force"), 6, "disk full", output=out, output_existed=True
    )
    assert [p.name for p in out.iterdir()] == [WEIGHTS]
    assert (out / WEIGHTS).read_bytes() == b"previous run"


@pytest.mark.parametrize("where", ["elsewhere", "dangling", "into-input"])
def test_row38_output_symlink_exit_6(trio: Trio, cli: Cli, tmp_path: Path, where: str) -> None:
    target = {
        "elsewhere": tmp_path / "real",
        "dangling": tmp_path / "nowhere",
        "into-input": trio.adapter,
    }[where]
    if where == "elsewhere":
        target.mkdir()
    out = tmp_path / "out"
    out.symlink_to(target, target_is_directory=True)
    expect_error(
        run_patch(cli, trio, out, "--force"), 6, str(out), "symlink",
        output=out, output_existed=True,
    )  # fmt: skip
    assert out.is_symlink()
    if where == "elsewhere":
        assert list(target.iterdir()) == []


def test_row38_report_symlink_exit_6(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("keep")
    report = tmp_path / "report.json"
    report.symlink_to(elsewhere)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out, "--report", str(report)), 6, "--report", output=out)
    assert elsewhere.read_text() == "keep"


# --- row 33: inputs changed or removed during the run ----------------------------------------


def _after_prepare(monkeypatch: pytest.MonkeyPatch, change: Callable[[], None]) -> None:
    """Run ``change`` once the headers are validated, before any tensor data is read."""
    real = pipeline.prepare

    def prepare(*args: Any, **kwargs: Any) -> pipeline.Job:
        job = real(*args, **kwargs)
        change()
        return job

    monkeypatch.setattr(pipeline, "prepare", prepare)


def _replace_with_other_shapes(path: Path) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            tensors[key] = torch.randn(3, 5)

    edit_tensors(path, edit)


@pytest.mark.parametrize(
    ("change", "code", "phrases"),
    [
        pytest.param(
            lambda t: shutil.rmtree(t.aligned), 3, ("aligned/model.safetensors", "removed"),
            id="aligned-folder-removed",
        ),
        pytest.param(
            lambda t: (t.base / MODEL).unlink(), 3, ("base/model.safetensors", "removed"),
            id="base-file-removed",
        ),
        pytest.param(
            lambda t: _truncate(t.base / MODEL), 3, ("base/model.safetensors", "changed"),
            id="base-file-truncated",
        ),
        pytest.param(
            lambda t: _replace_with_other_shapes(t.aligned / MODEL), 3,
            ("aligned/model.safetensors", "changed"), id="aligned-file-replaced",
        ),
        pytest.param(
            lambda t: (t.adapter / WEIGHTS).unlink(), 3, ("adapter/adapter_model.safetensors",),
            id="adapter-weights-removed",
        ),
        pytest.param(
            lambda t: _replace_with_other_shapes(t.adapter / WEIGHTS), 3,
            ("adapter/adapter_model.safetensors", "changed"), id="adapter-weights-replaced",
        ),
        pytest.param(
            lambda t: (t.adapter / CONFIG).unlink(), 3, ("adapter_config.json", "removed"),
            id="adapter-config-removed",
        ),
    ],
)  # fmt: skip
def test_row33_input_changed_during_run_clean_error(
    trio: Trio,
    cli: Cli,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[Trio], None],
    code: int,
    phrases: tuple[str, ...],
) -> None:
    _after_prepare(monkeypatch, lambda: change(trio))
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), code, *phrases, output=out)


# --- every error class is one line, without --quiet too ---------------------------------------


def test_errors_are_one_line_without_quiet(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    """The progress display must not add lines to an error (CI logs read stderr)."""
    _lfs(trio.base / MODEL)
    out = tmp_path / "out"
    result = cli(trio.patch_args(out))
    expect_error(result, 3, "git lfs pull", output=out)


def test_debug_env_adds_the_traceback(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAFELORA_DEBUG", "1")
    _lfs(trio.base / MODEL)
    out = tmp_path / "out"
    result = run_patch(cli, trio, out)
    assert result.exit_code == 3
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: ")
    assert not out.exists()

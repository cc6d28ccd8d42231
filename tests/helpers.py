"""Shared test helpers: running the CLI in-process, asserting errors and results, reading and
editing safetensors files by hand, and the dense float64 reference every fast path is checked
against.

Imported by the test modules (never redefined there); constants come from the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

from safelora_cli.cli import app
from safelora_cli.errors import ExitCode
from safelora_cli.inputs.adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from safelora_cli.inputs.index import INDEX_NAME, LFS_PREFIX
from safelora_cli.output.card import CARD_NAME
from safelora_cli.output.report import REPORT_NAME

Cli = Callable[..., Result]
WEIGHTS = WEIGHTS_NAME
CONFIG = CONFIG_NAME
REPORT = REPORT_NAME
CARD = CARD_NAME
INDEX = INDEX_NAME
MODEL = "model.safetensors"  # a single-file model, as transformers saves it
# modules of the default synthetic trio (2 layers, all seven projections)
Q0 = "model.layers.0.self_attn.q_proj"
K0 = "model.layers.0.self_attn.k_proj"
V1 = "model.layers.1.self_attn.v_proj"
DOWN1 = "model.layers.1.mlp.down_proj"
WORK_PREFIX = ".safelora-"  # staging.STAGE_PREFIX (a --force swap keeps the old output inside)
PROJECT_ALL = ("--select", "threshold", "--threshold", "1", "--quiet")
LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[^.]+)?\.weight$"
)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- running the CLI and checking what it did -------------------------------------------------


def invoke(args: list[str], **kwargs: Any) -> Result:
    """Run the CLI in-process; ``result.stdout`` and ``result.stderr`` are separate."""
    return CliRunner().invoke(app, args, **kwargs)


def start_patch(
    adapter: Path, base: Path, aligned: Path, output: Path, *extra: str
) -> subprocess.Popen[str]:
    """``python -m safelora_cli patch ... --quiet`` in a subprocess (signals, concurrent runs),
    stdout and stderr piped, without SAFELORA_DEBUG."""
    args = [sys.executable, "-m", "safelora_cli", "patch", str(adapter), "--base", str(base),
            "--aligned", str(aligned), "--output", str(output), "--quiet", *extra]  # fmt: skip
    env = {**os.environ, "SAFELORA_DEBUG": "0"}
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def assert_error(result: Result, code: ExitCode, *phrases: str) -> str:
    """The run failed with ``code`` and one stderr line holding every phrase; returns the line."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """safelora's working entries left in ``folder``: any ``.safelora-*`` name (staging folders,
    ``.safelora-tmp-*``, hold the old output too while ``--force`` swaps it)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(WORK_PREFIX))


def expect_error(
    result: Result, code: ExitCode, *phrases: str, output: Path, output_existed: bool = False
) -> str:
    """A clean failure: exit ``code``, exactly one ``error:`` line on stderr holding every phrase,
    no traceback, nothing on stdout, and neither the output nor a working folder left behind."""
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
    assert leftovers(output.parent) == []
    return line


def expect_ok(result: Result, output: Path) -> dict[str, Any]:
    """A clean success: exit 0, the output path alone on stdout, no working folder left, finite
    tensors; returns the report written in ``output``."""
    assert result.exit_code == ExitCode.OK, (
        f"stderr: {result.stderr!r}\nexception: {result.exception!r}"
    )
    assert result.stdout == f"{output}\n"
    assert leftovers(output.parent) == []
    report: dict[str, Any] = json.loads((output / REPORT).read_text())
    tensors = load_file(str(output / WEIGHTS))
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.dtype in _FLOATS)
    return report


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every regular file of ``folder`` (not recursive): name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def rel_err(got: torch.Tensor | float, want: torch.Tensor | float) -> float:
    """‖got − want‖ / ‖want‖ in float64 (the plain difference when ``want`` is zero)."""
    got64, want64 = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    norm = float(torch.linalg.vector_norm(want64))
    diff = float(torch.linalg.vector_norm(got64 - want64))
    return diff / norm if norm else diff


# --- safetensors files by hand ----------------------------------------------------------------


@dataclass(frozen=True)
class RawFile:
    """A safetensors file read by hand, without the code under test.

    ``header``: the JSON header as stored (``__metadata__`` included); ``payload``: every byte
    after it; ``entries``: the tensors' header entries; ``data``: tensor name -> its bytes.
    """

    header: dict[str, Any]
    payload: bytes

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.header.items() if k != "__metadata__"}

    @property
    def metadata(self) -> dict[str, str] | None:
        return self.header.get("__metadata__")

    @property
    def data(self) -> dict[str, bytes]:
        return {
            name: self.payload[entry["data_offsets"][0] : entry["data_offsets"][1]]
            for name, entry in self.entries.items()
        }


def read_raw(path: Path) -> RawFile:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return RawFile(json.loads(raw[8 : 8 + length]), raw[8 + length :])


def write_raw(
    path: Path, header: dict[str, Any] | bytes, payload: bytes, length: int | None = None
) -> None:
    """Write a safetensors file by hand; ``length`` overrides the header length field."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + payload)


def tensors_by_offset(header: dict[str, Any]) -> list[str]:
    """The header's tensor names in the order of their data."""
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load a safetensors file, let ``edit`` change the dict in place, save it back."""
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def truncate(path: Path, by: int = 10) -> None:
    path.write_bytes(path.read_bytes()[:-by])


def write_lfs_pointer(path: Path) -> None:
    """What a clone without ``git lfs pull`` holds in place of the weights."""
    path.write_text(
        f"{LFS_PREFIX.decode()}.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 123456789\n"
    )


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (single file or shards)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def lora_key(module: str, kind: str) -> str:
    """The PEFT key of a factor: ``lora_key(Q0, "lora_B")``."""
    return f"{PREFIX}{module}.{kind}.weight"


def edit_config(adapter: Path, **changes: Any) -> dict[str, Any]:
    """Update keys of ``adapter``'s adapter_config.json; returns the new config."""
    path = adapter / CONFIG
    config: dict[str, Any] = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))
    return config


# --- the dense float64 reference ----------------------------------------------------------------


@dataclass(frozen=True)
class DenseModule:
    """The paper's quantities for one module, from dense float64 matrices."""

    b_key: str
    a_key: str
    shape: tuple[int, int]
    rank: int
    cosine: float | None
    projected_b: torch.Tensor | None
    v_norm: float
    b_norm: float
    pb_norm: float
    distance: float


def dense_reference(base: Path, aligned: Path, adapter: Path) -> dict[str, DenseModule]:
    """Module name -> Safe LoRA's quantities, from the stored values upcast to float64:
    V = W_aligned − W_base, Ĉ = V Vᵀ/‖V‖_F built as an (out, out) matrix, cos(Ĉ B A, B A) over
    the flattened (out, in) update, B' = Ĉ B. Nothing of the code under test is used."""
    base_t, aligned_t, adapter_t = read_tensors(base), read_tensors(aligned), read_tensors(adapter)
    keys: dict[str, dict[str, str]] = {}
    for key in adapter_t:
        match = LORA_KEY.match(key)
        if match is not None:  # anything else is passed through
            keys.setdefault(match["module"], {})[match["kind"]] = key
    dense = {}
    for module, ab in keys.items():
        v = aligned_t[f"{module}.weight"].double() - base_t[f"{module}.weight"].double()
        a, b = adapter_t[ab["A"]].double(), adapter_t[ab["B"]].double()
        dense[module] = _dense_module(v, a, b, ab["A"], ab["B"])
    return dense


def _dense_module(
    v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_key: str, b_key: str
) -> DenseModule:
    v_norm = float(torch.linalg.matrix_norm(v))
    b_norm = float(torch.linalg.matrix_norm(b))
    cosine, pb, pb_norm, distance = None, None, b_norm, 0.0
    if v_norm > 0:
        c_hat = v @ v.T / v_norm
        ba = b @ a
        cosine = float(F.cosine_similarity((c_hat @ ba).flatten(), ba.flatten(), dim=0))
        pb = c_hat @ b
        pb_norm = float(torch.linalg.matrix_norm(pb))
        distance = float(torch.linalg.matrix_norm(b - pb))
    shape = (v.shape[0], v.shape[1])
    return DenseModule(
        b_key, a_key, shape, a.shape[0], cosine, pb, v_norm, b_norm, pb_norm, distance
    )


def paper_selection(dense: Mapping[str, DenseModule], mode: str, k: int, t: float) -> set[str]:
    """The official rule: cosine <= threshold; in number mode the threshold is the K-th lowest."""
    cosines = {m: d.cosine for m, d in dense.items() if d.cosine is not None}
    if mode == "number":
        t = sorted(cosines.values())[k - 1]
    return {m for m, c in cosines.items() if c <= t}


def assert_close_in_dtype(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """``got``, stored in ``dtype``, is float64 ``want`` rounded to ``dtype``, up to fp32 noise."""
    info = torch.finfo(dtype)
    atol = info.smallest_normal * info.eps + 1e-6 * float(want.abs().max())
    torch.testing.assert_close(got.double(), want, rtol=info.eps, atol=atol)


# --- spectra and factors for the subspace and profile tests -----------------------------------


def with_spectrum(out: int, inp: int, sigmas: list[float], seed: int = 0) -> torch.Tensor:
    """A float64 (out, in) matrix with exactly these singular values (random singular vectors)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(sigmas), generator=gen, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(inp, len(sigmas), generator=gen, dtype=torch.float64))
    return (u * torch.tensor(sigmas, dtype=torch.float64)) @ w.T


def factors(out: int, inp: int, r: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) in float32."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen)


def dense_k(v: torch.Tensor, energy: float) -> int:
    """The smallest k whose σ² reach ``energy`` of ‖V‖²_F (float64 SVD)."""
    s2 = torch.linalg.svdvals(v.double()) ** 2
    share = torch.cumsum(s2, 0) / s2.sum()
    return int(torch.nonzero(share >= energy)[0]) + 1


def dense_subspace(
    v: torch.Tensor, b: torch.Tensor, a: torch.Tensor, k: int
) -> tuple[torch.Tensor, float, float]:
    """(P B, cos(P B A, B A), captured energy) with P = U_k U_kᵀ built densely in float64."""
    v64, b64, a64 = v.double(), b.double(), a.double()
    u, s, _ = torch.linalg.svd(v64, full_matrices=False)
    p = u[:, :k] @ u[:, :k].T  # (out, out)
    pb = p @ b64
    cosine = torch.nn.functional.cosine_similarity((pb @ a64).flatten(), (b64 @ a64).flatten(), 0)
    return pb, float(cosine), float((s[:k] ** 2).sum() / (s**2).sum())


# --- a Hugging Face hub cache, built by hand (offline) -------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def cache_repo(hub: Path, repo: str, folder: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """Put ``folder``'s files in the hub cache as ``repo`` at ``commit``, ``ref`` pointing there."""
    storage = hub / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for src in sorted(folder.iterdir()):
        data = src.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / src.name).symlink_to(Path("../../blobs") / blob.name)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot

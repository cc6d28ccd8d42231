"""Alignment profiles: one safetensors file holding what Safe LoRA needs of each V = W_a − W_b.

Layout. Tensors ``<weight>.u`` (out, k) and ``<weight>.s`` (k,) float32 for a low-rank entry,
``<weight>.v`` (out, in) float32 for a weight stored whole, nothing for V = 0. The header's
``__metadata__`` (strings only) holds ``format``, ``schema_version`` and ``profile``, a JSON object:
the tool, the caller's ``inputs`` (refs, hub ids, commits, file sizes), the ``rank_rule``, and per
weight its shape (the module's (out, in)), ‖V‖_F, kind, k, how Û was found, whether the stored
weight is (in, out) (Conv1D), the certificate (``math.certificate``), the captured energy
and a sha256 of each stored tensor; and, when the model pair ties its output head to its input
embedding, ``tied``: {"lm_head.weight": the embedding's name} (the entry a tied lm_head is
scored against, under the name pairing gives it; optional, absent in older files).

A profile is an untrusted input. ``read_profile`` checks the safetensors header
(``index.read_header``), then the metadata against it, before any tensor is read: malformed →
CorruptFileError (3), a newer schema → IncompatibleInputError (4). ``load_entry`` reads one weight:
NaN/Inf → NumericalError (5), bytes not matching their checksum → CorruptFileError (3). Every value
is also checked against what a profile can hold (``profile_check``: ranges, the certificate's
consistency, Û orthonormal, σ ordered, free text capped): a crafted file with valid checksums is
CorruptFileError too, before any math.
Building and writing are in ``runs.profile_build``; the summary ``inspect`` shows and the
report's record are in ``safelora_cli.sources.profile_summary``.
"""

from __future__ import annotations

import hashlib
import math
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from safelora_cli.errors import (
    CorruptFileError,
    IncompatibleInputError,
    NumericalError,
    UsageError,
)
from safelora_cli.inputs.index import SafetensorsHeader, read_header
from safelora_cli.inputs.loader import TensorReader
from safelora_cli.inputs.smallfiles import decode_json
from safelora_cli.math.certificate import Certificate
from safelora_cli.math.lowrank import (
    EXACT,
    LOWRANK,
    RANDOMIZED,
    WHOLE,
    ZERO,
    LowRank,
    RankRule,
)
from safelora_cli.sources import profile_check as check

FORMAT = "safelora-profile"
SCHEMA_VERSION = 1
SUFFIXES = {LOWRANK: (".u", ".s"), WHOLE: (".v",), ZERO: ()}
CERTIFICATE_FIELDS = ("sigma_max", "sigma_next", "tail_energy", "cross", "ritz", "tail")
_SHOW = 5


@dataclass(frozen=True)
class WeightInfo:
    """One weight's validated metadata (no tensor data)."""

    name: str
    shape: tuple[int, int]
    v_norm: float
    kind: str
    rank: int
    method: str
    transposed: bool
    certificate: Certificate
    captured_energy: float
    sha256: dict[str, str]
    failure_probability: float = 0.0  # P(the certificate is not a bound); absent before 0.x: 0

    def entry(self, **tensors: torch.Tensor | None) -> LowRank:
        return LowRank(
            self.shape, self.v_norm, self.kind, self.certificate, method=self.method,
            failure=self.failure_probability, **tensors,
        )  # fmt: skip


@dataclass(frozen=True)
class ProfileInfo:
    """A validated profile: its header and metadata; tensors are read by ``load_entry``."""

    path: Path
    schema_version: int
    tool: dict[str, Any]
    inputs: dict[str, Any]
    rule: RankRule
    weights: dict[str, WeightInfo]
    header: SafetensorsHeader
    tied: dict[str, str] = field(default_factory=dict)

    def stored_weight(self, weight: str) -> str:
        """The entry a model weight is scored against: its own, or for a tied ``lm_head.weight``
        the embedding it is tied to."""
        return self.tied.get(weight, weight)

    def tensor_bytes(self, weight: str) -> int:
        """Bytes of tensor data stored for ``weight``."""
        info = self.weights[weight]
        return sum(self.header.tensors[weight + x].nbytes for x in SUFFIXES[info.kind])


def read_profile(path: Path) -> ProfileInfo:
    """Open and validate a profile without reading tensor data.

    Raises:
        UsageError: no such file, or a folder.
        CorruptFileError: not a safetensors file, not a profile, metadata malformed or not
            matching the tensors.
        IncompatibleInputError: made by a newer safelora (schema version above this one's).
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise UsageError(f"--profile {path}: no such file ({exc.strerror})") from exc
    if stat.S_ISDIR(mode):
        raise UsageError(f"--profile {path}: is a folder", "give the profile's .safetensors file")
    if not stat.S_ISREG(mode):
        raise CorruptFileError(f"{path}: is not a regular file")
    header = read_header(path)
    meta = header.metadata or {}
    if meta.get("format") != FORMAT:
        raise CorruptFileError(
            f"{path}: is not a safelora profile (no format={FORMAT!r} in its metadata)",
            "make one with `safelora profile --base REF --aligned REF --output FILE`",
        )
    version = check.schema_version(path, meta.get("schema_version"), SCHEMA_VERSION)
    body = decode_json(
        meta.get("profile", "").encode(),
        path,
        "profile metadata",
        CorruptFileError,
        strict_numbers=True,
    )
    where = f"{path}: profile metadata"
    weights_raw = _field(body, "weights", dict, where)
    weights = {name: _weight(path, name, raw) for name, raw in sorted(weights_raw.items())}
    _check_tensors(path, header, weights)
    tool, inputs = check.free_text(path, body.get("tool"), body.get("inputs"))
    return ProfileInfo(
        path=path,
        schema_version=version,
        tool=tool,
        inputs=inputs,
        rule=_rule(path, _field(body, "rank_rule", dict, where)),
        weights=weights,
        header=header,
        tied=check.tied(path, body.get("tied", {}), weights),
    )


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise CorruptFileError(f"{where}: {key!r} is missing or not a {kind.__name__}: {value!r}")
    return value


def _number(obj: dict[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise CorruptFileError(f"{where}: {key!r} is missing or not a finite number >= 0")
    return float(value)


def _dim(obj: dict[str, Any], key: str, where: str) -> int:
    value: int = check.dimension(_field(obj, key, int, where), where, repr(key))
    return value


def _rule(path: Path, raw: dict[str, Any]) -> RankRule:
    where = f"{path}: rank_rule"
    rank, tolerance = raw.get("rank"), raw.get("tolerance")
    try:
        return RankRule(
            rank=None if rank is None else _dim(raw, "rank", where),
            tolerance=None if tolerance is None else _number(raw, "tolerance", where),
            max_rank=_dim(raw, "max_rank", where),
        )
    except UsageError as exc:
        raise CorruptFileError(f"{where}: {exc.message}") from exc


def _weight(path: Path, name: str, raw: Any) -> WeightInfo:
    where = f"{path}: weight {name!r}"
    if not isinstance(raw, dict):
        raise CorruptFileError(f"{where}: metadata is not an object")
    shape = _field(raw, "shape", list, where)
    if len(shape) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise CorruptFileError(f"{where}: shape {shape!r} is not [out, in]")
    out, inp = (check.dimension(d, where, "shape dimension") for d in shape)
    kind, rank = _field(raw, "kind", str, where), _dim(raw, "rank", where)
    v_norm = _number(raw, "v_norm", where)
    method = _field(raw, "method", str, where)
    expected_rank = {ZERO: (0, 0), WHOLE: (min(shape), min(shape))}.get(kind, (1, min(shape)))
    if (
        out < 1
        or inp < 1
        or kind not in SUFFIXES
        or not expected_rank[0] <= rank <= expected_rank[1]
        or (v_norm == 0.0) != (kind == ZERO)
        or method not in (EXACT, RANDOMIZED)
    ):
        raise CorruptFileError(
            f"{where}: kind {kind!r}, rank {rank}, method {method!r}, ‖V‖ {v_norm} do not fit "
            f"shape {shape}"
        )
    check.norm_range(v_norm, (out, inp), where)
    certificate = Certificate(*(_number(raw, key, where) for key in CERTIFICATE_FIELDS))
    check.certificate(certificate, v_norm, (out, inp), kind, rank, where)
    captured = _number(raw, "captured_energy", where)
    if captured > 1.0 + check.RELATIVE:
        raise CorruptFileError(f"{where}: captured_energy {captured} exceeds 1")
    sha = _field(raw, "sha256", dict, where)
    if sorted(sha) != sorted(SUFFIXES[kind]) or not all(isinstance(h, str) for h in sha.values()):
        raise CorruptFileError(f"{where}: sha256 must list {list(SUFFIXES[kind])}")
    return WeightInfo(
        name=name,
        shape=(out, inp),
        v_norm=v_norm,
        kind=kind,
        rank=rank,
        method=method,
        transposed=_field(raw, "transposed", bool, where),
        certificate=certificate,
        captured_energy=captured,
        sha256=sha,
        failure_probability=_probability(raw, where),
    )


def _probability(raw: dict[str, Any], where: str) -> float:
    """The optional ``failure_probability`` (profiles written before it are exact: 0)."""
    if "failure_probability" not in raw:
        return 0.0
    value = _number(raw, "failure_probability", where)
    if value > 1.0:
        raise CorruptFileError(f"{where}: 'failure_probability' {value} is above 1")
    return value


def _expected_shapes(info: WeightInfo) -> dict[str, tuple[int, ...]]:
    out, inp = info.shape
    shapes = {".u": (out, info.rank), ".s": (info.rank,), ".v": (out, inp)}
    return {info.name + x: shapes[x] for x in SUFFIXES[info.kind]}


def _check_tensors(path: Path, header: SafetensorsHeader, weights: dict[str, WeightInfo]) -> None:
    expected: dict[str, tuple[int, ...]] = {}
    for info in weights.values():
        expected.update(_expected_shapes(info))
    extra = sorted(header.tensors.keys() - expected.keys())
    missing = sorted(expected.keys() - header.tensors.keys())
    if extra or missing:
        parts = [f"{len(missing)} missing ({_first(missing)})"] if missing else []
        parts += [f"{len(extra)} not described ({_first(extra)})"] if extra else []
        raise CorruptFileError(
            f"{path}: tensors do not match the profile metadata: {'; '.join(parts)}",
            "the file was edited or damaged; rebuild the profile",
        )
    for name, shape in expected.items():
        tensor = header.tensors[name]
        if tensor.dtype != "F32" or tensor.shape != shape:
            raise CorruptFileError(
                f"{path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, the metadata "
                f"says F32 {list(shape)}",
                "the file was edited or damaged; rebuild the profile",
            )


def load_entry(profile: ProfileInfo, weight: str, reader: TensorReader | None = None) -> LowRank:
    """Read one weight's tensors, checked: finite, matching their checksums and metadata.

    Args:
        profile: from ``read_profile``; weight: a name in ``profile.weights``.
        reader: an open ``TensorReader`` to reuse (one is opened and closed otherwise).
    Raises:
        NumericalError: a tensor holds NaN or Inf.
        CorruptFileError: a tensor's bytes differ from what was written, or the file changed.
    """
    info = profile.weights[weight]
    if reader is None:
        with TensorReader() as own:
            return load_entry(profile, weight, own)
    tensors = {
        suffix[1:]: _read_checked(reader, profile, weight, suffix) for suffix in SUFFIXES[info.kind]
    }
    entry = info.entry(**tensors)
    check.check_entry(entry, f"{profile.path}: weight {weight!r}")
    if info.kind == LOWRANK and abs(entry.captured_energy - info.captured_energy) > 1e-5:
        raise CorruptFileError(
            f"{profile.path}: weight {weight!r}: σ's hold {entry.captured_energy:.6f} of ‖V‖², "
            f"the metadata says {info.captured_energy:.6f}",
            "the file was edited or damaged; rebuild the profile",
        )
    return entry


def _read_checked(
    reader: TensorReader, profile: ProfileInfo, weight: str, suffix: str
) -> torch.Tensor:
    tensor = profile.header.tensors[weight + suffix]
    value = reader.read(tensor).clone()
    if not bool(torch.isfinite(value).all()):
        raise NumericalError(
            f"{profile.path}: tensor {tensor.name!r} holds NaN or Inf",
            "the profile is damaged; rebuild it",
        )
    if tensor_sha256(value) != profile.weights[weight].sha256[suffix]:
        raise CorruptFileError(
            f"{profile.path}: tensor {tensor.name!r} does not match its sha256 in the metadata",
            "the file was edited or damaged; rebuild the profile",
        )
    return value


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a CPU tensor's bytes, as stored."""
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(cast(Any, data))).hexdigest()  # no copy of the bytes


def check_adapter(
    profile: ProfileInfo,
    modules: Mapping[str, tuple[int, int]],
    transposed: Collection[str] = (),
    *,
    tied: bool = False,
) -> None:
    """Check that the profile covers an adapter: every weight present, shapes and layout equal.

    Args:
        modules: weight name (``<module>.weight``) -> the module's (out, in), as lora_B @ lora_A.
        transposed: the weights the adapter's base layers store (in, out) (fan_in_fan_out).
        tied: a tied ``lm_head.weight`` is checked as the embedding the profile ties it to
            (``ProfileInfo.stored_weight``), as pairing does.
    Raises:
        IncompatibleInputError: listing every problem at once (the first few of each kind).
    """
    missing, shapes, layouts = [], [], []
    for weight, shape in modules.items():
        stored = profile.stored_weight(weight) if tied else weight
        info = profile.weights.get(stored)
        if info is None:
            missing.append(weight if stored == weight else f"{weight} (tied to {stored})")
            continue
        if tuple(shape) != info.shape:
            shapes.append(f"{weight}: adapter {list(shape)}, profile {list(info.shape)}")
        elif (weight in transposed) != info.transposed:
            layouts.append(weight)
    problems = []
    if missing:
        problems.append(f"{len(missing)} adapter weight(s) not in the profile ({_first(missing)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_first(shapes, '; ')}")
    if layouts:
        problems.append(
            f"{len(layouts)} weight(s) profiled in the other layout (fan_in_fan_out / Conv1D): "
            f"{_first(layouts)}"
        )
    if problems:
        hint = (
            "the profile was made from another model pair; build one from the adapter's base "
            "and aligned models with `safelora profile`"
        )
        if missing and not shapes and not layouts:
            hint = (
                "the profile holds no entry for these weights: build it from the adapter's base "
                "and aligned models with `safelora profile --targets` naming these modules "
                "(lm_head too, tied or not)"
            )
        raise IncompatibleInputError(
            f"{profile.path}: does not fit the adapter: " + "; ".join(problems), hint
        )


def _first(items: list[str], sep: str = ", ") -> str:
    return sep.join(items[:_SHOW]) + (f"{sep}..." if len(items) > _SHOW else "")

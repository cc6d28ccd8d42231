"""What a profile's values can be: the checks ``profile.read_profile`` and ``load_entry`` apply
before any of them reaches the math, a report or the terminal.

A profile is an untrusted file whose sha256 checksums only say that its tensors are the ones its
own metadata describes: a crafted file can carry any values with valid checksums. So every value
is checked against what a profile made by ``safelora profile`` can hold; anything else is
``CorruptFileError`` (exit 3), never used:

- the schema version: ASCII digits, a few of them ("²" and 5000 digits are not versions);
- the free text (``tool``, ``inputs``): objects of the right shape, every string at most
  ``MAX_TEXT`` characters and all of it at most ``MAX_FREE_TEXT_BYTES`` as JSON, so that a
  profile's provenance cannot turn into a 60 MB report;
- the ``tied`` record: at most ``MAX_TIED`` names, each mapped to another name, none of them a
  weight stored in the file (a tied head has no entry of its own);
- shapes within ``MAX_DIM``; ‖V‖_F within what float32 data can give (at least the smallest
  float32 subnormal, at most sqrt(out·in) × the largest float32): no overflow in the squares the
  certificate and the scores take;
- the certificate (``math.certificate``): finite, ≥ 0, σ_{k+1} ≤ σ_1 ≤ ‖V‖_F, f, c, t̄ and the
  residual energy at most ``4 ‖V‖²_F``, t̄ ≤ residual energy, and t̄ at least what the residual
  energy implies (‖Q V‖²_F ≤ rank(Q V) · ‖Q V‖²_2 ≤ min(out − k, in) · t̄);
- the tensors (``check_entry``): ŝ non-negative and non-increasing, ŝ_1 ≤ σ_1, Û orthonormal
  within ``ORTHONORMAL_TOLERANCE`` (the k × k Gram check ÛᵀÛ ≈ I, in float64), the stored energy
  Σ ŝ² plus the residual energy equal to ‖V‖²_F, and a weight stored whole of norm ‖V‖_F (a V of
  zeros with a non-zero stated norm is refused).

The tolerances allow for float32 storage and float64 rounding (``certificate.rounding_allowance``)
with a wide margin: a profile written by this tool passes with room to spare.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from safelora_cli.errors import CorruptFileError, IncompatibleInputError
from safelora_cli.math.certificate import Certificate, rounding_allowance
from safelora_cli.math.lowrank import LOWRANK, WHOLE, LowRank

MAX_VERSION_DIGITS = 6
MAX_DIM = 2**31 - 1
MAX_TEXT = 4096
"""The longest string the free text may hold (a path is at most 4096 bytes on Linux)."""
MAX_FREE_TEXT_BYTES = 256 * 1024
"""``tool`` and ``inputs`` together, as JSON."""
MAX_TIED = 4
FLOAT32_TINY = 2.0**-149  # the smallest positive float32 (subnormal)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
ORTHONORMAL_TOLERANCE = 1e-4
"""|ÛᵀÛ − I| entrywise; float32 Ritz vectors are within about 1e-7."""
RELATIVE = 1e-4
"""Slack, relative to ‖V‖²_F (or ‖V‖_F), for values rounded to float32 or summed in float64."""
_FIELDS = ("sigma_max", "sigma_next", "tail_energy", "cross", "ritz", "tail")


def schema_version(path: Path, raw: object, newest: int) -> int:
    """The metadata's ``schema_version``: ASCII digits, at least 1, at most ``newest``.

    Raises:
        CorruptFileError: not a version number; IncompatibleInputError: newer than ``newest``.
    """
    if (
        not isinstance(raw, str)
        or not raw.isascii()
        or not raw.isdigit()
        or len(raw) > MAX_VERSION_DIGITS
        or int(raw) < 1
    ):
        shown = raw if not isinstance(raw, str) else raw[:20] + ("..." if len(raw) > 20 else "")
        raise CorruptFileError(
            f"{path}: profile schema_version {shown!r} is not a version number",
            "the file was edited or damaged; rebuild the profile",
        )
    version = int(raw)
    if version > newest:
        raise IncompatibleInputError(
            f"{path}: profile schema version {version} is newer than this safelora reads "
            f"({newest})",
            "upgrade safelora (pip install -U safelora), or rebuild the profile with this version",
        )
    return version


def free_text(path: Path, tool: object, inputs: object) -> tuple[dict[str, Any], dict[str, Any]]:
    """``tool`` (an object) and ``inputs`` (role -> an object), within the size caps."""
    where = f"{path}: profile metadata"
    if not isinstance(tool, dict):
        raise CorruptFileError(f"{where}: 'tool' is missing or not an object")
    if not isinstance(inputs, dict):
        raise CorruptFileError(f"{where}: 'inputs' is missing or not an object")
    for role, record in inputs.items():
        if not isinstance(record, dict):
            raise CorruptFileError(
                f"{where}: input {role[:40]!r} is a {type(record).__name__}, not an object",
                "the file was edited or damaged; rebuild the profile",
            )
    size = len(json.dumps([tool, inputs]))
    if size > MAX_FREE_TEXT_BYTES:
        raise CorruptFileError(
            f"{where}: 'tool' and 'inputs' hold {size} bytes, more than the "
            f"{MAX_FREE_TEXT_BYTES} a profile's provenance may",
            "the file was edited or damaged; rebuild the profile",
        )
    longest = _longest_string([tool, inputs])
    if longest > MAX_TEXT:
        raise CorruptFileError(
            f"{where}: a string of {longest} characters in 'tool' or 'inputs' (at most {MAX_TEXT})",
            "the file was edited or damaged; rebuild the profile",
        )
    return tool, inputs


def tied(path: Path, raw: object, weights: Collection[str]) -> dict[str, str]:
    """The optional ``tied`` record: {a model weight: the stored entry it is tied to}.

    Raises:
        CorruptFileError: not an object of at most ``MAX_TIED`` names, a name over ``MAX_TEXT``
            characters, a name tied to itself, or a tied name that has an entry of its own.
    """
    if not isinstance(raw, dict) or len(raw) > MAX_TIED:
        raise CorruptFileError(
            f"{path}: profile metadata: 'tied' is not an object of at most {MAX_TIED} names",
            "the file was edited or damaged; rebuild the profile",
        )
    for key, value in raw.items():
        if (
            not isinstance(value, str)
            or max(len(key), len(value)) > MAX_TEXT
            or key in weights
            or key == value
        ):
            raise CorruptFileError(
                f"{path}: profile metadata: 'tied' maps {key[:80]!r} to {str(value)[:80]!r}, "
                "not a head to another weight's entry",
                "the file was edited or damaged; rebuild the profile",
            )
    return dict(raw)


def _longest_string(value: Any) -> int:
    longest, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            longest = max(longest, len(item))
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return longest


def dimension(value: int, where: str, what: str) -> int:
    """An int within 0..MAX_DIM (shapes, ranks)."""
    if not 0 <= value <= MAX_DIM:
        raise CorruptFileError(f"{where}: {what} {value} is outside 0..{MAX_DIM}")
    return value


def norm_range(v_norm: float, shape: tuple[int, int], where: str) -> None:
    """A non-zero ‖V‖_F that float32 data of ``shape`` can have."""
    if v_norm == 0.0:
        return
    top = math.sqrt(shape[0]) * math.sqrt(shape[1]) * FLOAT32_MAX
    if not FLOAT32_TINY <= v_norm <= top:
        raise CorruptFileError(
            f"{where}: ‖V‖_F {v_norm:.6g} is not what float32 weights of shape "
            f"{list(shape)} can differ by (between {FLOAT32_TINY:.3g} and {top:.3g})",
            "the file was edited or damaged; rebuild the profile",
        )


def certificate(cert: Certificate, v_norm: float, shape: tuple[int, int], kind: str,
                rank: int, where: str) -> None:  # fmt: skip
    """The certificate's values against each other and ‖V‖_F (module docstring)."""
    values = dict(zip(_FIELDS, (getattr(cert, f) for f in _FIELDS), strict=True))
    if kind not in (LOWRANK, WHOLE):
        if any(values.values()):
            _bad(where, "a weight with V = 0 has a certificate of zeros")
        return
    energy = v_norm * v_norm
    eta = rounding_allowance(*shape, v_norm)
    if not v_norm / math.sqrt(min(shape)) * (1 - RELATIVE) <= cert.sigma_max:
        _bad(where, f"σ_1 {cert.sigma_max:.6g} is below ‖V‖_F / sqrt(min(out, in))")
    if cert.sigma_max > v_norm * (1 + RELATIVE):
        _bad(where, f"σ_1 {cert.sigma_max:.6g} exceeds ‖V‖_F {v_norm:.6g}")
    if cert.sigma_next > cert.sigma_max * (1 + RELATIVE):
        _bad(where, f"σ_(k+1) {cert.sigma_next:.6g} exceeds σ_1 {cert.sigma_max:.6g}")
    for field in ("tail_energy", "cross", "ritz", "tail"):
        if values[field] > 4.0 * energy * (1 + RELATIVE) + 4.0 * eta:
            _bad(where, f"{field} {values[field]:.6g} exceeds 4 ‖V‖²_F")
    if kind == WHOLE:
        return
    if cert.tail > cert.tail_energy * (1 + RELATIVE) + eta:
        _bad(where, f"tail {cert.tail:.6g} exceeds the residual energy {cert.tail_energy:.6g}")
    spread = max(1, min(shape[0] - rank, shape[1]))  # rank(Q V)
    slack = 2.0 * eta * (spread + 1) + RELATIVE * energy
    if cert.tail * spread < cert.tail_energy - slack:
        _bad(
            where,
            f"tail {cert.tail:.6g} is below what the residual energy {cert.tail_energy:.6g} "
            f"spread over {spread} directions implies",
        )


def check_entry(entry: LowRank, where: str) -> None:
    """The loaded tensors against the metadata (module docstring)."""
    if entry.kind == WHOLE:
        assert entry.v is not None
        norm = float(torch.linalg.vector_norm(entry.v.double()))
        if abs(norm - entry.v_norm) > RELATIVE * entry.v_norm:
            _bad(where, f"the stored V has norm {norm:.6g}, the metadata says {entry.v_norm:.6g}")
        return
    if entry.kind != LOWRANK:
        return
    assert entry.u is not None
    assert entry.s is not None
    s = entry.s.double()
    if bool((s < 0).any()) or bool((s[1:] > s[:-1]).any()):
        _bad(where, "σ is negative or increasing")
    cert = entry.certificate
    if float(s[0]) > cert.sigma_max * (1 + RELATIVE):
        _bad(where, f"σ̂_1 {float(s[0]):.6g} exceeds σ_1 {cert.sigma_max:.6g}")
    u = entry.u.double()
    gram = u.T @ u
    deviation = float((gram - torch.eye(len(gram), dtype=torch.float64)).abs().max())
    if not deviation <= ORTHONORMAL_TOLERANCE:
        _bad(
            where,
            f"Û is not orthonormal: |ÛᵀÛ − I| reaches {deviation:.3g} (at most "
            f"{ORTHONORMAL_TOLERANCE:g})",
        )
    energy = entry.v_norm**2
    eta = rounding_allowance(*entry.shape, entry.v_norm)
    stored = float((s**2).sum())
    allowed = (RELATIVE + ORTHONORMAL_TOLERANCE) * energy + 2.0 * eta + len(s) * cert.ritz
    if abs(stored + cert.tail_energy - energy) > allowed:
        _bad(
            where,
            f"Σσ̂² {stored:.6g} plus the residual energy {cert.tail_energy:.6g} is not "
            f"‖V‖²_F {energy:.6g}",
        )


def _bad(where: str, what: str) -> None:
    raise CorruptFileError(
        f"{where}: {what}", "the file was edited or damaged; rebuild the profile"
    )

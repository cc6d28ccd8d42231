"""Crafted profiles: files whose checksums are valid but whose values no profile can hold
(``sources.profile_check``). Each is a CorruptFileError (exit 3, 4 for a newer schema) before any
math, never an internal error and never used; through the CLI: one line, nothing written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safelora_cli.errors import CorruptFileError, ExitCode, IncompatibleInputError
from safelora_cli.math.lowrank import LowRank
from safelora_cli.sources.profile import tensor_sha256
from safelora_cli.sources.profile_check import MAX_FREE_TEXT_BYTES, MAX_TEXT
from tests.conftest import Trio
from tests.helpers import expect_error, invoke
from tests.test_profile_file import DOWN, INPUTS, RULE, UP, K, Q, expect, make_vs, open_all

Built = tuple[Path, dict[str, LowRank]]
Body = dict[str, Any]
Tensors = dict[str, torch.Tensor]


@pytest.fixture
def built(tmp_path: Path) -> Built:
    """The four-weight profile of ``test_profile_file`` (low-rank, Conv1D, whole, V = 0)."""
    from safelora_cli.runs.profile_build import build_profile, write_profile

    entries = build_profile(make_vs(), RULE)
    path = tmp_path / "pair.profile.safetensors"
    write_profile(path, entries, INPUTS, RULE, transposed={DOWN})
    return path, entries


def craft(
    path: Path,
    body: Callable[[Body], None] | None = None,
    tensors: Callable[[Tensors], None] | None = None,
    meta: dict[str, str] | None = None,
) -> None:
    """Rewrite the profile with its metadata or tensors edited, every sha256 made valid again."""
    stored = {k: v.clone() for k, v in load_file(str(path)).items()}
    with safe_open(str(path), "pt") as fh:
        metadata = dict(fh.metadata())
    profile = json.loads(metadata["profile"])
    if tensors is not None:
        tensors(stored)
        for name, tensor in stored.items():
            weight, suffix = name.rsplit(".", 1)
            profile["weights"][weight]["sha256"]["." + suffix] = tensor_sha256(tensor)
    if body is not None:
        body(profile)
    metadata["profile"] = json.dumps(profile)
    save_file(stored, str(path), {**metadata, **(meta or {})})


def weight(name: str, **fields: Any) -> Callable[[Body], None]:
    def apply(body: Body) -> None:
        body["weights"][name].update(fields)

    return apply


def lowrank_cert(body: Body, **fields: float) -> None:
    body["weights"][Q].update(fields)


# --- metadata ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "part"),
    [({"schema_version": "²"}, "schema_version '²'"),
     ({"schema_version": "１"}, "schema_version"),  # a fullwidth digit
     ({"schema_version": "1" + "0" * 5000}, "is not a version number"),
     ({"schema_version": " 1"}, "schema_version"),
     ({"schema_version": "-1"}, "schema_version")],
)  # fmt: skip
def test_a_schema_version_that_is_not_ascii_digits_is_corrupt(
    built: Built, meta: dict[str, str], part: str
) -> None:
    path, _ = built
    craft(path, meta=meta)
    error = expect(CorruptFileError, path, part)
    assert len(error.one_line()) < 400  # the 5000 digits are not repeated


@pytest.mark.parametrize(
    ("edit", "part"),
    [(weight(Q, v_norm=1e200), "‖V‖_F 1e+200"),
     (weight(Q, v_norm=1e-200), "‖V‖_F 1e-200"),
     (weight(UP, v_norm=1e200), "‖V‖_F"),
     (weight(K, shape=[2**40, 40]), "outside 0..2147483647"),
     (weight(Q, rank=2**40), "outside 0..2147483647"),
     (lambda b: b["rank_rule"].update(max_rank=2**40), "outside 0..2147483647"),
     (weight(Q, sigma_max=1e300), "σ_1"),
     (weight(Q, sigma_max=1e-30), "σ_1"),
     (weight(Q, sigma_next=1e3), "σ_(k+1)"),
     (weight(Q, tail=1e300), "tail"),
     (weight(Q, cross=1e300), "cross"),
     (weight(Q, ritz=1e300), "ritz"),
     (weight(Q, tail=0.0), "residual energy"),  # a "guaranteed" bound of 0
     (weight(Q, tail_energy=1e-9, tail=1e-9), "residual energy"),  # energy not accounted for
     (weight(Q, captured_energy=1.5), "captured_energy"),
     (weight(K, tail=0.5), "V = 0"),
     (weight(Q, v_norm=True), "'v_norm'")],
)  # fmt: skip
def test_absurd_norms_ranks_and_certificates_are_corrupt(
    built: Built, edit: Callable[[Body], None], part: str
) -> None:
    path, _ = built
    craft(path, body=edit)
    expect(CorruptFileError, path, str(path), part)


@pytest.mark.parametrize(
    ("text", "part"),
    [('"tail": 1e309', "not a finite float"),
     ('"rank": 1' + "0" * 30, "digits"),
     ('"v_norm": NaN', "NaN"),
     ('"v_norm": -Infinity', "Infinity")],
)  # fmt: skip
def test_numbers_json_cannot_hold_are_corrupt(built: Built, text: str, part: str) -> None:
    path, _ = built
    with safe_open(str(path), "pt") as fh:
        metadata = dict(fh.metadata())
    key = text.split(":")[0].strip('"')
    body = json.loads(metadata["profile"])
    body["weights"][Q][key] = "@@"
    metadata["profile"] = json.dumps(body).replace('"@@"', text.split(": ", 1)[1], 1)
    save_file(load_file(str(path)), str(path), metadata)
    expect(CorruptFileError, path, "not valid JSON", part)


@pytest.mark.parametrize(
    ("edit", "part"),
    [(lambda b: b.update(inputs={"base": "a string"}), "input 'base' is a str, not an object"),
     (lambda b: b.update(inputs=["base"]), "'inputs' is missing or not an object"),
     (lambda b: b.update(tool="safelora"), "'tool' is missing or not an object"),
     (lambda b: b["inputs"]["base"].update(ref="x" * (MAX_TEXT + 1)), "a string of 4097"),
     (lambda b: b["inputs"]["base"].update(files={f"f{i}": i for i in range(30000)}),
      f"more than the {MAX_FREE_TEXT_BYTES}")],
)  # fmt: skip
def test_free_text_of_the_wrong_type_or_size_is_corrupt(
    built: Built, edit: Callable[[Body], None], part: str
) -> None:
    path, _ = built
    craft(path, body=edit)
    expect(CorruptFileError, path, part)


# --- tensors with valid checksums --------------------------------------------------------------


def _scale(name: str, factor: float) -> Callable[[Tensors], None]:
    def apply(t: Tensors) -> None:
        t[name] = t[name] * factor

    return apply


def _set(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Tensors], None]:
    def apply(t: Tensors) -> None:
        t[name] = value(t[name]).contiguous()

    return apply


@pytest.mark.parametrize(
    ("edit", "part"),
    [(_scale(f"{Q}.u", 2.0), "not orthonormal"),
     (_scale(f"{Q}.u", 0.0), "not orthonormal"),  # all zero
     (_set(f"{Q}.u", lambda u: u[:, :1].repeat(1, u.shape[1])), "not orthonormal"),  # rank 1
     (_set(f"{Q}.u", lambda u: u + 1e-3 * torch.randn(u.shape, generator=torch.Generator()
                                                       .manual_seed(0))), "not orthonormal"),
     (_set(f"{Q}.s", lambda s: -s), "σ is negative or increasing"),
     (_set(f"{Q}.s", lambda s: s.flip(0)), "σ is negative or increasing"),
     (_scale(f"{UP}.v", 0.0), "the stored V has norm 0"),  # V of zeros, ‖V‖ stated
     (_scale(f"{UP}.v", 3.0), "the stored V has norm")],
)  # fmt: skip
def test_tensors_no_profile_can_hold_are_refused(
    built: Built, edit: Callable[[Tensors], None], part: str
) -> None:
    path, _ = built
    craft(path, tensors=edit)
    expect(CorruptFileError, path, str(path), part)


def test_stored_energy_that_does_not_add_up_to_the_norm_is_refused(built: Built) -> None:
    """ŝ shrunk tenfold, the captured energy edited to match: the residual energy the
    certificate states no longer completes ‖V‖²."""
    path, entries = built
    entry = entries[Q]
    assert entry.s is not None
    captured = float((entry.s.double() / 10).pow(2).sum()) / entry.v_norm**2
    craft(path, tensors=_scale(f"{Q}.s", 0.1), body=weight(Q, captured_energy=captured))
    expect(CorruptFileError, path, "residual energy", "is not ‖V‖²_F")


def test_a_profile_written_by_the_tool_passes_every_check(built: Built) -> None:
    path, _ = built
    craft(path, body=lambda b: None)  # rewritten, nothing changed
    open_all(path)


def test_a_newer_schema_is_still_exit_4(built: Built) -> None:
    path, _ = built
    craft(path, meta={"schema_version": "2"})
    assert expect(IncompatibleInputError, path, "newer").exit_code == 4


# --- through the CLI: one line, exit 3, nothing written ----------------------------------------


@pytest.fixture
def trio_profile(trio: Trio, tmp_path: Path) -> Path:
    path = tmp_path / "p.safetensors"
    args = ["profile", "--base", str(trio.base), "--aligned", str(trio.aligned), "--output",
            str(path), "--rank", "2", "--quiet"]  # fmt: skip
    assert invoke(args).exit_code == 0
    return path


def _first_weight(path: Path) -> str:
    with safe_open(str(path), "pt") as fh:
        return sorted(json.loads(fh.metadata()["profile"])["weights"])[0]


@pytest.mark.parametrize(
    "case", ["non-orthonormal", "negative-sigma", "huge-certificate", "string-input", "superscript"]
)
def test_crafted_profiles_end_every_command_cleanly(
    trio: Trio, trio_profile: Path, tmp_path: Path, case: str
) -> None:
    name = _first_weight(trio_profile)
    if case == "non-orthonormal":
        craft(trio_profile, tensors=_scale(f"{name}.u", 1.5))
    elif case == "negative-sigma":
        craft(trio_profile, tensors=_set(f"{name}.s", lambda s: -s))
    elif case == "huge-certificate":
        craft(trio_profile, body=weight(name, tail=1e300, cross=1e300, ritz=1e300))
    elif case == "string-input":
        craft(trio_profile, body=lambda b: b["inputs"].update(base="x"))
    else:
        craft(trio_profile, meta={"schema_version": "²"})
    out = tmp_path / "out"
    patched = invoke(["patch", str(trio.adapter), "--profile", str(trio_profile), "-o", str(out)])
    expect_error(patched, ExitCode.CORRUPT, str(trio_profile), output=out)
    scored = invoke(["score", str(trio.adapter), "--profile", str(trio_profile), "--json"])
    expect_error(scored, ExitCode.CORRUPT, output=out)
    if case in ("huge-certificate", "string-input", "superscript"):  # metadata: inspect reads it
        for extra in ([], ["--json"]):
            shown = invoke(["inspect", str(trio_profile), *extra])
            expect_error(shown, ExitCode.CORRUPT, output=out)


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize(("out", "inp"), [(96, 40), (40, 96)])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
@pytest.mark.parametrize("spectrum", ["decaying", "flat", "rank-3", "one-big"])
def test_every_profile_the_builder_writes_passes_the_checks(
    tmp_path: Path, method: str, out: int, inp: int, scale: float, spectrum: str
) -> None:
    """No false alarm: the checks hold with room for whatever V, rank rule and Û method."""
    from safelora_cli.math.lowrank import RankRule
    from safelora_cli.runs.profile_build import build_profile, write_profile
    from tests.helpers import with_spectrum

    n = min(out, inp)
    sigmas = {
        "decaying": [(j + 1) ** -1.0 for j in range(n)],
        "flat": [1.0] * n,
        "rank-3": [3.0, 2.0, 1.0] + [0.0] * (n - 3),
        "one-big": [1e3] + [1e-3] * (n - 1),
    }[spectrum]
    v = (with_spectrum(out, inp, sigmas, seed=out + len(spectrum)) * scale).float()
    norm = float(torch.linalg.vector_norm(v.double()))
    for rule in (RankRule(rank=4, tolerance=None), RankRule(tolerance=0.05, max_rank=16)):
        entries = build_profile([("w.weight", v, norm)], rule, method=method)
        path = tmp_path / f"{rule.rank}.safetensors"
        write_profile(path, entries, {"base": {"ref": "b"}}, rule)
        open_all(path)

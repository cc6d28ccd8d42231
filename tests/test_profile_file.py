"""The profile file (``profile``, ``profile_build``): round trip, atomic writing, and every bad
file with its error class (corrupt 3, newer schema 4, NaN 5, output refused 6)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safelora_cli.errors import (
    CorruptFileError,
    FilesystemError,
    IncompatibleInputError,
    NumericalError,
    SafeLoraError,
    UsageError,
)
from safelora_cli.math.lowrank import LOWRANK, WHOLE, ZERO, LowRank, RankRule
from safelora_cli.math.lowrank_score import score_entry
from safelora_cli.runs import profile_build
from safelora_cli.runs.profile_build import build_profile, write_profile
from safelora_cli.sources.profile import SCHEMA_VERSION, check_adapter, load_entry, read_profile
from safelora_cli.sources.profile_summary import describe, provenance
from tests.helpers import factors, with_spectrum

RULE = RankRule(tolerance=0.01, max_rank=8)
INPUTS = {
    "base": {"ref": "org/base", "commit": "a" * 40, "files": {"model.safetensors": 123}},
    "aligned": {"ref": "/models/aligned", "files": {"model.safetensors": 456}},
}
STORED = {  # a local path is stored as the folder's name: the profile is shared with others
    "base": INPUTS["base"],
    "aligned": {"ref": "aligned", "files": {"model.safetensors": 456}},
}
# weight -> (out, in, decay of σ_i = i^-decay); "flat" cannot meet 0.01 within rank 8: whole
WEIGHTS = {
    "model.layers.0.self_attn.q_proj.weight": (48, 40, 1.5),
    "model.layers.0.mlp.down_proj.weight": (32, 56, 1.5),
    "model.layers.0.mlp.up_proj.weight": (56, 32, 0.0),
    "model.layers.1.self_attn.k_proj.weight": (16, 40, None),  # V = 0
}
Q, DOWN, UP, K = WEIGHTS


def make_vs() -> list[tuple[str, torch.Tensor, float]]:
    items = []
    for i, (name, (out, inp, decay)) in enumerate(WEIGHTS.items()):
        n = min(out, inp)
        if decay is None:
            v = torch.zeros(out, inp)
        else:
            v = with_spectrum(out, inp, [(j + 1) ** -decay for j in range(n)], seed=i).float()
        items.append((name, v, float(torch.linalg.vector_norm(v.double()))))
    return items


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, dict[str, LowRank]]:
    entries = build_profile(make_vs(), RULE)
    path = tmp_path / "pair.profile.safetensors"
    write_profile(path, entries, INPUTS, RULE, transposed={DOWN})
    return path, entries


def rewrite(
    path: Path,
    tensors: dict[str, torch.Tensor] | None = None,
    meta: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
) -> None:
    """Save the profile again with some tensors, metadata strings or profile JSON replaced."""
    old_tensors = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        old_meta = dict(fh.metadata())
    if body is not None:
        old_meta["profile"] = json.dumps(body)
    save_file(
        tensors if tensors is not None else old_tensors, str(path), {**old_meta, **(meta or {})}
    )


def body_of(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as fh:
        return dict(json.loads(fh.metadata()["profile"]))


# --- round trip --------------------------------------------------------------------------------


def test_round_trip(built: tuple[Path, dict[str, LowRank]]) -> None:
    path, entries = built
    profile = read_profile(path)
    assert (profile.schema_version, profile.inputs, profile.rule) == (SCHEMA_VERSION, STORED, RULE)
    assert [entries[w].kind for w in WEIGHTS] == [LOWRANK, LOWRANK, WHOLE, ZERO]
    for weight, entry in entries.items():
        info = profile.weights[weight]
        assert (info.shape, info.v_norm, info.kind, info.rank, info.method) == (
            entry.shape, entry.v_norm, entry.kind, entry.rank, entry.method,
        )  # fmt: skip
        assert info.certificate == entry.certificate
        assert info.transposed == (weight == DOWN)
        loaded = load_entry(profile, weight)
        for key in "usv":
            got, want = getattr(loaded, key), getattr(entry, key)
            assert (got is None and want is None) or torch.equal(got, want)
        if entry.kind != ZERO:
            a, b = factors(*entry.shape)
            got, want = score_entry(loaded, a, b), score_entry(entry, a, b)
            assert (got.cosine, got.cosine_bound) == (want.cosine, want.cosine_bound)
            assert got.projected_b is not None
            assert want.projected_b is not None
            assert torch.equal(got.projected_b, want.projected_b)


def test_the_file_is_plain_safetensors_with_the_documented_names(
    built: tuple[Path, dict[str, LowRank]],
) -> None:
    path, entries = built
    tensors = load_file(str(path))
    assert sorted(tensors) == sorted([f"{Q}.u", f"{Q}.s", f"{DOWN}.u", f"{DOWN}.s", f"{UP}.v"])
    assert tensors[f"{Q}.u"].shape == (48, entries[Q].rank)
    assert tensors[f"{UP}.v"].dtype == torch.float32
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert (meta["format"], meta["schema_version"]) == ("safelora-profile", str(SCHEMA_VERSION))
    weight = json.loads(meta["profile"])["weights"][Q]
    assert weight["captured_energy"] == pytest.approx(entries[Q].captured_energy)
    assert weight["shape"] == [48, 40]


def test_describe_lists_every_weight_and_totals(built: tuple[Path, dict[str, LowRank]]) -> None:
    path, entries = built
    summary = describe(read_profile(path))
    json.dumps(summary, allow_nan=False)  # JSON-ready
    rows = {row["weight"]: row for row in summary["weights"]}
    assert rows[Q]["rank"] == entries[Q].rank
    assert rows[Q]["relative_error"] == pytest.approx(entries[Q].relative_error)
    assert rows[Q]["relative_error"] <= RULE.tolerance
    assert rows[UP]["bytes"] == 56 * 32 * 4
    totals = summary["totals"]
    assert (totals["weights"], totals[LOWRANK], totals[WHOLE], totals[ZERO]) == (4, 2, 1, 1)
    assert totals["tensor_bytes"] == sum(e.nbytes for e in entries.values())
    assert totals["file_bytes"] == path.stat().st_size
    assert summary["inputs"] == STORED


def test_provenance_records_the_file_and_its_pair(built: tuple[Path, dict[str, LowRank]]) -> None:
    path, _ = built
    record = provenance(read_profile(path))
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (record["pair"], record["schema_version"], record["bytes"]) == (
        STORED, SCHEMA_VERSION, path.stat().st_size,
    )  # fmt: skip
    assert record["rank_rule"] == {"rank": None, "tolerance": 0.01, "max_rank": 8}


def test_builder_reports_progress_and_copies_reused_buffers() -> None:
    """The stream reuses one V buffer: entries must not keep a reference to it."""
    buffer = torch.zeros(56, 32)
    first = with_spectrum(56, 32, [1.0] * 32, seed=1).float()
    seen: list[tuple[int, int | None, str]] = []

    def items() -> Any:
        buffer.copy_(first)
        yield "a", buffer, float(first.double().norm())
        buffer.fill_(7.0)
        yield "b", buffer, float(buffer.double().norm())

    entries = build_profile(items(), RULE, total=2, progress=lambda *a: seen.append(a))
    assert seen == [(1, 2, "a"), (2, 2, "b")]
    assert entries["a"].kind == WHOLE
    assert entries["a"].v is not None
    assert torch.equal(entries["a"].v, first)


def test_builder_refuses_a_non_finite_v() -> None:
    v = torch.ones(8, 8)
    v[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="layer.weight") as caught:
        build_profile([("layer.weight", v, float("nan"))], RULE)
    assert caught.value.exit_code == 5


# --- writing -----------------------------------------------------------------------------------


def test_an_existing_file_is_refused_unless_forced(
    built: tuple[Path, dict[str, LowRank]],
) -> None:
    path, entries = built
    before = path.read_bytes()
    with pytest.raises(FilesystemError) as caught:
        write_profile(path, entries, {}, RULE)
    assert caught.value.exit_code == 6
    assert "--force" in caught.value.one_line()
    assert path.read_bytes() == before
    write_profile(path, entries, {"other": {"ref": "x"}}, RULE, force=True)
    assert read_profile(path).inputs == {"other": {"ref": "x"}}


@pytest.mark.parametrize("case", ["symlink", "folder", "no parent"])
def test_unsafe_outputs_are_refused(tmp_path: Path, case: str) -> None:
    path = tmp_path / "p.safetensors"
    if case == "symlink":
        path.symlink_to(tmp_path / "elsewhere")
    elif case == "folder":
        path.mkdir()
    else:
        path = tmp_path / "missing" / "p.safetensors"
    with pytest.raises(FilesystemError):
        write_profile(path, {}, {}, RULE, force=True)
    assert not (tmp_path / "elsewhere").exists()


def _partial_then(error: BaseException) -> Any:
    def save(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise error

    return save


@pytest.mark.parametrize(
    "error",
    [Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
     KeyboardInterrupt()],
)  # fmt: skip
def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(
    built: tuple[Path, dict[str, LowRank]], monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    path, entries = built
    before = path.read_bytes()
    monkeypatch.setattr(profile_build, "save_file", _partial_then(error))
    expected = KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else FilesystemError
    with pytest.raises(expected) as caught:
        write_profile(path, entries, INPUTS, RULE, force=True)
    if expected is FilesystemError:
        assert "disk full" in str(caught.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


# --- bad files ---------------------------------------------------------------------------------


def open_all(path: Path) -> None:
    """Everything a run would read: the header, then every weight."""
    profile = read_profile(path)
    for weight in profile.weights:
        load_entry(profile, weight)


def outcome(path: Path) -> SafeLoraError | None:
    try:
        open_all(path)
    except SafeLoraError as exc:
        return exc
    return None


def expect(error: type[SafeLoraError], path: Path, *parts: str) -> SafeLoraError:
    with pytest.raises(error) as caught:
        open_all(path)
    for part in parts:
        assert part in caught.value.one_line()
    return caught.value


@pytest.mark.parametrize(
    ("damage", "part"),
    [(lambda b: b"", "too short"),
     (lambda b: b[:-10], "truncated"),
     (lambda b: b + b"\0" * 8, "extra bytes"),
     (lambda b: b"version https://git-lfs.github.com/spec/v1\n", "git-lfs"),
     (lambda b: struct.pack("<Q", 10**12) + b[8:], "header length")],
)  # fmt: skip
def test_damaged_files_are_corrupt(
    built: tuple[Path, dict[str, LowRank]], damage: Any, part: str
) -> None:
    path, _ = built
    path.write_bytes(damage(path.read_bytes()))
    assert expect(CorruptFileError, path, str(path), part).exit_code == 3


def test_a_safetensors_file_that_is_not_a_profile(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path), {"format": "pt"})
    expect(CorruptFileError, path, "not a safelora profile", "safelora profile --base")


@pytest.mark.parametrize(
    ("meta", "part"),
    [({"profile": "{not json"}, "not valid JSON"),
     ({"profile": "[1, 2]"}, "not a JSON object"),
     ({"profile": '{"weights": {}, "weights": {}}'}, "twice"),
     ({"schema_version": "abc"}, "schema_version"),
     ({"schema_version": "0"}, "schema_version")],
)  # fmt: skip
def test_bad_metadata_is_corrupt(
    built: tuple[Path, dict[str, LowRank]], meta: dict[str, str], part: str
) -> None:
    path, _ = built
    rewrite(path, meta=meta)
    expect(CorruptFileError, path, part)


def test_a_newer_schema_is_exit_4_with_a_hint_to_upgrade(
    built: tuple[Path, dict[str, LowRank]],
) -> None:
    path, _ = built
    rewrite(path, meta={"schema_version": str(SCHEMA_VERSION + 1)})
    error = expect(IncompatibleInputError, path, "newer", "upgrade safelora")
    assert error.exit_code == 4


def _edit(weight: str, **fields: Any) -> Any:
    def apply(body: dict[str, Any]) -> None:
        for key, value in fields.items():
            if value is None:
                del body["weights"][weight][key]
            else:
                body["weights"][weight][key] = value

    return apply


@pytest.mark.parametrize(
    ("edit", "part"),
    [(lambda b: b.pop("weights"), "'weights'"),
     (lambda b: b.pop("inputs"), "'inputs'"),
     (lambda b: b["rank_rule"].update(rank=3), "exactly one of"),
     (_edit(Q, v_norm=None), "'v_norm'"),
     (_edit(Q, v_norm=-1.0), "'v_norm'"),
     (_edit(Q, v_norm=float("nan")), "NaN"),
     (_edit(Q, tail="big"), "'tail'"),
     (_edit(Q, shape=[49, 40]), "F32 [49,"),
     (_edit(Q, shape=[48]), "is not [out, in]"),
     (_edit(Q, rank=1), "metadata says F32 [48, 1]"),
     (_edit(Q, kind="dense"), "kind 'dense'"),
     (_edit(Q, method="magic"), "method 'magic'"),
     (_edit(Q, transposed="yes"), "'transposed'"),
     (_edit(Q, sha256={}), "sha256"),
     (_edit(K, v_norm=1.0), "do not fit"),
     (lambda b: b["weights"].pop(Q), f"2 not described ({Q}.s, {Q}.u)"),
     (lambda b: b["weights"].update(extra=dict(b["weights"][Q])), "2 missing (extra.s, extra.u)")],
)  # fmt: skip
def test_metadata_not_matching_the_file_is_corrupt(
    built: tuple[Path, dict[str, LowRank]], edit: Any, part: str
) -> None:
    path, _ = built
    body = body_of(path)
    edit(body)
    rewrite(path, body=body)
    expect(CorruptFileError, path, str(path), part)


def test_a_tensor_of_the_wrong_dtype_is_corrupt(built: tuple[Path, dict[str, LowRank]]) -> None:
    path, _ = built
    tensors = load_file(str(path))
    tensors[f"{Q}.s"] = tensors[f"{Q}.s"].half()
    rewrite(path, tensors=tensors)
    expect(CorruptFileError, path, f"{Q}.s", "F16")


def test_nan_in_a_stored_tensor_is_exit_5(built: tuple[Path, dict[str, LowRank]]) -> None:
    path, _ = built
    tensors = load_file(str(path))
    tensors[f"{UP}.v"][3, 4] = float("inf")
    rewrite(path, tensors=tensors)
    read_profile(path)  # the header is fine: the tensor is checked when read
    assert expect(NumericalError, path, f"{UP}.v", "NaN or Inf").exit_code == 5


def test_a_changed_value_fails_its_checksum(built: tuple[Path, dict[str, LowRank]]) -> None:
    path, _ = built
    tensors = load_file(str(path))
    tensors[f"{Q}.u"][0, 0] += 1e-3
    rewrite(path, tensors=tensors)
    expect(CorruptFileError, path, f"{Q}.u", "sha256")


def test_an_edited_captured_energy_is_corrupt(built: tuple[Path, dict[str, LowRank]]) -> None:
    path, _ = built
    body = body_of(path)
    body["weights"][Q]["captured_energy"] = 0.5
    rewrite(path, body=body)
    expect(CorruptFileError, path, Q, "0.500000")


def test_duplicate_tensor_names_are_corrupt(tmp_path: Path) -> None:
    header = b'{"a.s":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
    header += b'"a.s":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    expect(CorruptFileError, path, "appears twice")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "fifo.safetensors"
    os.mkfifo(path)
    expect(CorruptFileError, path, "not a regular file")


@pytest.mark.parametrize("case", ["missing", "folder"])
def test_missing_file_or_folder_is_a_usage_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / "p.safetensors"
    if case == "folder":
        path.mkdir()
    assert expect(UsageError, path, str(path)).exit_code == 2


@settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_byte_damage_is_always_a_clean_error(
    built: tuple[Path, dict[str, LowRank]], data: st.DataObject
) -> None:
    """Any byte of the file flipped: a SafeLoraError (3, 4 or 5), or, where it changed nothing
    that matters (JSON whitespace in a key's value, say), a profile that still loads."""
    path, _ = built
    original = path.read_bytes()
    try:
        where = data.draw(st.integers(0, len(original) - 1))
        value = data.draw(st.integers(0, 255))
        damaged = bytearray(original)
        damaged[where] = value
        path.write_bytes(bytes(damaged))
        error = outcome(path)
        assert error is None or error.exit_code in (3, 4, 5)
    finally:
        path.write_bytes(original)


# --- fitting an adapter ------------------------------------------------------------------------


def test_check_adapter_accepts_a_fitting_adapter(built: tuple[Path, dict[str, LowRank]]) -> None:
    path, _ = built
    check_adapter(read_profile(path), {Q: (48, 40), DOWN: (32, 56)}, transposed={DOWN})


def test_check_adapter_reports_every_problem_at_once(
    built: tuple[Path, dict[str, LowRank]],
) -> None:
    path, _ = built
    modules = {
        Q: (48, 41),  # shape
        DOWN: (32, 56),  # layout: profiled as Conv1D, the adapter says Linear
        "model.layers.5.mlp.up_proj.weight": (56, 32),  # missing
        "model.layers.6.mlp.up_proj.weight": (56, 32),  # missing
    }
    with pytest.raises(IncompatibleInputError) as caught:
        check_adapter(read_profile(path), modules)
    message = caught.value.message
    assert caught.value.exit_code == 4
    for part in ("2 adapter weight(s) not in the profile", "layers.5", "layers.6",
                 "1 shape mismatch", "adapter [48, 41], profile [48, 40]",
                 "1 weight(s) profiled in the other layout", DOWN):  # fmt: skip
        assert part in message

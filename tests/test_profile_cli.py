"""Alignment profiles end to end: `safelora profile`, then `patch`/`score --profile` with no model
weight read, against runs on the model pair itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safelora_cli.errors import ExitCode
from safelora_cli.inputs.resolve import PROFILE_NAME
from safelora_cli.sources.profile import SCHEMA_VERSION
from safelora_cli.synthetic import LlamaShape, PairSpec, all_modules, make_adapter, make_pair
from tests.conftest import Trio, TrioFactory
from tests.helpers import (
    MODEL,
    REPORT,
    WEIGHTS,
    assert_error,
    cache_repo,
    edit_tensors,
    invoke,
    leftovers,
)


def make_profile(trio: Trio, path: Path, *extra: str) -> dict[str, object]:
    args = ["profile", "--base", str(trio.base), "--aligned", str(trio.aligned),
            "--output", str(path), "--json", *extra]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == ExitCode.OK, result.stderr
    summary: dict[str, object] = json.loads(result.stdout)
    return summary


def patch(trio: Trio, out: Path, source: list[str], *extra: str) -> dict[str, object]:
    result = invoke(["patch", str(trio.adapter), *source, "-o", str(out), "-q", *extra])
    assert result.exit_code == ExitCode.OK, result.stderr
    report: dict[str, object] = json.loads((out / REPORT).read_text())
    return report


def pair(trio: Trio) -> list[str]:
    return ["--base", str(trio.base), "--aligned", str(trio.aligned)]


def test_subspace_through_a_profile_equals_the_model_pair_run(trio: Trio, tmp_path: Path) -> None:
    """Round trip: profile the pair, delete it, patch from the profile: the same adapter as a
    run on the pair (subspace, within the stored rank: exact up to float rounding)."""
    profile = tmp_path / "pair.safetensors"
    make_profile(trio, profile, "--rank", "8")  # V has rank 4: the profile keeps those 4
    args = ("--projection", "subspace", "--rank", "3", "-k", "5")
    on_pair = patch(trio, tmp_path / "on-pair", pair(trio), *args)
    shutil.rmtree(trio.base)
    shutil.rmtree(trio.aligned)
    via = patch(trio, tmp_path / "via", ["--profile", str(profile)], *args)
    cos_pair = {m["module"]: m["cosine"] for m in on_pair["modules"]}  # type: ignore[attr-defined]
    for module in via["modules"]:  # type: ignore[attr-defined]
        assert module["cosine"] == pytest.approx(cos_pair[module["module"]], abs=1e-5)
        assert module["profile_rank"] >= 3  # at most 8, as built; the rank V has (4) or more
    assert [m["projected"] for m in via["modules"]] == [  # type: ignore[attr-defined]
        m["projected"]
        for m in on_pair["modules"]  # type: ignore[attr-defined]
    ]
    got, want = load_file(tmp_path / "via" / WEIGHTS), load_file(tmp_path / "on-pair" / WEIGHTS)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6)


def test_paper_mode_cosines_are_within_their_bounds(trio: Trio, tmp_path: Path) -> None:
    profile = tmp_path / "low.safetensors"
    make_profile(trio, profile, "--rank", "2")  # the synthetic V has rank 4: a real error
    on_pair = json.loads(invoke(["score", str(trio.adapter), *pair(trio), "--json"]).stdout)
    via = json.loads(
        invoke(["score", str(trio.adapter), "--profile", str(profile), "--json"]).stdout
    )
    exact = {m["module"]: m["cosine"] for m in on_pair["modules"]}
    errors = []
    for module in via["modules"]:
        error = abs(module["cosine"] - exact[module["module"]])
        assert error <= module["cosine_bound"], module["module"]
        errors.append(error)
    assert max(errors) > 1e-4  # rank 2 of 4: the bound is exercised, not trivially met
    inputs = via["inputs"]
    # the pair the profile was made from, named as the profile stores it: by folder name
    assert inputs["profile"]["pair"]["base"]["path"] == trio.base.name
    assert inputs["aligned"]["path"] == trio.aligned.name
    assert len(inputs["profile"]["sha256"]) == 64
    assert inputs["profile"]["rank_rule"]["rank"] == 2
    assert inputs["profile"]["schema_version"] == SCHEMA_VERSION


def test_a_module_closer_to_the_cut_than_its_bound_is_flagged(trio: Trio, tmp_path: Path) -> None:
    profile = tmp_path / "low.safetensors"
    make_profile(trio, profile, "--rank", "2")
    scored = json.loads(
        invoke(["score", str(trio.adapter), "--profile", str(profile), "--json"]).stdout
    )
    module = max(scored["modules"], key=lambda m: m["cosine_bound"])
    cut = str(module["cosine"])  # a threshold right on a module's cosine: within its bound
    args = ["score", str(trio.adapter), "--profile", str(profile), "--json",
            "--select", "threshold", "--threshold", cut]  # fmt: skip
    result = invoke(args)
    report = json.loads(result.stdout)
    flagged = {m["module"] for m in report["modules"] if m["uncertain"]}
    assert module["module"] in flagged
    assert report["summary"]["uncertain"] == len(flagged)
    assert "profile-boundary" in {w["code"] for w in report["warnings"]}
    assert "closer to the selection's cut than the profile's error bound" in result.stderr


def test_profile_instead_of_the_pair_not_both(trio: Trio, tmp_path: Path) -> None:
    profile = tmp_path / "p.safetensors"
    make_profile(trio, profile)
    both = invoke(["score", str(trio.adapter), "--profile", str(profile), "--base", str(trio.base)])
    assert_error(both, ExitCode.USAGE, "--profile and --base")
    merge = invoke(["patch", str(trio.adapter), "--profile", str(profile), "-o",
                    str(tmp_path / "m"), "--merge"])  # fmt: skip
    assert_error(merge, ExitCode.USAGE, "--merge")
    rank = invoke(["score", str(trio.adapter), "--profile", str(profile), "--projection",
                   "subspace", "--rank", "50"])  # fmt: skip
    assert_error(rank, ExitCode.INCOMPATIBLE, "--rank 50", "stores rank")


def test_a_profile_of_another_model_is_refused_with_every_problem(
    make_trio: TrioFactory, tmp_path: Path
) -> None:
    trio = make_trio()
    other = make_trio(shape=LlamaShape(intermediate=96), seed=5)
    profile = tmp_path / "other.safetensors"
    make_profile(other, profile)
    result = invoke(["score", str(trio.adapter), "--profile", str(profile)])
    line = assert_error(result, ExitCode.INCOMPATIBLE, "does not fit the adapter")
    assert "6 shape mismatch(es)" in line  # gate, up and down of two layers, at once


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        ("truncate", ExitCode.CORRUPT),
        ("not-a-profile", ExitCode.CORRUPT),
        ("newer", ExitCode.INCOMPATIBLE),
    ],
)
def test_a_damaged_profile_is_a_clean_error(
    trio: Trio, tmp_path: Path, damage: str, code: ExitCode
) -> None:
    profile = tmp_path / "p.safetensors"
    make_profile(trio, profile)
    raw = profile.read_bytes()
    if damage == "truncate":
        profile.write_bytes(raw[: len(raw) - 10])
    elif damage == "not-a-profile":
        shutil.copyfile(trio.adapter / WEIGHTS, profile)
    else:
        profile.write_bytes(raw.replace(b'"schema_version":"1"', b'"schema_version":"9"'))
    out = tmp_path / "out"
    assert_error(invoke(["patch", str(trio.adapter), "--profile", str(profile), "-o", str(out)]),
                 code)  # fmt: skip
    assert not out.exists()


def test_profile_from_the_hub_cache(trio: Trio, tmp_path: Path, hub: Path) -> None:
    built = tmp_path / "built"
    built.mkdir()
    make_profile(trio, built / PROFILE_NAME)
    cache_repo(hub, "org/pair-profile", built)
    result = invoke(["score", str(trio.adapter), "--profile", "org/pair-profile", "--json"])
    assert result.exit_code == ExitCode.OK, result.stderr
    profile = json.loads(result.stdout)["inputs"]["profile"]
    assert (profile["hub_id"], profile["revision"]) == ("org/pair-profile", "main")
    missing = invoke(["score", str(trio.adapter), "--profile", "org/nothing"])
    assert_error(missing, ExitCode.HUB, "org/nothing")


def test_profile_command_writes_atomically_and_describes(trio: Trio, tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    summary = make_profile(trio, path, "--tolerance", "0.001")
    assert summary["totals"]["weights"] == len(trio.modules)  # type: ignore[index]
    assert summary["rank_rule"] == {"rank": None, "tolerance": 0.001, "max_rank": 256}
    again = invoke(["profile", *pair(trio), "--output", str(path)])
    assert_error(again, ExitCode.FILESYSTEM, "exists")
    both = invoke(["profile", *pair(trio), "--output", str(tmp_path / "q"), "--rank", "2",
                   "--tolerance", "0.1"])  # fmt: skip
    assert_error(both, ExitCode.USAGE, "--rank or --tolerance")
    shown = invoke(["inspect", str(path), "--json"])
    assert json.loads(shown.stdout)["totals"] == summary["totals"]
    targets = make_profile(trio, tmp_path / "t.safetensors", "--targets", "q_proj,lm_head")
    assert sorted(w["weight"] for w in targets["weights"]) == sorted(  # type: ignore[attr-defined]
        [f"{m}.weight" for m in trio.modules if m.endswith("q_proj")] + ["lm_head.weight"]
    )
    assert leftovers(tmp_path) == []


def test_a_weight_holding_nan_is_exit_5_and_nothing_is_written(tmp_path: Path) -> None:
    """The error is raised in a worker thread of the stream, mid-run: it still ends the run
    with its own exit code, and no profile file (or staging file) is left."""
    base, aligned = make_pair(tmp_path, PairSpec(seed=9))
    weight = "model.layers.1.mlp.up_proj.weight"

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[weight][3, 5] = float("nan")

    edit_tensors(aligned / "model.safetensors", poison)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(["profile", "--base", str(base), "--aligned", str(aligned),
                     "--output", str(out / "p.safetensors")])  # fmt: skip
    assert_error(result, ExitCode.NUMERICAL, weight)
    assert list(out.iterdir()) == []


def test_a_batch_and_the_gate_through_one_profile(tmp_path: Path) -> None:
    base, aligned = make_pair(tmp_path, PairSpec(seed=8))
    modules = all_modules(LlamaShape(), ("q_proj", "v_proj"))
    first = make_adapter(tmp_path / "one", base, aligned, modules, seed=1)
    second = make_adapter(tmp_path / "two", base, aligned, modules, seed=2)
    profile = tmp_path / "p.safetensors"
    assert invoke(["profile", "--base", str(base), "--aligned", str(aligned),
                   "-o", str(profile), "-q"]).exit_code == 0  # fmt: skip
    out = tmp_path / "out"
    result = invoke(["patch", str(first), str(second), "--profile", str(profile), "-o", str(out),
                     "-k", "1", "-q"])  # fmt: skip
    assert result.exit_code == ExitCode.OK, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["one", "two"]
    gate = invoke(["score", str(first), "--profile", str(profile), "--fail-if-projected", "0",
                   "-k", "2", "-q"])  # fmt: skip
    assert gate.exit_code == ExitCode.GATE_FAILED


def test_show_renders_a_report_made_through_a_profile(trio: Trio, tmp_path: Path) -> None:
    profile = tmp_path / "p.safetensors"
    make_profile(trio, profile)
    out = tmp_path / "out"
    patch(trio, out, ["--profile", str(profile)])
    shown = invoke(["show", str(out / REPORT)])
    assert shown.exit_code == ExitCode.OK, shown.stderr
    assert "via profile" in shown.stderr


@pytest.mark.parametrize(
    ("flags", "flag"),
    [(["--tolerance", "0"], "--tolerance"),
     (["--tolerance", "-0.0"], "--tolerance"),
     (["--tolerance", "1e-400"], "--tolerance"),  # parses to 0.0: refused, not the default
     (["--tolerance", "nan"], "--tolerance"),
     (["--tolerance", "1"], "--tolerance"),
     (["--tolerance", "-0.5"], "--tolerance"),
     (["--rank", "0"], "--rank"),
     (["--rank", "-2"], "--rank"),
     (["--max-rank", "0"], "--max-rank")],
)  # fmt: skip
def test_a_rank_rule_out_of_range_is_exit_2_never_the_default(
    trio: Trio, tmp_path: Path, flags: list[str], flag: str
) -> None:
    out = tmp_path / "p.safetensors"
    result = invoke(["profile", *pair(trio), "--output", str(out), *flags])
    line = assert_error(result, ExitCode.USAGE, flag)
    assert "Traceback" not in result.stderr
    assert "0.01" not in line  # never replaced by the default tolerance
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_profile_messages_name_the_aligned_model_not_a_fine_tune(
    trio: Trio, tmp_path: Path
) -> None:
    out = tmp_path / "p.safetensors"
    unknown = invoke(["profile", *pair(trio), "--output", str(out), "--targets", "no_such_proj"])
    line = assert_error(unknown, ExitCode.USAGE, "--targets no_such_proj", "the aligned model")
    assert "fine-tune" not in line
    regex = invoke(["profile", *pair(trio), "--output", str(out), "--targets", "nothing.*here"])
    line = assert_error(regex, ExitCode.USAGE, "no weight of the aligned model")
    assert "fine-tune" not in line
    edit_tensors(trio.base / MODEL, lambda t: t.pop(f"{trio.modules[0]}.weight"))
    missing = invoke(["profile", *pair(trio), "--output", str(out)])
    line = assert_error(missing, ExitCode.INCOMPATIBLE, "in the aligned model, absent in the base")
    assert "fine-tune" not in line
    assert not out.exists()

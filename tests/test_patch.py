"""End-to-end ``safelora patch`` through the CLI, checked against a dense float64 reference.

Each test builds a seeded synthetic trio, runs the command in-process, and recomputes everything
from the files themselves: V = W_aligned − W_base in float64, Ĉ = V Vᵀ/‖V‖_F as a dense matrix,
cos(Ĉ B A, B A) over the flattened update, and the paper's selection rule. The output folder and
the report must agree with that reference; every tensor that is not projected must come back
byte for byte.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safelora_cli.errors import ExitCode
from safelora_cli.output.published import published_report
from safelora_cli.synthetic import LlamaShape
from tests.conftest import Trio, TrioFactory
from tests.helpers import (
    CARD,
    CONFIG,
    DOWN1,
    LORA_KEY,
    Q0,
    REPORT,
    WEIGHTS,
    Cli,
    DenseModule,
    assert_close_in_dtype,
    expect_error,
    leftovers,
    paper_selection,
    read_raw,
    snapshot,
)
from tests.helpers import dense_reference as dense_from_files

MODULE_FIELDS = {
    "module",
    "shape",
    "rank",
    "cosine",
    "projected",
    "skipped",
    "v_norm",
    "b_norm_before",
    "b_norm_after",
    "pdst",
}
COS_RTOL = 1e-5


def dense_reference(trio: Trio) -> dict[str, DenseModule]:
    """The dense float64 reference (``helpers.dense_reference``) of the trio's files."""
    return dense_from_files(trio.base, trio.aligned, trio.adapter)


def midpoint_threshold(dense: dict[str, DenseModule]) -> float:
    """A threshold halfway between two neighbouring cosines, so rounding cannot flip a module."""
    ordered = sorted(d.cosine for d in dense.values() if d.cosine is not None)
    lo, hi = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
    assert hi - lo > 1e-4
    return (lo + hi) / 2


# --- the core check -----------------------------------------------------------------------------

CASES = [
    pytest.param({}, id="fp32-single"),
    pytest.param(
        {
            "dtype": torch.float16,
            "shards": 3,
            "rank": 2,
            "shape": LlamaShape(hidden=32, intermediate=80, heads=4, kv_heads=1),
        },
        id="fp16-sharded",
    ),  # fmt: skip
    pytest.param(
        {"dtype": torch.bfloat16, "rank": 8, "identical": ("model.layers.1.self_attn.k_proj",)},
        id="bf16-single-identical",
    ),
    pytest.param(
        {"dtype": torch.bfloat16, "adapter_dtype": torch.float32, "shards": 3, "seed": 3},
        id="bf16-base-fp32-adapter-sharded",
    ),
    pytest.param(
        {"dtype": torch.float32, "adapter_dtype": torch.float16, "rank": 1, "seed": 4},
        id="fp32-base-fp16-adapter-r1",
    ),
    pytest.param(
        {
            "shards": 3,
            "rank": 16,
            "seed": 5,
            "shape": LlamaShape(hidden=48, intermediate=24, layers=3, heads=4, kv_heads=2),
        },
        id="fp32-sharded-wide-mlp-r16",
    ),  # fmt: skip
]


@pytest.mark.parametrize("mode", ["number", "threshold"])
@pytest.mark.parametrize("options", CASES)
def test_patch_matches_dense_reference(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, options: dict[str, Any], mode: str
) -> None:
    trio = make_trio(**options)
    dense = dense_reference(trio)
    adapter_before = snapshot(trio.adapter)
    k = max(1, len(trio.modules) // 3)
    t = midpoint_threshold(dense)
    flags = ["--num-layers", str(k)] if mode == "number" else ["--select", "threshold"]
    flags += ["--threshold", str(t)] if mode == "threshold" else []
    out = tmp_path / "out"

    result = cli(trio.patch_args(out, *flags, "--quiet"))

    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stdout == f"{out}\n"
    assert result.stderr == ""
    assert sorted(p.name for p in out.iterdir()) == [CARD, CONFIG, WEIGHTS, REPORT]
    assert leftovers(tmp_path) == []
    assert snapshot(trio.adapter) == adapter_before  # the input is never written

    report = json.loads((out / REPORT).read_text())
    expected = paper_selection(dense, mode, k, t)
    assert 0 < len(expected) < len(dense)  # a case where selection matters
    check_report(report, dense, expected, mode, k, t, trio, out)
    check_weights(trio, out, dense, expected)
    assert (out / CONFIG).read_bytes() == (trio.adapter / CONFIG).read_bytes()


def check_report(
    report: dict[str, Any],
    dense: dict[str, DenseModule],
    expected: set[str],
    mode: str,
    k: int,
    t: float,
    trio: Trio,
    out: Path,
) -> None:
    assert report["schema_version"] == 1
    assert report["tool"]["name"] == "safelora"
    assert isinstance(report["tool"]["version"], str)
    assert report["tool"]["version"]
    settings = report["settings"]
    assert settings["select"] == mode
    assert settings["projection"] == "paper"
    assert settings["num_layers"] == (k if mode == "number" else None)
    assert settings["threshold"] == (None if mode == "number" else pytest.approx(t))
    for role, folder in (("base", trio.base), ("aligned", trio.aligned), ("adapter", trio.adapter)):
        entry = report["inputs"][role]
        assert entry["path"] == entry["ref"] == folder.name  # published: the folder's name only
        on_disk = {p.name: p.stat().st_size for p in folder.glob("*.safetensors")}
        assert on_disk.items() <= entry["files"].items()
    assert report["output"] == out.name
    assert report["output_kind"] == "adapter"
    assert settings["merge"] is False

    rows = {m["module"]: m for m in report["modules"]}
    assert len(rows) == len(report["modules"]) == len(dense)
    assert set(rows) == set(dense)
    for name, row in rows.items():
        d = dense[name]
        assert MODULE_FIELDS <= row.keys()
        assert row["shape"] == list(d.shape)
        assert row["rank"] == d.rank
        assert row["projected"] == (name in expected)
        assert row["v_norm"] == pytest.approx(d.v_norm, rel=COS_RTOL, abs=0.0)
        assert row["b_norm_before"] == pytest.approx(d.b_norm, rel=COS_RTOL)
        if d.cosine is None:
            assert row["cosine"] is None
            assert row["skipped"] == "base and aligned identical"
            assert row["pdst"] is None
            assert row["b_norm_after"] == row["b_norm_before"]
            continue
        assert row["skipped"] is None
        assert abs(row["cosine"] - d.cosine) <= COS_RTOL * abs(d.cosine), name
        after = d.pb_norm if row["projected"] else d.b_norm
        assert row["b_norm_after"] == pytest.approx(after, rel=COS_RTOL)
        pdst = 1.0 if row["projected"] else 1.0 / (1.0 + d.distance)
        assert row["pdst"] == pytest.approx(pdst, rel=COS_RTOL)

    summary = report["summary"]
    scored = [m for m in report["modules"] if m["pdst"] is not None]
    assert summary["modules"] == len(dense)
    assert summary["projected"] == len(expected)
    assert summary["skipped"] == sum(d.cosine is None for d in dense.values())
    assert summary["mean_pdst"] == pytest.approx(sum(m["pdst"] for m in scored) / len(scored))
    if mode == "number":
        kth = sorted(d.cosine for d in dense.values() if d.cosine is not None)[k - 1]
        assert summary["threshold_used"] == pytest.approx(kth, rel=COS_RTOL)
    else:
        assert summary["threshold_used"] == pytest.approx(t)


def check_weights(trio: Trio, out: Path, dense: dict[str, DenseModule], expected: set[str]) -> None:
    before, after = read_raw(trio.adapter / WEIGHTS), read_raw(out / WEIGHTS)
    assert after.metadata == before.metadata
    assert after.entries.keys() == before.entries.keys()
    for name, entry in before.entries.items():
        assert after.entries[name]["dtype"] == entry["dtype"], name
        assert after.entries[name]["shape"] == entry["shape"], name
    projected_keys = {dense[m].b_key for m in expected}
    for name in before.entries:
        if name not in projected_keys:
            assert after.data[name] == before.data[name], f"{name} changed"
    with safe_open(str(out / WEIGHTS), "pt") as patched:
        for module in expected:
            d = dense[module]
            assert d.projected_b is not None
            got = patched.get_tensor(d.b_key)
            assert_close_in_dtype(got, d.projected_b, got.dtype)
            assert after.data[d.b_key] != before.data[d.b_key]


# --- skipped modules ----------------------------------------------------------------------------


def test_identical_module_is_skipped_and_run_goes_on(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    same = (Q0, DOWN1)
    trio = make_trio(identical=same)
    dense = dense_reference(trio)
    out = tmp_path / "out"
    k = len(trio.modules) - len(same)  # every scored module

    result = cli(trio.patch_args(out, "--num-layers", str(k), "--quiet"))

    assert result.exit_code == ExitCode.OK, result.stderr
    report = json.loads((out / REPORT).read_text())
    rows = {m["module"]: m for m in report["modules"]}
    for module in same:
        assert rows[module]["skipped"] == "base and aligned identical"
        assert rows[module]["cosine"] is None
        assert rows[module]["projected"] is False
    assert report["summary"]["skipped"] == len(same)
    assert report["summary"]["projected"] == k
    assert {m for m, r in rows.items() if r["projected"]} == set(trio.modules) - set(same)
    before, after = read_raw(trio.adapter / WEIGHTS), read_raw(out / WEIGHTS)
    for module in same:
        assert after.data[dense[module].b_key] == before.data[dense[module].b_key]


def test_passthrough_mixed_dtypes_and_metadata_survive(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    """An adapter file with a non-LoRA tensor, one lora_B in bf16 beside an fp32 lora_A, and its
    own metadata: everything but the projected lora_B comes back byte for byte."""
    extra = "base_model.model.model.norm.modules_to_save.default.weight"
    mixed = trio.modules[3]
    path = trio.adapter / WEIGHTS
    tensors = load_file(path)
    tensors[extra] = torch.linspace(-1, 1, trio.shape.hidden, dtype=torch.float16)
    b_key = f"base_model.model.{mixed}.lora_B.weight"
    tensors[b_key] = tensors[b_key].to(torch.bfloat16)
    metadata = {"format": "pt", "origin": "hand-made"}
    save_file(tensors, str(path), metadata=metadata)
    dense = dense_reference(trio)
    out = tmp_path / "out"

    result = cli(trio.patch_args(out, "--num-layers", str(len(trio.modules)), "--quiet"))

    assert result.exit_code == ExitCode.OK, result.stderr
    report = json.loads((out / REPORT).read_text())
    assert report["passthrough"] == [extra]
    assert report["summary"]["projected"] == len(trio.modules)
    before, after = read_raw(path), read_raw(out / WEIGHTS)
    assert after.metadata == metadata
    assert after.entries[extra] == before.entries[extra] | {"data_offsets": ANY}
    assert after.data[extra] == before.data[extra]
    assert after.entries[b_key]["dtype"] == "BF16"
    check_weights(trio, out, dense, set(trio.modules))


# --- stdout, stderr and where the report goes ---------------------------------------------------


def test_stdout_is_only_the_output_path_and_table_goes_to_stderr(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = cli(trio.patch_args(out, "--num-layers", "3"))
    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stdout == f"{out}\n"
    report = json.loads((out / REPORT).read_text())
    lowest = min(report["modules"], key=lambda m: m["cosine"])
    assert lowest["module"] in result.stderr  # the summary table lists projected modules
    assert "projected" in result.stderr


def test_quiet_leaves_stderr_empty(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli(trio.patch_args(out, "--quiet"))
    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stderr == ""
    assert result.stdout == f"{out}\n"


def test_json_prints_only_the_report(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli(trio.patch_args(out, "--json", "--num-layers", "4"))  # table still on stderr
    assert result.exit_code == ExitCode.OK, result.stderr
    printed = json.loads(result.stdout)  # the whole of stdout is one JSON document
    written = json.loads((out / REPORT).read_text())
    assert printed["inputs"]["adapter"]["path"] == str(trio.adapter.resolve())  # full paths
    assert printed["output"] == str(out)
    assert written == published_report(printed)  # the published form of the same report
    assert written["inputs"]["adapter"]["path"] == trio.adapter.name
    assert printed["summary"]["projected"] >= 4


def test_report_path_writes_there_and_not_in_output(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out, report_file = tmp_path / "out", tmp_path / "reports" / "run.json"
    report_file.parent.mkdir()
    result = cli(trio.patch_args(out, "--report", str(report_file), "--json", "--quiet"))
    assert result.exit_code == ExitCode.OK, result.stderr
    assert not (out / REPORT).exists()
    assert sorted(p.name for p in out.iterdir()) == [CARD, CONFIG, WEIGHTS]
    written = json.loads(report_file.read_text())
    assert written == json.loads(result.stdout)
    assert written["output"] == str(out)
    assert [p.name for p in report_file.parent.iterdir()] == ["run.json"]


# --- key layouts --------------------------------------------------------------------------------


def test_key_variants_give_the_same_projection(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    variants = {
        "peft": make_trio(seed=7),
        "no-prefix": make_trio(seed=7, key_prefix=""),
        "named": make_trio(seed=7, adapter_name="default"),
    }
    patched: dict[str, dict[str, bytes]] = {}
    cosines: dict[str, dict[str, float]] = {}
    for label, trio in variants.items():
        out = tmp_path / f"out-{label}"
        result = cli(trio.patch_args(out, "--num-layers", "5", "--quiet"))
        assert result.exit_code == ExitCode.OK, f"{label}: {result.stderr}"
        before, after = read_raw(trio.adapter / WEIGHTS), read_raw(out / WEIGHTS)
        assert after.entries.keys() == before.entries.keys()  # keys are kept as they were
        by_module = {}
        for key, data in after.data.items():
            match = LORA_KEY.match(key)
            assert match is not None, key
            by_module[f"{match['module']}.{match['kind']}"] = data
        patched[label] = by_module
        report = json.loads((out / REPORT).read_text())
        cosines[label] = {m["module"]: m["cosine"] for m in report["modules"]}
        assert report["summary"]["projected"] == 5

    assert patched["no-prefix"] == patched["peft"]
    assert patched["named"] == patched["peft"]
    assert cosines["no-prefix"] == cosines["peft"]
    assert cosines["named"] == cosines["peft"]
    # and the projection did happen: some lora_B differs from the input
    source = read_raw(variants["peft"].adapter / WEIGHTS).data
    output = read_raw(tmp_path / "out-peft" / WEIGHTS).data
    changed = [key for key in source if output[key] != source[key]]
    assert len(changed) == 5
    assert all(".lora_B." in k for k in changed)


# --- usage and filesystem errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        pytest.param(["--num-layers", "0"], "--num-layers", id="k-zero"),
        pytest.param(["--num-layers", "15"], "--num-layers", id="k-above-modules"),
        pytest.param(["--select", "threshold", "--threshold", "1.5"], "--threshold", id="t-big"),
    ],
)
def test_usage_errors_write_nothing(
    trio: Trio, cli: Cli, tmp_path: Path, flags: list[str], named: str
) -> None:
    assert len(trio.modules) == 14
    out = tmp_path / "out"
    expect_error(cli(trio.patch_args(out, *flags)), ExitCode.USAGE, named, output=out)


def test_existing_output_without_force_is_refused_untouched(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / WEIGHTS).write_bytes(b"mine, not yours")
    result = cli(trio.patch_args(out, "--quiet"))
    expect_error(
        result, ExitCode.FILESYSTEM, "--output", "--force", output=out, output_existed=True
    )
    assert snapshot(out) == {WEIGHTS: b"mine, not yours"}


def test_force_replaces_our_files_and_keeps_others(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    assert cli(trio.patch_args(fresh, "--quiet")).exit_code == ExitCode.OK
    out = tmp_path / "out"
    out.mkdir()
    (out / WEIGHTS).write_bytes(b"stale weights")
    (out / REPORT).write_text("{}")
    (out / "notes.txt").write_text("keep me")

    result = cli(trio.patch_args(out, "--quiet", "--force"))

    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stdout == f"{out}\n"
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / WEIGHTS).read_bytes() == (fresh / WEIGHTS).read_bytes()
    assert (out / CONFIG).read_bytes() == (trio.adapter / CONFIG).read_bytes()
    report = json.loads((out / REPORT).read_text())
    assert (
        report["summary"]["projected"]
        == json.loads((fresh / REPORT).read_text())["summary"]["projected"]
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [CARD, CONFIG, WEIGHTS, REPORT, "notes.txt"]
    )
    assert leftovers(tmp_path) == []


def test_default_selection_projects_ten_lowest(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    """Defaults follow the official code: number mode, K = 10, paper projection."""
    dense = dense_reference(trio)
    out = tmp_path / "out"
    result = cli(trio.patch_args(out, "--quiet"))
    assert result.exit_code == ExitCode.OK, result.stderr
    report = json.loads((out / REPORT).read_text())
    assert report["settings"]["select"] == "number"
    assert report["settings"]["num_layers"] == 10
    projected = {m["module"] for m in report["modules"] if m["projected"]}
    assert projected == paper_selection(dense, "number", 10, math.nan)


def test_other_files_are_copied_but_stale_pickle_weights_are_not(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    """An unpatched adapter_model.bin beside the output would undo the patch for loaders that
    prefer it; tokenizer files travel with the adapter, and its README under safelora's card."""
    (trio.adapter / "README.md").write_text("my adapter")
    (trio.adapter / "tokenizer_config.json").write_text("{}")
    (trio.adapter / "adapter_model.bin").write_bytes(b"stale unpatched pickle")
    (trio.adapter / "training_args.bin").write_bytes(b"pickle")
    out = tmp_path / "out"
    result = cli(trio.patch_args(out, "--quiet"))
    assert result.exit_code == ExitCode.OK, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([CONFIG, WEIGHTS, REPORT, "README.md", "tokenizer_config.json"])
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    assert card.endswith("\nmy adapter")  # the original text, unchanged, under the card

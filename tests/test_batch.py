"""Batch runs and the CI gate: several adapters share one pass over base/aligned, and each result
must be exactly what patching or scoring that adapter alone gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from safelora_cli import Settings, patch_many, score_many
from safelora_cli.errors import ExitCode, FilesystemError
from safelora_cli.runs import execute
from safelora_cli.synthetic import make_adapter
from tests.conftest import Trio
from tests.helpers import (
    CARD,
    CONFIG,
    REPORT,
    WEIGHTS,
    Cli,
    assert_close_in_dtype,
    assert_error,
    dense_reference,
    expect_error,
    leftovers,
    paper_selection,
    snapshot,
)

REPORT_KEYS = {
    "schema_version", "tool", "settings", "inputs", "output", "modules", "passthrough", "summary",
}  # fmt: skip
MODULE_KEYS = {
    "module", "shape", "rank", "cosine", "projected", "skipped",
    "v_norm", "b_norm_before", "b_norm_after", "pdst",
}  # fmt: skip
SUMMARY_KEYS = {"modules", "projected", "skipped", "threshold_used", "mean_pdst"}


def model_args(trio: Trio) -> list[str]:
    return ["--base", str(trio.base), "--aligned", str(trio.aligned)]


def more_adapters(trio: Trio) -> list[Path]:
    """Two more adapters on the trio's pair: another seed, and another module subset and rank."""
    second = make_adapter(
        trio.root / "runs" / "second", trio.base, trio.aligned, trio.modules, seed=7
    )
    attn = [m for m in trio.modules if m.endswith(("q_proj", "v_proj"))]
    third = make_adapter(
        trio.root / "runs" / "third", trio.base, trio.aligned, attn, rank=2, seed=9
    )
    return [second, third]


def assert_report_schema(report: dict[str, Any]) -> None:
    assert REPORT_KEYS <= report.keys()
    assert report["schema_version"] == 1
    assert report["tool"]["name"] == "safelora"
    assert {"base", "aligned", "adapter"} == report["inputs"].keys()
    assert SUMMARY_KEYS <= report["summary"].keys()
    assert report["summary"]["modules"] == len(report["modules"])
    for module in report["modules"]:
        assert MODULE_KEYS <= module.keys()


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    """What must not depend on batching: settings, modules and summary."""
    return {key: report[key] for key in ("settings", "modules", "summary", "passthrough")}


# --- batch patch -----------------------------------------------------------------------------


def test_batch_patch_equals_each_adapter_alone(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    adapters = [trio.adapter, *more_adapters(trio)]
    out = tmp_path / "batch"
    args = ["patch", *map(str, adapters), *model_args(trio), "--output", str(out), "-k", "3", "-q"]
    result = cli(args)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stdout.splitlines() == [str(out / a.name) for a in adapters]

    for adapter in adapters:
        alone = tmp_path / f"alone-{adapter.name}"
        single = cli(["patch", str(adapter), *model_args(trio), "-o", str(alone), "-k", "3", "-q"])
        assert single.exit_code == ExitCode.OK, single.stderr
        batched = out / adapter.name
        assert (batched / WEIGHTS).read_bytes() == (alone / WEIGHTS).read_bytes()
        assert (batched / CONFIG).read_bytes() == (alone / CONFIG).read_bytes()
        batch_report = json.loads((batched / REPORT).read_text())
        alone_report = json.loads((alone / REPORT).read_text())
        assert comparable(batch_report) == comparable(alone_report)
        assert batch_report["summary"]["projected"] >= 3
        assert batch_report["output"] == batched.name  # published: no local path


def test_library_batch_matches_the_dense_reference_for_every_adapter(
    trio: Trio, tmp_path: Path
) -> None:
    """Each adapter of a batch, scored and patched in one pass, gets what the dense float64
    reference computes for that adapter alone: cosines, the K lowest selected, B' = Ĉ B."""
    adapters = [trio.adapter, *more_adapters(trio)]
    k = 3
    settings = Settings(num_layers=k)
    results = patch_many(adapters, trio.base, trio.aligned, tmp_path / "lib", settings)
    assert [r.output for r in results] == [tmp_path / "lib" / a.name for a in adapters]
    scored_many = score_many(adapters, trio.base, trio.aligned, settings)
    for adapter, scored, patched in zip(adapters, scored_many, results, strict=True):
        dense = dense_reference(trio.base, trio.aligned, adapter)
        expected = paper_selection(dense, "number", k, 0.0)
        assert 0 < len(expected) < len(dense)
        for report in (scored.report, patched.report):
            rows = {m["module"]: m for m in report["modules"]}
            assert rows.keys() == dense.keys()
            for name, row in rows.items():
                assert row["cosine"] == pytest.approx(dense[name].cosine, rel=1e-5), name
            assert {m for m, row in rows.items() if row["projected"]} == expected
        assert scored.output is None
        assert patched.output is not None
        after = load_file(patched.output / WEIGHTS)
        before = load_file(adapter / WEIGHTS)
        for name, d in dense.items():
            if name in expected:
                assert d.projected_b is not None
                assert_close_in_dtype(after[d.b_key], d.projected_b, after[d.b_key].dtype)
            else:
                assert after[d.b_key].equal(before[d.b_key])
            assert after[d.a_key].equal(before[d.a_key])


def test_batch_reads_adapter_paths_from_stdin(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    second, third = more_adapters(trio)
    out = tmp_path / "out"
    stdin = f"{trio.adapter}\n\n  {second}  \n{third}\n"
    result = cli(["patch", "-", *model_args(trio), "-o", str(out), "-k", "2", "-q"], input=stdin)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stdout.splitlines() == [str(out / p.name) for p in (trio.adapter, second, third)]
    for name in ("adapter", "second", "third"):
        assert (out / name / WEIGHTS).is_file()
        assert (out / name / REPORT).is_file()


def test_stdin_with_one_path_is_still_a_batch(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli(
        ["patch", "-", *model_args(trio), "-o", str(out), "-k", "2", "-q"],
        input=f"{trio.adapter}\n",
    )
    assert result.exit_code == ExitCode.OK, result.stderr
    assert (out / trio.adapter.name / WEIGHTS).is_file()


@pytest.mark.parametrize(
    ("adapters", "stdin", "message"),
    [
        (["-"], "\n  \n", "stdin held no adapter paths"),
        (["-", "ADAPTER"], None, "'-' must be the only ADAPTER"),
    ],
    ids=["empty-stdin", "dash-with-others"],
)
def test_bad_stdin_use_is_a_usage_error(
    trio: Trio, cli: Cli, tmp_path: Path, adapters: list[str], stdin: str | None, message: str
) -> None:
    args = [str(trio.adapter) if a == "ADAPTER" else a for a in adapters]
    out = tmp_path / "out"
    result = cli(["patch", *args, *model_args(trio), "-o", str(out)], input=stdin)
    assert result.exit_code == ExitCode.USAGE
    assert message in result.stderr
    assert result.stdout == ""
    assert not out.exists()


def test_name_collision_writes_nothing(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    twin = make_adapter(trio.root / "elsewhere" / "adapter", trio.base, trio.aligned, trio.modules)
    out = tmp_path / "out"
    result = cli(["patch", str(trio.adapter), str(twin), *model_args(trio), "-o", str(out), "-q"])
    expect_error(result, ExitCode.USAGE, "two adapters are named 'adapter'", output=out)


def test_name_collision_in_existing_output_leaves_it_untouched(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    twin = make_adapter(trio.root / "elsewhere" / "adapter", trio.base, trio.aligned, trio.modules)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli(["patch", str(trio.adapter), str(twin), *model_args(trio), "-o", str(out)])
    assert result.exit_code == ExitCode.USAGE
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def _drop_weights(folder: Path) -> None:
    (folder / WEIGHTS).unlink()


def _truncate_weights(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "code"),
    [(_drop_weights, ExitCode.INCOMPATIBLE), (_truncate_weights, ExitCode.CORRUPT)],
    ids=["no-weights-file", "truncated-weights"],
)
def test_one_bad_adapter_stops_the_batch_and_is_named(
    trio: Trio, cli: Cli, tmp_path: Path, damage: Callable[[Path], None], code: ExitCode
) -> None:
    second, third = more_adapters(trio)
    damage(second)
    out = tmp_path / "out"
    args = ["patch", str(trio.adapter), str(second), str(third), *model_args(trio), "-o", str(out)]
    expect_error(cli([*args, "-q"]), code, str(second), output=out)


def test_batch_without_force_refuses_an_existing_adapter_folder_before_any_work(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    adapters = [trio.adapter, *more_adapters(trio)]
    out = tmp_path / "out"
    (out / "second").mkdir(parents=True)
    (out / "second" / "notes.txt").write_text("mine")
    result = cli(["patch", *map(str, adapters), *model_args(trio), "-o", str(out), "-k", "3", "-q"])
    assert_error(result, ExitCode.FILESYSTEM, str(out / "second"), "not empty", "--force")
    assert result.stdout == ""
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "second",
        "second/notes.txt",
    ]
    assert (out / "second" / "notes.txt").read_text() == "mine"
    assert leftovers(out) == []

    with pytest.raises(FilesystemError, match="not empty"):  # the library's default too
        patch_many(adapters, trio.base, trio.aligned, out, Settings(num_layers=3))
    assert sorted(p.name for p in out.iterdir()) == ["second"]


def test_batch_without_force_never_replaces_a_folder_that_appeared_during_the_run(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run wrote OUTPUT/second while this one was scoring: it is left as it is, exit 6;
    the adapter before it is published complete, the one after it is not written."""
    adapters = [trio.adapter, *more_adapters(trio)]
    out = tmp_path / "out"
    real_score_job = execute.score

    def score_job(*args: Any, **kwargs: Any) -> Any:
        scored = real_score_job(*args, **kwargs)
        (out / "second").mkdir(parents=True)
        (out / "second" / "notes.txt").write_text("another run's")
        return scored

    monkeypatch.setattr(execute, "score", score_job)
    result = cli(["patch", *map(str, adapters), *model_args(trio), "-o", str(out), "-k", "3", "-q"])
    assert_error(result, ExitCode.FILESYSTEM, str(out / "second"), "appeared during the run")
    assert snapshot(out / "second") == {"notes.txt": b"another run's"}
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "second"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [CARD, CONFIG, WEIGHTS, REPORT]
    assert leftovers(out) == []


def test_report_flag_takes_one_adapter(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    second, _ = more_adapters(trio)
    args = ["patch", str(trio.adapter), str(second), *model_args(trio), "-o", str(tmp_path / "o")]
    result = cli([*args, "--report", str(tmp_path / "r.json")])
    assert result.exit_code == ExitCode.USAGE
    assert "--report takes one adapter" in result.stderr
    assert not (tmp_path / "o").exists()


# --- score: JSON output and the CI gate ------------------------------------------------------


def test_score_json_single_is_a_report_object(trio: Trio, cli: Cli) -> None:
    result = cli(["score", str(trio.adapter), *model_args(trio), "-k", "4", "--json", "-q"])
    assert result.exit_code == ExitCode.OK, result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    assert_report_schema(report)
    assert report["output"] is None
    assert report["summary"]["projected"] >= 4


def test_score_json_batch_is_a_list_in_input_order(trio: Trio, cli: Cli) -> None:
    adapters = [trio.adapter, *more_adapters(trio)]
    result = cli(["score", *map(str, adapters), *model_args(trio), "-k", "2", "--json", "-q"])
    assert result.exit_code == ExitCode.OK, result.stderr
    reports = json.loads(result.stdout)
    assert isinstance(reports, list)
    assert [r["inputs"]["adapter"]["path"] for r in reports] == [str(a) for a in adapters]
    for report in reports:
        assert_report_schema(report)


def test_patch_json_batch_is_a_list(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    adapters = [trio.adapter, *more_adapters(trio)]
    out = tmp_path / "out"
    args = ["patch", *map(str, adapters), *model_args(trio), "-o", str(out), "-k", "3"]
    result = cli([*args, "--json", "-q"])
    assert result.exit_code == ExitCode.OK, result.stderr
    reports = json.loads(result.stdout)
    assert [r["output"] for r in reports] == [str(out / a.name) for a in adapters]
    for report in reports:
        assert_report_schema(report)


def test_score_writes_nothing_and_shows_a_table(trio: Trio, cli: Cli) -> None:
    before = sorted(p.relative_to(trio.root) for p in trio.root.rglob("*"))
    result = cli(["score", str(trio.adapter), *model_args(trio), "-k", "3"])
    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stdout == ""
    assert "projected" in result.stderr
    assert sorted(p.relative_to(trio.root) for p in trio.root.rglob("*")) == before


def threshold_counts(trio: Trio, cli: Cli, adapters: list[Path], threshold: str) -> list[int]:
    args = ["score", *map(str, adapters), *model_args(trio), "--select", "threshold"]
    result = cli([*args, "--threshold", threshold, "--json", "-q"])
    assert result.exit_code == ExitCode.OK, result.stderr
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    return [r["summary"]["projected"] for r in reports]


@pytest.mark.parametrize("slack", [0, 1])
def test_gate_passes_at_or_under_n(trio: Trio, cli: Cli, slack: int) -> None:
    [count] = threshold_counts(trio, cli, [trio.adapter], "0.5")
    assert count > 0
    gate = str(count + slack)
    args = ["score", str(trio.adapter), *model_args(trio), "--select", "threshold"]
    result = cli([*args, "--threshold", "0.5", "--fail-if-projected", gate, "-q"])
    assert result.exit_code == ExitCode.OK, result.stderr
    assert "gate failed" not in result.stderr


def test_gate_fails_over_n_with_a_message(trio: Trio, cli: Cli) -> None:
    [count] = threshold_counts(trio, cli, [trio.adapter], "0.5")
    args = ["score", str(trio.adapter), *model_args(trio), "--select", "threshold"]
    result = cli([*args, "--threshold", "0.5", "--fail-if-projected", str(count - 1), "-q"])
    assert result.exit_code == ExitCode.GATE_FAILED
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"gate failed: {trio.adapter}: {count} modules would be projected, more than {count - 1}"
    )


def test_gate_in_a_batch_names_only_the_failing_adapters(trio: Trio, cli: Cli) -> None:
    adapters = [trio.adapter, *more_adapters(trio)]
    counts = threshold_counts(trio, cli, adapters, "0.5")
    gate = min(counts)  # the adapters with more projected modules fail, the others pass
    failing = [a for a, c in zip(adapters, counts, strict=True) if c > gate]
    assert failing
    assert len(failing) < len(adapters)
    args = ["score", *map(str, adapters), *model_args(trio), "--select", "threshold"]
    result = cli([*args, "--threshold", "0.5", "--fail-if-projected", str(gate), "--json", "-q"])
    assert result.exit_code == ExitCode.GATE_FAILED
    assert len(json.loads(result.stdout)) == 3  # the reports still come out
    lines = result.stderr.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == [str(a) for a in failing]


def test_gate_is_not_checked_when_scoring_fails(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = cli(["score", str(missing), *model_args(trio), "--fail-if-projected", "0"])
    assert result.exit_code == ExitCode.USAGE
    assert "gate failed" not in result.stderr
    assert str(missing) in result.stderr

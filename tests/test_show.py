"""What a run shows and keeps: the heat map, `safelora show` on saved reports, provenance
warnings in the run and its report, and progress in bytes."""

from __future__ import annotations

import json
from pathlib import Path

from safelora_cli.errors import ExitCode
from safelora_cli.inputs.adapter import CONFIG_NAME
from safelora_cli.output.report import REPORT_NAME, SCHEMA_VERSION
from safelora_cli.settings import Settings
from tests.conftest import Trio, TrioFactory
from tests.helpers import assert_error, invoke


def score_json(trio: Trio, *extra: str) -> tuple[str, list[dict[str, object]] | dict[str, object]]:
    args = ["score", str(trio.adapter), *extra, "--base", str(trio.base),
            "--aligned", str(trio.aligned), "--num-layers", "3", "--json"]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == 0, result.stderr
    return result.stderr, json.loads(result.stdout)


def test_runs_show_the_heat_map_unless_quiet(trio: Trio, tmp_path: Path) -> None:
    stderr, report = score_json(trio)
    assert "layer q_proj k_proj v_proj o_proj gate_proj up_proj down_proj" in " ".join(
        stderr.split()
    )
    assert isinstance(report, dict)
    projected = sum(m["projected"] for m in report["modules"])  # type: ignore[union-attr, index]
    assert stderr.count("*") >= projected  # every projected cell is marked
    quiet = invoke(trio.patch_args(tmp_path / "out", "--quiet"))
    assert quiet.stderr == ""


def test_show_renders_a_saved_report_and_passes_json_through(trio: Trio, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke(trio.patch_args(out, "--quiet", "--num-layers", "3")).exit_code == 0
    saved = out / REPORT_NAME
    shown = invoke(["show", str(saved)])
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout == ""
    assert "model.layers.<layer>:" in shown.stderr
    assert "3 of 14 modules projected" in shown.stderr
    passed = invoke(["show", str(saved), "--json"])
    assert json.loads(passed.stdout) == json.loads(saved.read_text())


def test_show_renders_a_batch_and_writes_html(make_trio: TrioFactory, tmp_path: Path) -> None:
    trio = make_trio()
    stderr, report = score_json(trio)
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([report, report]))
    shown = invoke(["show", str(batch), "--html", str(tmp_path / "r.html")])
    assert shown.exit_code == 0, shown.stderr
    assert shown.stderr.count("model.layers.<layer>:") == 2
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") or page.lower().startswith("<!doctype html>")
    assert "<script" not in page
    again = invoke(["show", str(batch), "--html", str(tmp_path / "r.html")])
    assert_error(again, ExitCode.FILESYSTEM, "--html", "exists")
    assert (
        invoke(["show", str(batch), "--html", str(tmp_path / "r.html"), "--force"]).exit_code == 0
    )


def test_show_refuses_what_is_not_a_report(trio: Trio, tmp_path: Path) -> None:
    _, report = score_json(trio)
    assert isinstance(report, dict)
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**report, "schema_version": SCHEMA_VERSION + 1}))
    assert_error(invoke(["show", str(newer)]), ExitCode.INCOMPATIBLE, "upgrade")
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    assert_error(invoke(["show", str(other)]), ExitCode.CORRUPT, "not a safelora report")
    assert_error(invoke(["show", str(tmp_path / "none.json")]), ExitCode.CORRUPT, "cannot read")


def test_adapter_trained_on_the_base_is_warned_and_recorded(trio: Trio, tmp_path: Path) -> None:
    config = json.loads((trio.adapter / CONFIG_NAME).read_text())
    config["base_model_name_or_path"] = str(trio.base)
    (trio.adapter / CONFIG_NAME).write_text(json.dumps(config))
    out = tmp_path / "out"
    result = invoke(trio.patch_args(out, "--quiet"))
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("warning: the adapter was trained on")
    report = json.loads((out / REPORT_NAME).read_text())
    assert [w["code"] for w in report["warnings"]] == ["adapter-names-base"]
    assert report["warnings"][0]["values"]["trained_on"] == str(trio.base)
    card = (out / "README.md").read_text()
    assert "adapter-names-base" in card or "trained on" in card  # the card repeats it


def test_the_same_model_twice_is_refused_before_any_work(trio: Trio, tmp_path: Path) -> None:
    args = ["patch", str(trio.adapter), "--base", str(trio.aligned), "--aligned",
            str(trio.aligned), "--output", str(tmp_path / "out")]  # fmt: skip
    assert_error(invoke(args), ExitCode.USAGE, "--aligned")
    assert not (tmp_path / "out").exists()


class Calls(list[tuple[int, int, str]]):
    def append_call(self, done: int, total: int, name: str) -> None:
        self.append((done, total, name))


def test_progress_counts_the_bytes_read(trio: Trio) -> None:
    from safelora_cli import api as pipeline
    from safelora_cli.inputs.index import index_folder

    calls = Calls()
    settings = Settings(num_layers=3)
    pipeline.score(trio.adapter, trio.base, trio.aligned, settings, progress=calls.append_call)
    base, aligned = index_folder(trio.base), index_folder(trio.aligned)
    weights = [f"{m}.weight" for m in trio.modules]
    expected = sum(base.tensors[w].nbytes + aligned.tensors[w].nbytes for w in weights)
    assert [c[1] for c in calls] == [expected] * len(weights)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert calls[-1][0] == expected
    assert sorted(c[2] for c in calls) == sorted(weights)

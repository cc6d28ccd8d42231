"""What a run shows and keeps: the heat map, `safelora show` on saved reports, provenance
warnings in the run and its report, and progress in bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from safelora_cli.errors import ExitCode
from safelora_cli.inputs.adapter import CONFIG_NAME
from safelora_cli.output.report import REPORT_NAME, SCHEMA_VERSION
from safelora_cli.settings import Settings
from tests.conftest import Trio, TrioFactory
from tests.helpers import assert_error, expect_error, invoke
from tests.reports import make_report


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
    # the published report names the local folder by its name (--json would show the path)
    assert report["warnings"][0]["values"]["trained_on"] == "base"
    assert str(trio.base) not in json.dumps(report)
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


# --- reports that are not what `safelora show` reads -------------------------------------------


def _crafted(edit: Any) -> Any:
    report = make_report(layers=2)
    edit(report)
    return report


def _module(key: str, value: Any) -> Any:
    return lambda r: r["modules"][0].update({key: value})


BAD_REPORTS = {
    "empty list": "[]",
    "list of a number": "[1]",
    "a string": '"report"',
    "schema superscript": json.dumps(_crafted(lambda r: r.update(schema_version="²"))),
    "schema bool": json.dumps(_crafted(lambda r: r.update(schema_version=True))),
    "schema zero": json.dumps(_crafted(lambda r: r.update(schema_version=0))),
    "float 1e309": json.dumps(_crafted(_module("cosine", 0.5))).replace("0.5", "1e309", 1),
    "int of 310 digits": json.dumps(_crafted(_module("rank", 7))).replace(
        '"rank": 7', '"rank": 1' + "0" * 309, 1
    ),
    "int of 5000 digits": json.dumps(_crafted(_module("rank", 7))).replace(
        '"rank": 7', '"rank": 1' + "0" * 5000, 1
    ),
    "NaN cosine": json.dumps(_crafted(_module("cosine", float("nan")))),
    "cosine out of range": json.dumps(_crafted(_module("cosine", 3.0))),
    "cosine a string": json.dumps(_crafted(_module("cosine", "0.5"))),
    "projected a string": json.dumps(_crafted(_module("projected", "yes"))),
    "negative norm": json.dumps(_crafted(_module("v_norm", -1.0))),
    "module a number": json.dumps(_crafted(_module("module", 42))),
    "layer of 5000 digits": json.dumps(
        _crafted(_module("module", f"model.layers.{'7' * 5000}.self_attn.q_proj"))
    ),
    "entry a string": json.dumps(_crafted(lambda r: r["modules"].append("entry"))),
    "summary missing": json.dumps(_crafted(lambda r: r.pop("summary"))),
    "summary.projected markup": json.dumps(
        _crafted(lambda r: r["summary"].update(projected="[link=http://x]a[/link]\x1b]0;t\x07"))
    ),
    "count negative": json.dumps(_crafted(lambda r: r["summary"].update(modules=-1))),
    "input a string": json.dumps(_crafted(lambda r: r["inputs"].update(adapter="x"))),
    "huge warning": json.dumps(_crafted(lambda r: r.update(warnings=[{"message": "w" * 70000}]))),
}


@pytest.mark.parametrize("case", sorted(BAD_REPORTS))
@pytest.mark.parametrize("mode", ["table", "json", "html"])
def test_a_report_that_is_not_one_is_exit_3_one_line_nothing_written(
    tmp_path: Path, case: str, mode: str
) -> None:
    path = tmp_path / "report.json"
    path.write_text(BAD_REPORTS[case])
    page = tmp_path / "page.html"
    extra = {"table": [], "json": ["--json"], "html": ["--html", str(page)]}[mode]
    result = invoke(["show", str(path), *extra])
    expect_error(result, ExitCode.CORRUPT, str(path), output=page)


def test_a_newer_report_is_exit_4_even_with_fields_this_version_does_not_know(
    tmp_path: Path,
) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "modules": [{"x": 1}]}))
    expect_error(
        invoke(["show", str(path)]), ExitCode.INCOMPATIBLE, "upgrade", output=path.parent / "x"
    )


def test_show_json_is_valid_json_and_hostile_names_are_shown_inert(tmp_path: Path) -> None:
    name = "model.layers.0.self_attn.q_proj\u200b\ufeff[link=http://evil]a[/link]\x1b]0;t\x07"
    report = make_report(layers=2, names=[name, "model.layers.1.mlp.up_proj", "lm_head"])
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    page = tmp_path / "page.html"
    shown = invoke(["show", str(path), "--html", str(page)])
    assert shown.exit_code == 0, shown.stderr
    for raw in ("\x1b", "\x07", "\u200b", "\ufeff"):
        assert raw not in shown.stderr
        assert raw not in page.read_text()
    assert "\\u200b" in shown.stderr
    as_json = invoke(["show", str(path), "--json"])
    parsed = json.loads(as_json.stdout, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert parsed["modules"][0]["module"] == name  # the data itself is kept, only shown safely


def test_many_modules_without_a_layer_number_render(tmp_path: Path) -> None:
    """5000 modules outside any layer: every renderer takes linear time (the HTML headers once
    compared every module with every other); the page lists them all."""
    names = [f"adapter_head_{k}.proj" for k in range(5000)]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(make_report(names=names, num_layers=3)))
    page = tmp_path / "page.html"
    shown = invoke(["show", str(path), "--html", str(page)])
    assert shown.exit_code == 0, shown.stderr
    text = page.read_text()
    assert all(f"adapter_head_{k}.proj" in text for k in (0, 2500, 4999))

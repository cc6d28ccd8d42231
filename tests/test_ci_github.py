"""GitHub Actions (GITHUB_ACTIONS=true): a markdown summary per adapter appended to the step
summary file, ``::error``/``::warning`` annotations on stderr (stdout stays the result), nothing
outside GitHub Actions; ``safelora show --markdown`` prints the same markdown; untrusted names
never become markdown or HTML."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from safelora_cli.display.markdown import code, report_markdown, text
from safelora_cli.errors import ExitCode
from safelora_cli.output.ci.github import annotation, escape_data, escape_property
from tests.conftest import Trio
from tests.helpers import REPORT, assert_error, invoke
from tests.reports import make_report

TABLE_HEADER = re.compile(r"^\| layer \| `q_proj` \| `k_proj` \| `v_proj` \|", re.MULTILINE)


def pair(trio: Trio) -> list[str]:
    return ["--base", str(trio.base), "--aligned", str(trio.aligned)]


def github(summary: Path | None) -> dict[str, str | None]:
    return {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary) if summary else None}


def test_a_failing_gate_in_github_actions_writes_a_summary_and_an_error_annotation(
    trio: Trio, tmp_path: Path
) -> None:
    summary = tmp_path / "step_summary.md"
    summary.write_text("## an earlier step\n")
    args = ["score", str(trio.adapter), *pair(trio), "--fail-if-projected", "2", "--json", "-q"]
    result = invoke(args, env=github(summary))
    assert result.exit_code == ExitCode.GATE_FAILED
    report = json.loads(result.stdout)  # stdout is the report alone: annotations went to stderr
    written = summary.read_text()
    assert written.startswith("## an earlier step\n")  # appended, never replaced
    assert TABLE_HEADER.search(written), written
    rows = [line for line in written.splitlines() if re.match(r"^\| [01] \|", line)]
    assert len(rows) == 2  # one row per layer of the 2-layer fixture
    assert len(re.findall(r"\*\*▼ \d", written)) == report["summary"]["projected"] == 10
    assert "**Gate failed:** 10 modules would be projected\\, more than 2" in written
    errors = [line for line in result.stderr.splitlines() if line.startswith("::error ")]
    assert errors == [
        f"::error title=safelora::{trio.adapter}: 10 modules would be projected, more than 2"
    ]
    assert "gate failed:" in result.stderr  # the plain line is still there


def test_nothing_changes_outside_github_actions(trio: Trio, tmp_path: Path) -> None:
    summary = tmp_path / "step_summary.md"
    args = ["score", str(trio.adapter), *pair(trio), "--fail-if-projected", "2", "-q"]
    env = {"GITHUB_ACTIONS": None, "GITHUB_STEP_SUMMARY": str(summary)}
    result = invoke(args, env=env)
    assert result.exit_code == ExitCode.GATE_FAILED
    assert not summary.exists()
    assert "::" not in result.stderr
    plain = invoke(args, env={"GITHUB_ACTIONS": None, "GITHUB_STEP_SUMMARY": None})
    assert (plain.stdout, plain.stderr) == (result.stdout, result.stderr)


def test_warnings_become_warning_annotations(trio: Trio, tmp_path: Path) -> None:
    profile = tmp_path / "p.safetensors"
    built = invoke(["profile", *pair(trio), "-o", str(profile), "--rank", "2", "-q"])
    assert built.exit_code == ExitCode.OK, built.stderr
    summary = tmp_path / "summary.md"
    args = ["score", str(trio.adapter), "--profile", str(profile), "-q"]
    result = invoke(args, env=github(summary))
    assert result.exit_code == ExitCode.OK, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("::warning ")]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"::warning title=safelora::{trio.adapter}: ")
    assert "closer to the selection's cut than the profile's error bound" in warnings[0]
    written = summary.read_text()
    assert "**Warnings** (1)" in written
    assert "`profile-boundary`" in written
    assert "(adapter via a profile)" in written


def test_patch_in_github_actions_summarizes_each_adapter_of_a_batch(
    tmp_path: Path, trio: Trio
) -> None:
    summary = tmp_path / "summary.md"
    other = tmp_path / "second"
    shutil.copytree(trio.adapter, other)
    args = ["patch", str(trio.adapter), str(other), *pair(trio), "-o", str(tmp_path / "out"), "-q"]
    result = invoke(args, env=github(summary))
    assert result.exit_code == ExitCode.OK, result.stderr
    written = summary.read_text()
    assert written.count("### safelora: ") == 2
    assert f"### safelora: `{other}` (adapter)" in written
    assert "modules projected</summary>" in written
    assert "::error" not in result.stderr


def test_show_markdown_prints_what_the_summary_holds(trio: Trio, tmp_path: Path) -> None:
    summary, out, kept = tmp_path / "summary.md", tmp_path / "out", tmp_path / "run.json"
    # a --report outside the output keeps the full paths the summary shows (the report inside
    # the output names the adapter by its folder name)
    result = invoke(trio.patch_args(out, "-q", "--report", str(kept)), env=github(summary))
    assert result.exit_code == ExitCode.OK, result.stderr
    shown = invoke(["show", str(kept), "--markdown"])
    assert shown.exit_code == ExitCode.OK, shown.stderr
    assert shown.stdout == summary.read_text().removeprefix("\n")
    assert TABLE_HEADER.search(shown.stdout)
    assert shown.stderr == ""
    both = invoke(["show", str(out / REPORT), "--markdown", "--json"])
    assert_error(both, ExitCode.USAGE, "--json and --markdown")


def test_an_unwritable_step_summary_is_a_warning_not_a_failure(trio: Trio, tmp_path: Path) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    args = ["score", str(trio.adapter), *pair(trio), "-q"]
    result = invoke(args, env=github(folder))
    assert result.exit_code == ExitCode.OK, result.stderr
    assert "warning: could not write the step summary" in result.stderr
    assert "::warning title=safelora::could not write the step summary" in result.stderr


# --- escaping ---------------------------------------------------------------------------------


def test_workflow_command_escaping_follows_githubs_rules() -> None:
    assert escape_data("100% a\r\nb") == "100%25 a%0D%0Ab"
    assert escape_property("safe:lora, 1%") == "safe%3Alora%2C 1%25"
    line = annotation("error", "name\n::error::forged 50%")
    assert "\n" not in line
    assert line.startswith("::error title=safelora::")
    assert "name\\x0a::error::forged" in line  # the forged command is text in the message
    assert "50%25" in line
    with pytest.raises(ValueError, match="level"):
        annotation("debug", "x")


HOSTILE = [
    "model.layers.0.<img src=x onerror=alert(1)>",
    "model.layers.1.[click](https://evil.example)",
    "model.layers.2.a|b`c``d",
    "model.layers.3.\x1b]0;owned\x07q_proj",
    "lm_head<script>alert(1)</script>",
]


def test_untrusted_names_never_become_markdown_or_html() -> None:
    report = make_report(names=HOSTILE, num_layers=5)
    report["warnings"] = [{"code": "x", "message": "see <b>[this](javascript:alert(1))</b> *now*"}]
    report["inputs"]["adapter"]["ref"] = "evil` <i>x</i> [y](z)"
    rendered = report_markdown(report)
    # code spans show their content as written; outside them, nothing from the report is markup
    outside = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", rendered)
    assert "`" not in outside
    for markup in ("<img", "<script", "<b>", "<i>", "](", "[click]"):
        assert markup not in outside, markup
    assert "<img src=x onerror=alert(1)>" in rendered  # inside a code span
    assert "\x1b" not in rendered
    assert "\\x1b" in rendered
    assert "\\[this\\]\\(javascript\\:alert\\(1\\)\\)" in rendered
    # every row of a table has its header's cells: a '|' inside a name is escaped
    tables: list[list[str]] = [[]]
    for line in rendered.splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    tables = [t for t in tables if t]
    assert len(tables) == 3  # the heat map, the modules outside the layers, the projected
    for table in tables:
        cells = {len(re.findall(r"(?<!\\)\|", row)) for row in table}
        assert len(cells) == 1, table


def test_code_spans_outlast_the_backticks_inside() -> None:
    assert code("a``b") == "```a``b```"
    assert code("`x") == "`` `x ``"
    assert text("*a* _b_ <c> &d") == "\\*a\\* \\_b\\_ &lt;c&gt; &amp;d"


def test_a_malformed_report_is_refused_by_show_and_rendered_by_the_function(
    tmp_path: Path,
) -> None:
    report = make_report()
    report["modules"][0]["cosine"] = "0.5"  # wrong types, as a hand-edited file may hold
    report["modules"][1] = ["not", "a", "module"]
    report["warnings"] = "not a list"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    result = invoke(["show", str(path), "--markdown"])
    assert_error(result, ExitCode.CORRUPT, "cosine")
    assert result.stdout == ""
    # the library function takes any dict: what it cannot read is counted, never fatal
    rendered = report_markdown(report)
    assert "1 malformed module entries ignored" in rendered
    assert "!!" in rendered  # the module whose cosine is not a number

"""``--junit FILE`` on score and patch: a testsuite per adapter (or model), a testcase per module,
a failure per module (to be) projected, skipped modules skipped; valid JUnit XML (checked against
tests/junit.xsd with lxml, and structurally); the file refused before any work as --report is."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from safelora_cli.errors import ExitCode
from safelora_cli.output.ci.junit import render_junit, split_module
from tests.conftest import Trio, TrioFactory
from tests.helpers import REPORT, assert_error, invoke
from tests.reports import make_report

XSD = etree.XMLSchema(etree.parse(str(Path(__file__).with_name("junit.xsd"))))
Q1 = "model.layers.1.self_attn.q_proj"


def pair(trio: Trio) -> list[str]:
    return ["--base", str(trio.base), "--aligned", str(trio.aligned)]


def validated(path: Path) -> ET.Element:
    """The document, after checking it against the XSD and the counts it states."""
    document = etree.parse(str(path))
    assert XSD.validate(document), XSD.error_log
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    for suite in suites:
        cases = suite.findall("testcase")
        assert int(suite.get("tests", "-1")) == len(cases)
        assert int(suite.get("failures", "-1")) == sum(c.find("failure") is not None for c in cases)
        assert int(suite.get("skipped", "-1")) == sum(c.find("skipped") is not None for c in cases)
        assert suite.get("errors") == "0"
    for total in ("tests", "failures", "skipped"):
        assert int(root.get(total, "-1")) == sum(int(s.get(total, "0")) for s in suites)
    return root


def cases(suite: ET.Element) -> dict[str, ET.Element]:
    """module name -> its testcase."""
    return {f"{c.get('classname')}.{c.get('name')}": c for c in suite.findall("testcase")}


def properties(suite: ET.Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in suite.iter("property")}


def test_score_junit_has_a_testcase_per_module_and_a_failure_per_module_to_project(
    trio: Trio, tmp_path: Path
) -> None:
    junit = tmp_path / "junit.xml"
    args = ["score", str(trio.adapter), *pair(trio), "-k", "3", "--json", "--junit", str(junit)]
    result = invoke(args)
    assert result.exit_code == ExitCode.OK, result.stderr
    report = json.loads(result.stdout)  # stdout is still the report alone
    [suite] = validated(junit).findall("testsuite")
    assert suite.get("name") == f"safelora: {trio.adapter}"
    found = cases(suite)
    assert sorted(found) == sorted(m["module"] for m in report["modules"])
    assert found[Q1].get("classname") == "model.layers.1"
    assert found[Q1].get("name") == "self_attn.q_proj"
    failed = {name for name, case in found.items() if case.find("failure") is not None}
    assert failed == {m["module"] for m in report["modules"] if m["projected"]}
    assert len(failed) == 3
    cut = report["summary"]["threshold_used"]
    for module in report["modules"]:
        failure = found[module["module"]].find("failure")
        if failure is None:
            continue
        message = failure.get("message", "")
        assert f"cosine {module['cosine']:.4f}" in message
        assert f"cut {cut:.4f}" in message
        assert "would be projected" in message  # score writes nothing
    props = properties(suite)
    assert props["inputs.adapter"] == str(trio.adapter)
    assert props["inputs.base"] == str(trio.base)
    assert props["settings.num_layers"] == "3"
    assert props["settings.select"] == "number"
    assert props["summary.projected"] == "3"


def test_patch_junit_marks_skipped_modules_and_projected_ones(
    make_trio: TrioFactory, tmp_path: Path
) -> None:
    trio = make_trio(identical=(Q1,))
    junit, out = tmp_path / "junit.xml", tmp_path / "out"
    result = invoke(trio.patch_args(out, "--select", "threshold", "--threshold", "0.5",
                                    "--junit", str(junit)))  # fmt: skip
    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stdout == f"{out}\n"
    report = json.loads((out / REPORT).read_text())
    [suite] = validated(junit).findall("testsuite")
    found = cases(suite)
    skipped = found[Q1].find("skipped")
    assert skipped is not None
    reasons = {m["module"]: m["skipped"] for m in report["modules"]}
    assert skipped.get("message") == reasons[Q1] == "base and aligned identical"
    failed = {name for name, case in found.items() if case.find("failure") is not None}
    assert failed == {m["module"] for m in report["modules"] if m["projected"]}
    assert failed, "the fixture projects something at T=0.5"
    for name in failed:
        message = found[name].findall("failure")[0].get("message", "")
        assert ": projected (threshold mode, T=0.5)" in message
    assert properties(suite)["output"] == str(out)


def test_a_batch_has_one_testsuite_per_adapter(make_trio: TrioFactory, tmp_path: Path) -> None:
    one, two = make_trio(seed=0), make_trio(seed=5)
    junit = tmp_path / "junit.xml"
    args = ["score", str(one.adapter), str(two.adapter), *pair(one), "--junit", str(junit), "-q"]
    result = invoke(args)
    assert result.exit_code == ExitCode.OK, result.stderr
    suites = validated(junit).findall("testsuite")
    assert [s.get("name") for s in suites] == [f"safelora: {one.adapter}",
                                               f"safelora: {two.adapter}"]  # fmt: skip
    assert all(len(s.findall("testcase")) == len(one.modules) for s in suites)


def test_a_gate_failure_still_writes_the_junit_file(trio: Trio, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    args = ["score", str(trio.adapter), *pair(trio), "--fail-if-projected", "0", "--junit",
            str(junit), "-q"]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == ExitCode.GATE_FAILED
    assert int(validated(junit).get("failures", "0")) == 10  # the default K


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("model.layers.3.self_attn.q_proj", ("model.layers.3", "self_attn.q_proj")),
        ("model.layers.0.mlp.experts.7.w1", ("model.layers.0", "mlp.experts.7.w1")),
        ("model.embed_tokens", ("model", "embed_tokens")),
        ("lm_head", ("lm_head", "lm_head")),
    ],
)
def test_a_module_splits_into_its_layer_and_its_type(module: str, expected: Any) -> None:
    assert split_module(module) == expected


def test_hostile_names_give_well_formed_valid_xml(tmp_path: Path) -> None:
    """Control characters (which XML 1.0 cannot hold), markup and bidi overrides in names."""
    names = ["model.layers.0.\x1b]0;owned\x07q_proj", "model.layers.1.<b>&\"x\"</b>",
             "model.layers.2.\u202ev_proj", "model.layers.3." + "n" * 10_000]  # fmt: skip
    report = make_report(names=names, num_layers=2)
    path = tmp_path / "j.xml"
    path.write_text(render_junit([report]), encoding="utf-8")
    root = validated(path)
    got = [f"{c.get('classname')}.{c.get('name')}" for c in root.iter("testcase")]
    assert got[0] == "model.layers.0.\\x1b]0;owned\\x07q_proj"
    assert got[1] == 'model.layers.1.<b>&"x"</b>'  # escaped in the file, read back as written
    assert "\u202e" not in path.read_text(encoding="utf-8")
    assert len(got[3]) < 5000


def test_the_xsd_rejects_what_is_not_junit(tmp_path: Path) -> None:
    """The schema check can fail: a suite without its counts, a testcase without a name."""
    report = make_report()
    good = etree.fromstring(render_junit([report]).encode())
    assert XSD.validate(good)
    suite = good.find("testsuite")
    assert suite is not None
    del suite.attrib["tests"]
    assert not XSD.validate(good)
    other = etree.fromstring(render_junit([report]).encode())
    case = other.find("testsuite/testcase")
    assert case is not None
    del case.attrib["name"]
    assert not XSD.validate(other)


def test_a_full_fine_tune_is_one_testsuite_of_its_weights(tmp_path: Path) -> None:
    from safelora_cli.synthetic import FineTuneSpec, PairSpec, make_full_finetune, make_pair

    base, aligned = make_pair(tmp_path, PairSpec(seed=3))
    ft = make_full_finetune(tmp_path / "ft", base, aligned, FineTuneSpec((Q1,)))
    junit = tmp_path / "junit.xml"
    args = ["score", str(ft), "--base", str(base), "--aligned", str(aligned), "-k", "2",
            "--junit", str(junit), "--json"]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == ExitCode.OK, result.stderr
    report = json.loads(result.stdout)
    [suite] = validated(junit).findall("testsuite")
    assert properties(suite)["kind"] == "full"
    assert properties(suite)["inputs.model"] == str(ft)
    found = cases(suite)
    assert len(found) == len(report["modules"])
    assert found[Q1].find("skipped") is not None  # unchanged by the fine-tune
    assert sum(c.find("failure") is not None for c in found.values()) == 2


# --- the target is refused before any work, as --report is ---------------------------------


def test_an_existing_junit_file_needs_force(trio: Trio, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text("old")
    args = ["score", str(trio.adapter), *pair(trio), "--junit", str(junit), "-q"]
    assert_error(invoke(args), ExitCode.FILESYSTEM, "--junit", "exists", "--force")
    assert junit.read_text() == "old"
    result = invoke([*args, "--force"])
    assert result.exit_code == ExitCode.OK, result.stderr
    validated(junit)


def test_junit_inside_the_output_or_equal_to_the_report_is_a_usage_error(
    trio: Trio, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    inside = invoke(trio.patch_args(out, "--junit", str(out / "junit.xml")))
    assert_error(inside, ExitCode.USAGE, "--junit", "inside the output folder")
    same = tmp_path / "r.json"
    both = invoke(trio.patch_args(out, "--report", str(same), "--junit", str(same)))
    assert_error(both, ExitCode.USAGE, "--junit", "--report")
    assert not out.exists()
    assert not same.exists()


def test_junit_inside_an_input_a_symlink_or_a_fifo_is_refused(trio: Trio, tmp_path: Path) -> None:
    base = ["score", str(trio.adapter), *pair(trio), "-q", "--force", "--junit"]
    assert_error(invoke([*base, str(trio.adapter / "j.xml")]), ExitCode.FILESYSTEM, "input")
    assert not (trio.adapter / "j.xml").exists()
    link = tmp_path / "link.xml"
    link.symlink_to(tmp_path / "elsewhere.xml")
    assert_error(invoke([*base, str(link)]), ExitCode.FILESYSTEM, "symlink")
    assert not (tmp_path / "elsewhere.xml").exists()
    fifo = tmp_path / "fifo.xml"
    os.mkfifo(fifo)
    assert_error(invoke([*base, str(fifo)]), ExitCode.FILESYSTEM, "FIFO", "left as it is")
    assert fifo.exists()
    missing = tmp_path / "no" / "j.xml"
    assert_error(invoke([*base, str(missing)]), ExitCode.FILESYSTEM, "does not exist")

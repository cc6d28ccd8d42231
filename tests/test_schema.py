"""``safelora schema``: the report's JSON Schema (draft 2020-12), shipped in the package. Every kind
of report a run writes validates against it; a field added to a report without the schema fails
here (every object is closed), and the types are tight (a string cosine is rejected)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from safelora_cli.errors import ExitCode
from safelora_cli.output.report import JSON_SCHEMA_NAME
from safelora_cli.settings import SETTING_KEYS
from safelora_cli.synthetic import (
    ALL_PROJ,
    FineTuneSpec,
    LlamaShape,
    PairSpec,
    all_modules,
    make_adapter,
    make_full_finetune,
    make_pair,
)
from tests.helpers import REPORT, invoke

Q1 = "model.layers.1.self_attn.q_proj"
# objects left open on purpose: what a profile file recorded, a warning's raw values, file sizes
OPEN = {("profile", "tool"), ("warning", "values"), ("input", "files"), ("profile", "pair")}


def printed_schema() -> dict[str, Any]:
    result = invoke(["schema"])
    assert result.exit_code == ExitCode.OK, result.stderr
    schema: dict[str, Any] = json.loads(result.stdout)
    return schema


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = printed_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real report (or batch list) of every kind, from the command line."""
    root = tmp_path_factory.mktemp("kinds")
    base, aligned = make_pair(root, PairSpec(identical=(Q1,)))
    modules = all_modules(LlamaShape(), ALL_PROJ)
    one = make_adapter(root / "one", base, aligned, modules, rank=4, seed=1)
    two = make_adapter(root / "two", base, aligned, modules, rank=4, seed=2)
    ft = make_full_finetune(
        root / "ft", base, aligned, FineTuneSpec(("model.layers.0.mlp.up_proj",))
    )
    pair = ["--base", str(base), "--aligned", str(aligned)]
    profile = root / "p.safetensors"
    built = invoke(["profile", *pair, "-o", str(profile), "--rank", "2", "-q"])
    assert built.exit_code == ExitCode.OK, built.stderr
    runs = {
        "adapter": ["score", str(one), *pair],
        "batch": ["score", str(one), str(two), *pair],
        "subspace": ["score", str(one), *pair, "--projection", "subspace", "--energy", "0.9"],
        "threshold": ["score", str(one), *pair, "--select", "threshold", "--threshold", "0.4"],
        "patched": ["patch", str(one), *pair, "-o", str(root / "patched")],
        "merged": ["patch", str(one), *pair, "-o", str(root / "merged"), "--merge"],
        "full": ["patch", str(ft), *pair, "-o", str(root / "full"), "-k", "2"],
        "profile": ["score", str(one), "--profile", str(profile)],
        "profile-batch": [
            "patch",
            str(one),
            str(two),
            "--profile",
            str(profile),
            "-o",
            str(root / "batch"),
        ],  # fmt: skip
        "full-profile": ["score", str(ft), "--profile", str(profile), "--aligned", str(aligned)],
    }
    found: dict[str, Any] = {}
    for kind, args in runs.items():
        result = invoke([*args, "--json", "-q"])
        assert result.exit_code == ExitCode.OK, (kind, result.stderr)
        found[kind] = json.loads(result.stdout)
    found["saved"] = json.loads((root / "merged" / REPORT).read_text())
    return found


def test_schema_prints_the_shipped_draft_2020_12_schema() -> None:
    schema = printed_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    shipped = files("safelora_cli.output").joinpath(JSON_SCHEMA_NAME).read_text("utf-8")
    assert json.loads(shipped) == schema
    jsonschema.Draft202012Validator.check_schema(schema)


def test_every_kind_of_report_validates(
    validator: jsonschema.Draft202012Validator, reports: dict[str, Any]
) -> None:
    for kind, report in reports.items():
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(report)]
        assert errors == [], kind
    # what each kind shows: the fixtures really are of the kinds named
    assert isinstance(reports["batch"], list)
    assert len(reports["batch"]) == 2
    assert reports["full"]["kind"] == reports["full-profile"]["kind"] == "full"
    assert "profile" in reports["profile"]["inputs"]
    assert "cosine_bound" in reports["profile"]["modules"][0]
    assert "subspace_rank" in reports["subspace"]["modules"][0]
    assert any(m["skipped"] for m in reports["adapter"]["modules"])
    assert "files" in reports["merged"]
    assert (reports["merged"]["output_kind"], reports["merged"]["settings"]["merge"]) == (
        "merged", True,
    )  # fmt: skip
    assert reports["saved"]["output_kind"] == "merged"


def test_a_string_cosine_is_rejected(
    validator: jsonschema.Draft202012Validator, reports: dict[str, Any]
) -> None:
    report = copy.deepcopy(reports["adapter"])
    scored = next(m for m in report["modules"] if m["cosine"] is not None)
    scored["cosine"] = str(scored["cosine"])
    with pytest.raises(jsonschema.ValidationError, match="cosine|valid under"):
        validator.validate(report)
    scored["cosine"] = 1.5  # a cosine lies in [-1, 1]
    assert not validator.is_valid(report)
    scored["cosine"] = None  # null is what a skipped module has
    assert validator.is_valid(report)


@pytest.mark.parametrize(
    "where",
    [
        [],
        ["settings"],
        ["summary"],
        ["tool"],
        ["inputs"],
        ["inputs", "adapter"],
        ["modules", 0],
        ["warnings", 0],
    ],  # fmt: skip
    ids=lambda w: ".".join(map(str, w)) or "report",
)
def test_a_field_the_schema_does_not_name_is_rejected(
    validator: jsonschema.Draft202012Validator, reports: dict[str, Any], where: list[Any]
) -> None:
    report = copy.deepcopy(reports["profile"])  # it has a warning
    target: Any = report
    for key in where:
        target = target[key]
    target["added_without_the_schema"] = 1
    assert not validator.is_valid(report)


def _objects(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield path, node
        for key, value in node.items():
            yield from _objects(value, (*path, key))
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value, path)


def test_every_object_in_the_schema_is_closed_but_the_recorded_ones() -> None:
    """A new field must be added to the schema: only objects that hold what an input file
    recorded (or a map of names) are open."""
    schema = printed_schema()
    for path, node in _objects(schema["$defs"]):
        named = (path[0], path[-1]) if len(path) > 1 else (path[0], path[0])
        if named in OPEN:
            continue
        assert node.get("additionalProperties") is False, path
        assert set(node.get("required", [])) <= set(node["properties"]), path


def test_the_settings_in_the_schema_are_the_settings(validator: Any) -> None:
    settings = printed_schema()["$defs"]["settings"]
    assert set(settings["required"]) == set(SETTING_KEYS)
    assert set(settings["properties"]) == {*SETTING_KEYS, "merge"}  # patch's --merge


def test_schema_takes_no_arguments_and_writes_nothing(tmp_path: Path) -> None:
    result = invoke(["schema", "extra"])
    assert result.exit_code == ExitCode.USAGE
    assert list(tmp_path.iterdir()) == []

"""Provenance: the adapter's recorded base model against --aligned and --base, the pair itself,
and runs that cannot mean anything (refused) or probably do not mean what was intended (warned)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from safelora_cli.errors import ExitCode, IncompatibleInputError, UsageError
from safelora_cli.inputs.modelref import Match, ModelRef, compare, hub_cache_location, parse_ref
from safelora_cli.inputs.provenance import (
    check_adapter,
    check_pair,
    check_scores,
    file_identities,
    refuse,
)
from safelora_cli.inputs.resolve import resolve
from tests.conftest import TrioFactory
from tests.reports import make_report, model_input

Cli = Callable[..., Result]
BASE = model_input("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", "b" * 40)
ALIGNED = model_input("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-chat-hf", "a" * 40)
CACHE = "/root/.cache/huggingface/hub"
CHAT_SNAPSHOT = f"{CACHE}/models--meta-llama--Llama-2-7b-chat-hf/snapshots/"


def codes(findings: list[Any]) -> list[str]:
    return [f.code for f in findings]


def trained_on(name: Any, **extra: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "base_model_name_or_path": name, **extra}


# --- references ---------------------------------------------------------------------------------


def test_a_path_in_the_hub_cache_is_that_hub_id_at_that_commit() -> None:
    ref = hub_cache_location(CHAT_SNAPSHOT + "a" * 40)
    assert ref is not None
    assert (ref.hub_id, ref.commit, ref.subfolder) == (
        "meta-llama/Llama-2-7b-chat-hf",
        "a" * 40,
        None,
    )
    sub = hub_cache_location(CHAT_SNAPSHOT + "a" * 40 + "/variant/fp16")
    assert sub is not None
    assert sub.subfolder == "variant/fp16"
    legacy = hub_cache_location(f"{CACHE}/models--gpt2/snapshots/" + "1" * 40)
    assert legacy is not None
    assert legacy.hub_id == "gpt2"
    assert hub_cache_location(f"{CACHE}/datasets--org--data/snapshots/" + "a" * 40) is None
    assert hub_cache_location(CHAT_SNAPSHOT + "not-a-commit") is None
    assert hub_cache_location(f"{CACHE}/models--a--b--c/snapshots/" + "a" * 40) is None
    assert hub_cache_location("/models/Llama-2-7b-chat-hf") is None


def test_parse_ref_tells_hub_ids_local_folders_and_foreign_paths_apart(tmp_path: Path) -> None:
    folder = tmp_path / "chat"
    folder.mkdir()
    (tmp_path / "link").symlink_to(folder)
    assert parse_ref(str(tmp_path / "link")).path == str(folder)  # resolved
    assert parse_ref("org/model@v2") == ModelRef("org/model@v2", hub_id="org/model", revision="v2")
    foreign = parse_ref("/scratch/other-machine/Llama-2-7b-chat-hf/")
    assert (foreign.hub_id, foreign.name) == (None, "llama-2-7b-chat-hf")
    assert parse_ref("C:\\Users\\me\\Llama-2-7b-chat-hf").name == "llama-2-7b-chat-hf"
    assert parse_ref(CHAT_SNAPSHOT + "c" * 40).hub_id == "meta-llama/Llama-2-7b-chat-hf"


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (ModelRef("x", hub_id="Org/M"), ModelRef("y", hub_id="org/m"), Match.SAME),
        (ModelRef("x", hub_id="o/m", commit="a" * 40), ModelRef("y", hub_id="o/m", commit="b" * 40),
         Match.OTHER_REVISION),
        (ModelRef("x", hub_id="o/m", revision="v1"), ModelRef("y", hub_id="o/m", revision="v2"),
         Match.OTHER_REVISION),
        (ModelRef("x", hub_id="o/m", revision="main", commit="a" * 40),
         ModelRef("y", hub_id="o/m"), Match.SAME),
        (ModelRef("x", hub_id="mirror/m"), ModelRef("y", hub_id="o/m"), Match.SAME_NAME),
        (ModelRef("x", hub_id="o/m"), ModelRef("y", path="/models/M"), Match.SAME_NAME),
        (ModelRef("x", path="/a/m"), ModelRef("y", path="/a/m"), Match.SAME),
        (ModelRef("x", path="/a/m"), ModelRef("y", path="/b/n"), Match.DIFFERENT),
        (ModelRef("x", hub_id="o/m", subfolder="s"), ModelRef("y", hub_id="o/m"), Match.DIFFERENT),
    ],
)  # fmt: skip
def test_compare(a: ModelRef, b: ModelRef, expected: Match) -> None:
    assert compare(a, b) is expected
    assert compare(b, a) is expected


# --- the adapter's own record -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "meta-llama/Llama-2-7b-chat-hf",
        "META-LLAMA/llama-2-7b-chat-hf",  # hub ids are case-insensitive
        "NousResearch/Llama-2-7b-chat-hf",  # an ungated mirror
        "/scratch/train/Llama-2-7b-chat-hf",  # a folder on the training machine
        "C:\\models\\Llama-2-7b-chat-hf",
        CHAT_SNAPSHOT + "a" * 40,  # the same snapshot, cached on the training machine
        None,  # nothing recorded: nothing to compare
        "",
        42,
    ],
)
def test_adapter_trained_on_the_aligned_model_passes(name: Any) -> None:
    assert check_adapter(trained_on(name), BASE, ALIGNED) == []


def test_adapter_trained_on_the_base_model_is_a_warning() -> None:
    for name in ("meta-llama/Llama-2-7b-hf", "/data/Llama-2-7b-hf"):
        [finding] = check_adapter(trained_on(name), BASE, ALIGNED)
        assert finding.code == "adapter-names-base"
        assert not finding.fatal
        assert finding.values == {"trained_on": name, "base": BASE["ref"],
                                  "aligned": ALIGNED["ref"]}  # fmt: skip
        assert name in finding.message
        assert "which is --base" in finding.message


def test_adapter_trained_on_another_model_is_a_warning_naming_all_three() -> None:
    [finding] = check_adapter(trained_on("mistralai/Mistral-7B-v0.1"), BASE, ALIGNED)
    assert finding.code == "adapter-names-other"
    for name in ("mistralai/Mistral-7B-v0.1", BASE["ref"], ALIGNED["ref"]):
        assert name in finding.message
    assert json.loads(json.dumps(finding.to_dict()))["code"] == "adapter-names-other"


def test_adapter_trained_on_another_commit_of_the_aligned_repo() -> None:
    other = CHAT_SNAPSHOT + "f" * 40
    [finding] = check_adapter(trained_on(other), BASE, ALIGNED)
    assert finding.code == "adapter-revision"
    assert finding.values["trained_revision"] == "f" * 40
    assert finding.values["aligned_revision"] == "a" * 40
    config = trained_on("meta-llama/Llama-2-7b-chat-hf", revision="f" * 40)  # PEFT's field
    assert codes(check_adapter(config, BASE, ALIGNED)) == ["adapter-revision"]
    config = trained_on("meta-llama/Llama-2-7b-chat-hf", revision="a" * 40)
    assert check_adapter(config, BASE, ALIGNED) == []


def test_local_folders_compare_by_resolved_path(tmp_path: Path) -> None:
    for name in ("base", "chat"):
        (tmp_path / name).mkdir()
    (tmp_path / "chat-link").symlink_to(tmp_path / "chat")
    base, aligned = resolve(str(tmp_path / "base")).describe(), resolve(str(tmp_path / "chat"))
    assert check_adapter(trained_on(str(tmp_path / "chat-link")), base, aligned.describe()) == []
    findings = check_adapter(trained_on(str(tmp_path / "base")), base, aligned.describe())
    assert codes(findings) == ["adapter-names-base"]


def test_a_local_aligned_folder_in_the_cache_is_its_hub_id(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--org--chat" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    aligned = resolve(str(snapshot)).describe()
    assert aligned["hub_id"] is None  # given as a folder: the report says so
    assert check_adapter(trained_on("org/chat"), BASE, aligned) == []
    config = trained_on("org/chat", revision="d" * 40)
    assert codes(check_adapter(config, BASE, aligned)) == ["adapter-revision"]


def test_hostile_names_are_escaped_in_messages_and_kept_raw_in_values() -> None:
    name = "evil/\x1b]0;owned\x07\nINJECTED" + "x" * 1000
    [finding] = check_adapter(trained_on(name), BASE, ALIGNED)
    assert "\x1b" not in finding.message
    assert "\n" not in finding.message
    assert len(finding.message) < 600
    assert finding.values["trained_on"] == name


# --- the pair -----------------------------------------------------------------------------------


def test_the_same_model_twice_is_refused_as_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    one, two = resolve(str(tmp_path / "model")), resolve(str(tmp_path / "." / "model"))
    [finding] = check_pair(one.describe(), two.describe())
    assert finding.code == "same-model"
    assert finding.fatal
    with pytest.raises(UsageError, match="are the same model") as caught:
        refuse([finding])
    assert caught.value.exit_code == 2
    assert codes(check_pair(ALIGNED, ALIGNED)) == ["same-model"]
    cached = model_input("local-copy") | {"path": CHAT_SNAPSHOT + "a" * 40}
    assert codes(check_pair(cached, ALIGNED)) == ["same-model"]  # same snapshot, two spellings


def test_a_full_fine_tune_is_checked_through_its_config_name_or_path() -> None:
    config = {"model_type": "llama", "_name_or_path": "meta-llama/Llama-2-7b-hf"}
    [finding] = check_adapter(config, BASE, ALIGNED)
    assert finding.code == "adapter-names-base"
    assert finding.message.startswith("the fine-tune was trained on meta-llama/Llama-2-7b-hf")
    config["_name_or_path"] = "meta-llama/Llama-2-7b-chat-hf"
    assert check_adapter(config, BASE, ALIGNED) == []


def test_two_folders_or_repos_of_one_name_are_a_warning() -> None:
    mirror = model_input("NousResearch/Llama-2-7b-chat-hf", "NousResearch/Llama-2-7b-chat-hf")
    [finding] = check_pair(mirror, ALIGNED)
    assert (finding.code, finding.fatal) == ("pair-same-name", False)
    assert codes(check_pair(model_input("/a/model"), model_input("/b/model"))) == ["pair-same-name"]


def test_two_commits_of_one_repo_are_a_valid_pair() -> None:
    later = ALIGNED | {"commit": "9" * 40, "revision": "v2", "path": CHAT_SNAPSHOT + "9" * 40}
    assert check_pair(ALIGNED, later) == []
    assert check_pair(BASE, ALIGNED) == []


def test_the_same_weight_files_in_two_folders_are_refused(tmp_path: Path) -> None:
    base, aligned, copy = tmp_path / "base", tmp_path / "aligned", tmp_path / "copy"
    for folder in (base, aligned, copy):
        folder.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    os.link(base / "model.safetensors", aligned / "model.safetensors")  # a hard link
    (copy / "model.safetensors").write_bytes(b"weights")  # equal bytes, another file
    b, a = resolve(str(base)).describe(), resolve(str(aligned)).describe()
    [finding] = check_pair(b, a, file_identities(base), file_identities(aligned))
    assert finding.code == "same-files"
    with pytest.raises(IncompatibleInputError) as caught:
        refuse([finding])
    assert caught.value.exit_code == 4
    assert check_pair(b, a, file_identities(base), file_identities(copy)) == []


def test_hub_snapshots_of_the_same_blobs_are_the_same_files(tmp_path: Path) -> None:
    folders = []
    for repo in ("models--org--base", "models--org--chat"):
        blob = tmp_path / repo / "blobs" / ("5" * 64)
        blob.parent.mkdir(parents=True)
        blob.write_bytes(b"weights")
        snapshot = tmp_path / repo / "snapshots" / ("c" * 40)
        snapshot.mkdir(parents=True)
        (snapshot / "model.safetensors").symlink_to(Path("../../blobs") / blob.name)
        folders.append(snapshot)
    identities = [file_identities(folder) for folder in folders]
    assert identities[0] == identities[1] == {"model.safetensors": "blob:" + "5" * 64}
    assert file_identities(tmp_path / "missing") == {}


@pytest.mark.parametrize(
    ("base", "aligned"),
    [
        ("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf"),
        ("google/gemma-2-9b-it", "google/gemma-2-9b"),
        ("runs/aligned", "runs/base"),
    ],
)
def test_swapped_pair_is_a_warning(base: str, aligned: str) -> None:
    [finding] = check_pair(model_input(base), model_input(aligned))
    assert finding.code == "pair-swapped"
    assert not finding.fatal
    assert check_pair(model_input(aligned), model_input(base)) == []


# --- after scoring ------------------------------------------------------------------------------


def test_scores_of_a_pair_identical_everywhere_are_refused(
    make_trio: TrioFactory, cli: Cli
) -> None:
    trio = make_trio(projs=("q_proj", "v_proj"))
    trio = make_trio(projs=("q_proj", "v_proj"), identical=tuple(trio.modules))
    args = ["score", str(trio.adapter), "--base", str(trio.base), "--aligned", str(trio.aligned)]
    result = cli([*args, "--num-layers", "1", "--json"])
    assert result.exit_code == ExitCode.INCOMPATIBLE  # not a silent "nothing to project"
    assert "identical in all 4" in result.stderr
    assert result.stdout == ""


def test_scores_mostly_identical_or_all_zero_are_warnings() -> None:
    names = [f"model.layers.{k}.self_attn.q_proj" for k in range(4)]
    report = make_report(names=names, skipped=names[:3], num_layers=1)
    [finding] = check_scores(report)
    assert (finding.code, finding.fatal) == ("mostly-identical", False)
    assert finding.values == {"modules": 4, "identical": 3, "zero_update": 0}
    assert check_scores(make_report(names=names, skipped=names[:2], num_layers=1)) == []
    report = make_report(names=names, skipped=names, num_layers=1)
    for module in report["modules"]:
        module["v_norm"], module["skipped"] = 1.0, "LoRA delta is zero"
    assert codes(check_scores(report)) == ["adapter-is-zero"]
    assert check_scores(make_report(layers=2)) == []
    refuse(check_scores(make_report(layers=2)))  # nothing fatal: no exception

"""Published files carry no local path: the model card and the report inside an output folder,
and a profile, name local inputs by folder name (hub id and commit for a cache snapshot), never
by absolute path; the card's command line too. ``--json`` on stdout keeps the full paths.

The end-to-end tests put every input under a fake HOME (models, a huggingface_hub cache with
HF_HUB_OFFLINE=1), give refs as ``~/...``, absolute paths, hub ids and a snapshot folder, plant
warnings whose messages hold paths, then look for any of those paths in the bytes written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import constants
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safelora_cli.errors import ExitCode
from safelora_cli.output.card_section import BEGIN, END
from safelora_cli.output.published import (
    public_input,
    public_name,
    published_command,
    published_report,
    scrubber,
)
from tests.conftest import Trio
from tests.helpers import CARD, COMMIT, CONFIG, OTHER_COMMIT, REPORT, Cli, cache_repo

TRAINED_ON = "train/Llama-2-chat"  # under HOME: the trainer's path in the adapter's config


def peft_card(base_model: str) -> str:
    """A card as PEFT's save_pretrained writes it: the trainer's base model path in it."""
    return (
        f"---\nbase_model: {base_model}\nlibrary_name: peft\ntags:\n"
        f"- base_model:adapter:{base_model}\n- lora\n- transformers\n---\n\n"
        "# Model Card for my-lora\n\nFine-tuned on benign data.\n"
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake HOME holding the huggingface_hub cache (offline); the working folder is HOME."""
    home = tmp_path / "home"
    cache = home / ".cache" / "huggingface" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(home)
    return home


@pytest.fixture
def placed(trio: Trio, home: Path) -> dict[str, Any]:
    """The trio under HOME: the adapter in ~/models (a PEFT card, a config naming the trainer's
    path, a link out of its folder), base and aligned in the hub cache."""
    adapter = home / "models" / "my-lora"
    shutil.copytree(trio.adapter, adapter)
    trained_on = str(home / TRAINED_ON)
    config = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": trained_on}))
    (adapter / CARD).write_text(peft_card(trained_on))
    (home / "notes.json").write_text("{}")
    (adapter / "notes.json").symlink_to(home / "notes.json")  # a warning naming both paths
    cache = Path(constants.HF_HUB_CACHE)
    cache_repo(cache, "org/base-model", trio.base)
    snapshot = cache_repo(cache, "org/chat-model", trio.aligned, commit=OTHER_COMMIT)
    return {"adapter": adapter, "snapshot": snapshot, "cache": cache}


def local_paths(tmp_path: Path, home: Path) -> list[str]:
    """What must never be in a published file: every local folder of the test."""
    cache = Path(constants.HF_HUB_CACHE)
    found = {str(p) for p in (tmp_path, home, cache, tmp_path.resolve(), cache.resolve())}
    return sorted(found | {"/tmp/", "/home/", ".cache/huggingface"})


def assert_no_local_path(data: bytes, secrets: list[str], what: str) -> None:
    for secret in secrets:
        assert secret.encode() not in data, f"{what} holds {secret}"
    # escaped forms too: JSON writes "/" as "/", but a path may reach it through repr()
    assert b"pytest-of" not in data, what


def front_matter(text: str) -> dict[str, Any]:
    match = REGEX_YAML_BLOCK.search(text)
    assert match is not None
    data = yaml.safe_load(match.group(2))
    assert isinstance(data, dict)
    return data


# --- a patch run ---------------------------------------------------------------------------------


def test_patch_card_and_report_name_inputs_by_folder_name_and_hub_id(
    cli: Cli, tmp_path: Path, home: Path, placed: dict[str, Any]
) -> None:
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    args = ["patch", "~/models/my-lora", "--base", "org/base-model", "--aligned",
            str(placed["snapshot"]), "--output", str(out), "--num-layers", "3",
            "--json"]  # fmt: skip
    result = cli(args)
    assert result.exit_code == ExitCode.OK, result.stderr
    secrets = local_paths(tmp_path, home)
    card, report_bytes = (out / CARD).read_bytes(), (out / REPORT).read_bytes()
    assert_no_local_path(card, secrets, CARD)
    assert_no_local_path(report_bytes, secrets, REPORT)

    report = json.loads(report_bytes)
    adapter, base, aligned = (report["inputs"][r] for r in ("adapter", "base", "aligned"))
    assert (adapter["ref"], adapter["path"], adapter["hub_id"]) == ("my-lora", "my-lora", None)
    assert (base["ref"], base["path"], base["hub_id"], base["revision"], base["commit"]) == (
        "org/base-model", "org/base-model", "org/base-model", "main", COMMIT,
    )  # fmt: skip
    # the snapshot folder given as a path: its hub id and commit
    assert (aligned["ref"], aligned["hub_id"], aligned["commit"]) == (
        "org/chat-model", "org/chat-model", OTHER_COMMIT,
    )  # fmt: skip
    assert report["output"] == "out"
    codes = {w["code"]: w for w in report["warnings"]}
    assert codes["adapter-names-other"]["values"]["trained_on"] == "Llama-2-chat"
    # the snapshot's path was shortened in the message (start...end): still its hub id
    assert "--aligned (org/chat-model)" in codes["adapter-names-other"]["message"]
    assert "my-lora/notes.json: not copied" in codes["file-outside-input"]["message"]

    text = card.decode()
    data = front_matter(text)
    assert data["base_model"] == "org/chat-model"  # the body names it the same way
    assert "- **Aligned model**: `org/chat-model`, commit `" + OTHER_COMMIT + "`" in text
    assert "- **Base model**: `org/base-model`, revision `main`, commit `" + COMMIT in text
    assert "- **Adapter**: `my-lora`" in text
    assert data["tags"] == ["base_model:adapter:org/chat-model", "lora", "transformers",
                            "safelora"]  # fmt: skip
    assert ("safelora patch my-lora --base org/base-model --aligned org/chat-model --output out "
            "--num-layers 3 --json") in text  # fmt: skip

    printed = json.loads(result.stdout)  # stdout stays on the machine: full paths
    assert printed["inputs"]["adapter"]["path"] == str(placed["adapter"].resolve())
    assert printed["output"] == str(out)
    assert published_report(printed) == report


def test_a_report_outside_the_output_keeps_full_paths_the_one_inside_does_not(
    cli: Cli, trio: Trio, tmp_path: Path
) -> None:
    out, outside = tmp_path / "out", tmp_path / "run.json"
    result = cli(trio.patch_args(out, "--report", str(outside), "--quiet"))
    assert result.exit_code == ExitCode.OK, result.stderr
    kept = json.loads(outside.read_text())
    assert kept["inputs"]["base"]["path"] == str(trio.base.resolve())
    assert_no_local_path((out / CARD).read_bytes(), [str(tmp_path)], CARD)


def test_a_merged_card_is_a_full_model_card_and_its_report_says_merged(
    cli: Cli, tmp_path: Path, home: Path, placed: dict[str, Any], trio: Trio
) -> None:
    out = tmp_path / "merged"
    args = ["patch", str(placed["adapter"]), "--base", str(trio.base), "--aligned",
            str(trio.aligned), "--output", str(out), "--merge", "-k", "2", "-q"]  # fmt: skip
    result = cli(args)
    assert result.exit_code == ExitCode.OK, result.stderr
    secrets = local_paths(tmp_path, home)
    for name in (CARD, REPORT):
        assert_no_local_path((out / name).read_bytes(), secrets, name)
    report = json.loads((out / REPORT).read_text())
    assert (report["kind"], report["output_kind"], report["settings"]["merge"]) == (
        "adapter", "merged", True,
    )  # fmt: skip
    data = front_matter((out / CARD).read_text())
    assert data["library_name"] == "transformers"
    assert data["tags"] == ["transformers", "safelora"]  # no base_model:adapter:..., no lora
    assert "base_model" not in data  # local folders: no hub id to name
    assert (
        "This model is the aligned model below with a LoRA adapter merged in"
        in (out / CARD).read_text()
    )
    shown = cli(["show", str(out / REPORT), "--json"])  # the published report reads back
    assert shown.exit_code == ExitCode.OK, shown.stderr
    assert json.loads(shown.stdout)["output_kind"] == "merged"


# --- profiles ------------------------------------------------------------------------------------


def test_a_profile_stores_no_local_path_and_its_runs_publish_none(
    cli: Cli, tmp_path: Path, home: Path, placed: dict[str, Any], trio: Trio
) -> None:
    profile = home / "profiles" / "pair.safetensors"
    profile.parent.mkdir()
    made = cli(["profile", "--base", str(trio.base), "--aligned", "~/../trio0/aligned",
                "--output", str(profile), "--rank", "4", "--quiet"])  # fmt: skip
    assert made.exit_code == ExitCode.OK, made.stderr
    secrets = local_paths(tmp_path, home)
    assert_no_local_path(profile.read_bytes(), secrets, "the profile")
    with safe_open(str(profile), "pt") as fh:
        stored = json.loads(fh.metadata()["profile"])["inputs"]
    assert (stored["base"]["ref"], stored["base"]["path"]) == ("base", "base")
    assert (stored["aligned"]["ref"], stored["aligned"]["path"]) == ("aligned", "aligned")
    assert stored["base"]["files"] == {p.name: p.stat().st_size for p in trio.base.iterdir()}

    out = tmp_path / "out"
    result = cli(["patch", str(placed["adapter"]), "--profile", str(profile), "--output",
                  str(out), "-q"])  # fmt: skip
    assert result.exit_code == ExitCode.OK, result.stderr
    for name in (CARD, REPORT):
        assert_no_local_path((out / name).read_bytes(), secrets, name)
    report = json.loads((out / REPORT).read_text())
    assert (report["inputs"]["profile"]["ref"], report["inputs"]["profile"]["path"]) == (
        "pair.safetensors", "pair.safetensors",
    )  # fmt: skip


def test_an_older_profile_with_absolute_paths_leaks_none_of_them(
    cli: Cli, tmp_path: Path, home: Path, placed: dict[str, Any], trio: Trio
) -> None:
    """A profile written before this rule holds its maker's paths (here under another HOME):
    it is still read, its runs name the pair by folder name, and no path reaches the output."""
    profile = tmp_path / "old.safetensors"
    made = cli(["profile", "--base", str(trio.base), "--aligned", str(trio.aligned),
                "--output", str(profile), "--rank", "4", "--quiet"])  # fmt: skip
    assert made.exit_code == ExitCode.OK, made.stderr
    with safe_open(str(profile), "pt") as fh:
        metadata = fh.metadata()
    body = json.loads(metadata["profile"])
    maker = "/home/maker/.cache/huggingface/hub/models--org--chat/snapshots/" + "e" * 40
    body["inputs"] = {
        "base": body["inputs"]["base"]
        | {"ref": "/home/maker/models/base", "path": "/home/maker/models/base"},  # fmt: skip
        "aligned": body["inputs"]["aligned"] | {"ref": maker, "path": maker},
    }
    save_file(load_file(str(profile)), str(profile), {**metadata, "profile": json.dumps(body)})

    out = tmp_path / "out"
    result = cli(["patch", str(placed["adapter"]), "--profile", str(profile), "--output",
                  str(out), "-q", "--json"])  # fmt: skip
    assert result.exit_code == ExitCode.OK, result.stderr
    secrets = [*local_paths(tmp_path, home), "/home/maker", "maker/models"]
    for name in (CARD, REPORT):
        assert_no_local_path((out / name).read_bytes(), secrets, name)
    report = json.loads((out / REPORT).read_text())
    pair = report["inputs"]["profile"]["pair"]
    assert (pair["base"]["ref"], pair["base"]["path"]) == ("base", "base")
    assert (pair["aligned"]["hub_id"], pair["aligned"]["commit"]) == ("org/chat", "e" * 40)
    assert report["inputs"]["aligned"]["ref"] == "org/chat"
    assert front_matter((out / CARD).read_text())["base_model"] == "org/chat"
    # the adapter was trained on a local path the profile's pair does not name: the warning
    # says so with folder names only
    warned = [w["message"] for w in report["warnings"] if w["code"].startswith("adapter-")]
    assert warned
    assert all("/home/" not in m for m in warned)


# --- cards: one section, no aliases --------------------------------------------------------------


def test_re_patching_a_patched_adapter_keeps_one_section(
    cli: Cli, tmp_path: Path, placed: dict[str, Any], trio: Trio
) -> None:
    source = placed["adapter"]
    for n in range(1, 4):
        out = tmp_path / f"round{n}"
        result = cli(["patch", str(source), "--base", str(trio.base), "--aligned",
                      str(trio.aligned), "--output", str(out), "-k", str(n), "-q"])  # fmt: skip
        assert result.exit_code == ExitCode.OK, result.stderr
        text = (out / CARD).read_text()
        assert text.count(BEGIN) == text.count(END) == 1, n
        assert f"number: the {n} lowest cosines" in text  # this run's section, not a stale one
        assert text.count("# Model Card for my-lora") == 1
        assert text.endswith("\n\n# Model Card for my-lora\n\nFine-tuned on benign data.\n")
        data = front_matter(text)
        assert data["tags"].count("safelora") == 1
        source = out


def test_an_alias_bomb_in_the_input_card_is_left_out_with_a_warning(
    cli: Cli, tmp_path: Path, trio: Trio
) -> None:
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
    (trio.adapter / CARD).write_text("---\nlicense: mit\n" + "\n".join(levels) + "\n---\n# My\n")
    out = tmp_path / "out"
    result = cli(trio.patch_args(out))
    assert result.exit_code == ExitCode.OK, result.stderr
    assert "left out of the model card" in result.stderr
    text = (out / CARD).read_text()
    block = REGEX_YAML_BLOCK.search(text).group(2)  # type: ignore[union-attr]
    assert "&a" not in block
    assert "*a" not in block
    assert front_matter(text)["license"] == "mit"
    assert len(text) < 1_000_000
    report = json.loads((out / REPORT).read_text())
    assert any(w["code"] == "model-card" and "YAML" in w["message"] for w in report["warnings"])


# --- the rules, unit by unit ---------------------------------------------------------------------


SNAPSHOT = "/home/u/.cache/huggingface/hub/models--org--chat/snapshots/" + "c" * 40


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        pytest.param({"ref": "/tmp/x/my-lora", "path": "/tmp/x/my-lora", "hub_id": None},
                     {"ref": "my-lora", "path": "my-lora", "hub_id": None}, id="absolute"),
        pytest.param({"ref": "~/m/base/", "path": "/home/u/m/base", "hub_id": None},
                     {"ref": "base", "path": "base", "hub_id": None}, id="home"),
        pytest.param({"ref": ".", "path": "/home/u/m/base", "hub_id": None},
                     {"ref": "base", "path": "base", "hub_id": None}, id="dot"),
        pytest.param({"ref": "org/chat@v1", "path": SNAPSHOT, "hub_id": "org/chat",
                      "revision": "v1", "commit": "c" * 40},
                     {"ref": "org/chat@v1", "path": "org/chat", "hub_id": "org/chat",
                      "revision": "v1", "commit": "c" * 40}, id="hub"),
        pytest.param({"ref": SNAPSHOT, "path": SNAPSHOT, "hub_id": None, "commit": None},
                     {"ref": "org/chat", "path": "org/chat", "hub_id": "org/chat",
                      "commit": "c" * 40}, id="snapshot-folder"),
        pytest.param({"ref": "org/base", "commit": "a" * 40},
                     {"ref": "org/base", "commit": "a" * 40}, id="record-without-path"),
        pytest.param({"path": "/tmp/p/pair.safetensors", "pair": {"base": {"ref": "/a/b/base"}}},
                     {"path": "pair.safetensors", "pair": {"base": {"ref": "base"}}},
                     id="profile-record"),
    ],
)  # fmt: skip
def test_public_input(entry: dict[str, Any], expected: dict[str, Any]) -> None:
    assert public_input(entry) == expected
    assert public_input(expected) == expected  # idempotent: published twice, unchanged


def test_free_text_keeps_no_absolute_path() -> None:
    report = {
        "inputs": {"adapter": {"ref": "runs/my-lora", "path": "/srv/u/runs/my-lora"},
                   "aligned": {"ref": "org/chat", "path": SNAPSHOT, "hub_id": "org/chat"}},
        "output": "/srv/u/out",
    }  # fmt: skip
    scrub = scrubber(report)
    assert scrub("/srv/u/runs/my-lora/x.json: not copied") == "my-lora/x.json: not copied"
    assert scrub("runs/my-lora: trained on '/home/bob/llama'") == "my-lora: trained on 'llama'"
    assert scrub(f"{SNAPSHOT}/README.md cannot be used") == "org/chat/README.md cannot be used"
    assert scrub("a link to /tmp/a/b/secret, outside /srv/u/out") == (
        "a link to secret, outside out"
    )
    unchanged = "V = W_a - W_b / ‖V‖, B/A, org/name, https://huggingface.co/org/x, 1/2"
    assert scrub(unchanged) == unchanged
    assert scrub("/srv/u/runs/my-lora2") == "my-lora2"  # another folder, named by its own name
    # printable() shortens a long path to its start and end: still recognised
    assert scrub("(/srv/u/ru...my-lora/README.md)") == "(my-lora/README.md)"
    assert scrub("(/home/u/.cache/hugg...c/README.md)") == "(org/chat/README.md)"
    assert scrub("(/srv/u/ru...nknown/f)") == "(f)"


def test_the_command_line_names_local_paths_by_folder_name(tmp_path: Path) -> None:
    (tmp_path / "here").mkdir()
    argv = ["safelora", "patch", str(tmp_path / "here"), "--base", "org/base@v2", "--aligned",
            SNAPSHOT, f"--output={tmp_path}/out", "-k", "3", "--report", "~/r/run.json",
            "--config", "./cfg/run.toml", "--device", "cuda:0"]  # fmt: skip
    assert published_command(argv, {}) == [
        "safelora", "patch", "here", "--base", "org/base@v2", "--aligned", "org/chat",
        "--output=out", "-k", "3", "--report", "run.json", "--config", "run.toml",
        "--device", "cuda:0",
    ]  # fmt: skip
    assert public_name(str(tmp_path / "here") + "/") == "here"


def test_published_report_is_a_copy_and_idempotent() -> None:
    report = {
        "inputs": {"adapter": {"ref": "/tmp/a/lora", "path": "/tmp/a/lora", "hub_id": None}},
        "output": "/tmp/a/out",
        "warnings": [{"code": "x", "message": "/tmp/a/lora/f: odd",
                      "values": {"p": ["/tmp/a/q/r"]}}],
        "modules": [],
    }  # fmt: skip
    public = published_report(report)
    assert report["output"] == "/tmp/a/out"  # the caller's report is untouched
    assert public["warnings"] == [{"code": "x", "message": "lora/f: odd", "values": {"p": ["r"]}}]
    assert published_report(public) == public

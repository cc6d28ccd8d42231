"""Presets and run files: preset < --config < flags, defaults last, every error a usage error.

Presets that point at the synthetic folders are written to a temporary folder named in
SAFELORA_PRESET_PATH: nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from safelora_cli.errors import ExitCode, UsageError
from safelora_cli.inputs import config
from safelora_cli.inputs.config import (
    PRESET_PATH_ENV,
    Preset,
    find_preset,
    load_presets,
    merge_layers,
    read_config,
    resolve_run,
)
from safelora_cli.settings import Settings
from tests.conftest import Trio
from tests.helpers import WEIGHTS, Cli, expect_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_PAIRS = {
    "llama-2-7b-chat": ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf"),
    "llama-2-13b-chat": ("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-chat-hf"),
    "llama-3-8b-instruct": ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct"),
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct"),
    "mistral-7b-instruct-v0.2": ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.2"),
    "qwen2.5-7b-instruct": ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"),
    "gemma-2-9b-it": ("google/gemma-2-9b", "google/gemma-2-9b-it"),
}
SUB = "subspace"
PRESETS = {
    "pair": Preset(
        "pair", "p-base", "p-aligned", options={"select": "threshold", "threshold": 0.3}
    ),
    "sub": Preset("sub", "s-base", "s-aligned", options={"projection": "subspace", "rank": 4}),
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- built-in presets ----------------------------------------------------------------------------


def test_builtin_presets_name_the_real_hub_pairs() -> None:
    presets = load_presets([])
    for name, (base, aligned) in REQUIRED_PAIRS.items():
        assert (presets[name].base, presets[name].aligned) == (base, aligned)


def test_builtin_presets_recommend_the_official_default_and_say_why() -> None:
    folder = resources.files("safelora_cli").joinpath("presets")
    files = [f for f in folder.iterdir() if f.name.endswith(".toml")]
    assert len(files) >= len(REQUIRED_PAIRS)
    for preset in load_presets([]).values():
        assert preset.options == {"select": "number", "num_layers": 10}
        assert preset.description
    for file in files:
        text = file.read_text()
        assert text.startswith("#")
        assert "official code's default" in text


def test_presets_ship_as_package_data_and_are_linked_from_configs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "presets/*.toml" in pyproject["tool"]["setuptools"]["package-data"]["safelora_cli"]
    packaged = resources.files("safelora_cli").joinpath("presets")
    linked = ROOT / "configs" / "presets"
    assert sorted(p.name for p in linked.glob("*.toml")) == sorted(
        f.name for f in packaged.iterdir() if f.name.endswith(".toml")
    )
    for path in linked.glob("*.toml"):
        assert path.read_bytes() == packaged.joinpath(path.name).read_bytes()


def test_example_run_file_is_valid() -> None:
    options = read_config(ROOT / "configs" / "example-run.toml")
    assert options["preset"] == "llama-2-7b-chat"
    run = resolve_run({}, ROOT / "configs" / "example-run.toml", load_presets([]))
    assert run.base == "meta-llama/Llama-2-7b-hf"
    assert (run.settings.select, run.settings.threshold) == ("threshold", 0.35)


# --- user presets --------------------------------------------------------------------------------


def test_user_preset_folder_adds_and_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "mine.toml", 'base = "a"\naligned = "b"\nnum-layers = 3\n')
    write(tmp_path / "llama-2-7b-chat.toml", 'base = "./local-base"\naligned = "./local-chat"\n')
    monkeypatch.setenv(PRESET_PATH_ENV, str(tmp_path))
    presets = load_presets()
    assert presets["mine"].options == {"num_layers": 3}
    assert presets["llama-2-7b-chat"].base == "./local-base"
    assert presets["llama-2-7b-chat"].source == str(tmp_path / "llama-2-7b-chat.toml")
    assert "gemma-2-9b-it" in presets


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('base = "a"\n', "no aligned"),
        ('base = "a"\naligned = "b"\ndevice = "cpu"\n', "unknown key 'device'"),
        ('base = "a"\naligned = "b"\nnum_layers = "ten"\n', "must be an integer"),
        ("base = \n", "not valid TOML"),
    ],
    ids=["no-aligned", "run-only-key", "wrong-type", "bad-toml"],
)
def test_bad_preset_file_is_a_usage_error(tmp_path: Path, text: str, message: str) -> None:
    write(tmp_path / "bad.toml", text)
    with pytest.raises(UsageError, match=message) as caught:
        load_presets([tmp_path])
    assert "preset 'bad'" in caught.value.message
    assert caught.value.exit_code == ExitCode.USAGE


def test_missing_preset_folder_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PRESET_PATH_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match=f"{PRESET_PATH_ENV}: .*nowhere is not a folder"):
        load_presets()


def test_unknown_preset_suggests_close_names() -> None:
    with pytest.raises(UsageError, match="'llama-2-7b': no such preset") as caught:
        find_preset("llama-2-7b", load_presets([]))
    assert caught.value.hint is not None
    assert "llama-2-7b-chat" in caught.value.hint
    assert "safelora presets" in caught.value.hint


# --- run files -----------------------------------------------------------------------------------


def test_read_config_accepts_every_run_key(tmp_path: Path) -> None:
    path = write(
        tmp_path / "run.toml",
        'preset = "p"\nbase = "b"\naligned = "a"\nrevision = "main"\nselect = "threshold"\n'
        'num-layers = 4\nthreshold = 1\nprojection = "subspace"\nrank = 8\nenergy = 0.5\n'
        'device = "cpu"\nadapter_name = "default"\ntargets = ["q_proj", "v_proj"]\n'
        'profile = "p.safetensors"\n',
    )
    options = read_config(path)
    assert options.keys() == config.RUN_KEYS
    assert options["targets"] == ["q_proj", "v_proj"]
    assert options["num_layers"] == 4
    assert options["threshold"] == 1.0
    assert isinstance(options["threshold"], float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("num_layer = 3\n", "unknown key 'num_layer'"),
        ("description = 'x'\n", "unknown key 'description'"),
        ("[select]\nmode = 'number'\n", "'select' must be a string"),
        ("num_layers = 2.5\n", "'num_layers' must be an integer"),
        ("rank = true\n", "'rank' must be an integer"),
        ("threshold = '0.3'\n", "'threshold' must be a number"),
        ("num_layers = 3\nnum-layers = 4\n", "'num_layers' is given twice"),
        ("select = number\n", "not valid TOML"),
    ],
    ids=["typo", "preset-only", "table", "float-for-int", "bool", "string", "twice", "syntax"],
)
def test_bad_run_file_is_a_usage_error(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "run.toml", text)
    with pytest.raises(UsageError, match=message) as caught:
        read_config(path)
    assert f"--config {path}" in caught.value.message
    assert caught.value.exit_code == ExitCode.USAGE


def test_unknown_key_hint_suggests_the_close_key(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        read_config(write(tmp_path / "run.toml", "num_layer = 3\n"))
    assert caught.value.hint is not None
    assert caught.value.hint.startswith("did you mean 'num_layers'? known keys: adapter_name, ")


def test_missing_or_folder_run_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        read_config(tmp_path / "nope.toml")
    with pytest.raises(UsageError, match="is a folder"):
        read_config(tmp_path)


# --- merging -------------------------------------------------------------------------------------


def test_merge_later_layers_win_and_none_is_not_given() -> None:
    merged = merge_layers(
        {"base": "p", "aligned": "p", "num_layers": 10, "select": "number"},
        {"base": "c", "num_layers": 5},
        {"base": None, "num_layers": 3, "device": "cpu"},
    )
    assert merged == {
        "base": "c",
        "aligned": "p",
        "num_layers": 3,
        "select": "number",
        "device": "cpu",
    }


@pytest.mark.parametrize(
    ("lower", "upper", "expected"),
    [
        ({"projection": SUB, "energy": 0.9}, {"rank": 8}, {"projection": SUB, "rank": 8}),
        ({"projection": SUB, "rank": 8}, {"energy": 0.9}, {"projection": SUB, "energy": 0.9}),
        ({"projection": SUB, "rank": 8}, {"projection": "paper"}, {"projection": "paper"}),
        ({"rank": 8}, {"projection": SUB}, {"projection": SUB, "rank": 8}),
    ],
    ids=["rank-drops-energy", "energy-drops-rank", "paper-drops-both", "subspace-keeps-rank"],
)  # fmt: skip
def test_merge_rank_and_energy_exclude_each_other(
    lower: dict[str, object], upper: dict[str, object], expected: dict[str, object]
) -> None:
    assert merge_layers(lower, upper) == expected


def test_resolve_precedence_preset_then_config_then_flags(tmp_path: Path) -> None:
    run_file = write(
        tmp_path / "run.toml", 'preset = "pair"\nthreshold = 0.4\naligned = "c-aligned"\n'
    )
    only_preset = resolve_run({"preset": "pair"}, None, PRESETS)
    assert (only_preset.base, only_preset.aligned) == ("p-base", "p-aligned")
    assert (only_preset.settings.select, only_preset.settings.threshold) == ("threshold", 0.3)
    assert only_preset.preset == "pair"

    with_config = resolve_run({}, run_file, PRESETS)
    assert (with_config.base, with_config.aligned) == ("p-base", "c-aligned")
    assert with_config.settings.threshold == 0.4

    with_flags = resolve_run(
        {"threshold": 0.2, "base": "f-base", "select": None}, run_file, PRESETS
    )
    assert (with_flags.base, with_flags.aligned) == ("f-base", "c-aligned")
    assert (with_flags.settings.select, with_flags.settings.threshold) == ("threshold", 0.2)


def test_flag_preset_replaces_the_config_files_preset(tmp_path: Path) -> None:
    run_file = write(tmp_path / "run.toml", 'preset = "pair"\n')
    run = resolve_run({"preset": "sub"}, run_file, PRESETS)
    assert (run.base, run.preset) == ("s-base", "sub")
    assert (run.settings.projection, run.settings.rank) == ("subspace", 4)
    overridden = resolve_run({"preset": "sub", "energy": 0.8}, run_file, PRESETS)
    assert (overridden.settings.rank, overridden.settings.energy) == (None, 0.8)


def test_unset_options_take_the_settings_defaults() -> None:
    run = resolve_run({"base": "b", "aligned": "a"}, None, {})
    assert run.settings == Settings()
    assert (run.revision, run.preset) == (None, None)


def test_revision_and_adapter_name_come_through(tmp_path: Path) -> None:
    run_file = write(tmp_path / "run.toml", 'revision = "v1"\nadapter-name = "x"\n')
    run = resolve_run({"base": "b", "aligned": "a"}, run_file, {})
    assert (run.revision, run.settings.adapter_name) == ("v1", "x")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({}, "no --base and no --aligned given"),
        ({"base": "b"}, "no --aligned given"),
        ({"preset": "nope"}, "--preset 'nope': no such preset"),
        ({"base": "b", "aligned": "a", "colour": "red"}, "options: unknown key 'colour'"),
    ],
    ids=["nothing", "no-aligned", "unknown-preset", "unknown-option"],
)
def test_resolve_errors_are_usage_errors(flags: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        resolve_run(flags, None, PRESETS)
    assert caught.value.exit_code == ExitCode.USAGE


def test_unknown_preset_named_in_a_run_file_names_the_file(tmp_path: Path) -> None:
    run_file = write(tmp_path / "run.toml", 'preset = "nope"\n')
    with pytest.raises(UsageError, match=f"--config {run_file}: preset 'nope': no such preset"):
        resolve_run({}, run_file, PRESETS)


# --- through the CLI -----------------------------------------------------------------------------


@pytest.fixture
def local_preset(trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A preset "local" for the trio's folders, threshold mode T = 0.5, via SAFELORA_PRESET_PATH."""
    folder = tmp_path / "presets"
    write(
        folder / "local.toml",
        f'description = "the synthetic trio"\nbase = "{trio.base}"\naligned = "{trio.aligned}"\n'
        'select = "threshold"\nthreshold = 0.5\n',
    )
    monkeypatch.setenv(PRESET_PATH_ENV, str(folder))
    return "local"


def score_json(cli: Cli, *args: str) -> dict[str, Any]:
    result = cli(["score", *args, "--json", "-q"])
    assert result.exit_code == ExitCode.OK, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_presets_command_lists_table_on_stderr(cli: Cli) -> None:
    result = cli(["presets"])
    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stdout == ""
    for name, (base, aligned) in REQUIRED_PAIRS.items():
        assert name in result.stderr
        assert base in result.stderr
        assert aligned in result.stderr
    assert "number, K=10" in result.stderr


def test_presets_command_json(cli: Cli, local_preset: str, trio: Trio) -> None:
    result = cli(["presets", "--json"])
    assert result.exit_code == ExitCode.OK, result.stderr
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    assert REQUIRED_PAIRS.keys() <= listed.keys()
    assert listed["llama-2-7b-chat"]["settings"] == {"select": "number", "num_layers": 10}
    assert listed[local_preset]["base"] == str(trio.base)
    assert listed[local_preset]["settings"] == {"select": "threshold", "threshold": 0.5}
    assert set(listed[local_preset]) == {
        "name", "base", "aligned", "description", "settings", "source"
    }  # fmt: skip


def test_preset_fills_base_aligned_and_selection(trio: Trio, cli: Cli, local_preset: str) -> None:
    report = score_json(cli, str(trio.adapter), "--preset", local_preset)
    explicit = score_json(
        cli, str(trio.adapter), "--base", str(trio.base), "--aligned", str(trio.aligned),
        "--select", "threshold", "--threshold", "0.5",
    )  # fmt: skip
    assert report["inputs"] == explicit["inputs"]
    assert report["settings"] == explicit["settings"]
    assert report["modules"] == explicit["modules"]


def test_patch_with_preset_equals_explicit_flags(
    trio: Trio, cli: Cli, local_preset: str, tmp_path: Path
) -> None:
    by_preset, by_flags = tmp_path / "preset", tmp_path / "flags"
    result = cli(["patch", str(trio.adapter), "--preset", local_preset, "-o", str(by_preset), "-q"])
    assert result.exit_code == ExitCode.OK, result.stderr
    result = cli(trio.patch_args(by_flags, "--select", "threshold", "--threshold", "0.5", "-q"))
    assert result.exit_code == ExitCode.OK, result.stderr
    name = WEIGHTS
    assert (by_preset / name).read_bytes() == (by_flags / name).read_bytes()


def test_cli_precedence_preset_config_flags(
    trio: Trio, cli: Cli, local_preset: str, tmp_path: Path
) -> None:
    run_file = write(tmp_path / "run.toml", f'preset = "{local_preset}"\nthreshold = 0.7\n')
    adapter = str(trio.adapter)
    assert score_json(cli, adapter, "--preset", local_preset)["settings"]["threshold"] == 0.5
    assert score_json(cli, adapter, "--config", str(run_file))["settings"]["threshold"] == 0.7
    flagged = score_json(cli, adapter, "--config", str(run_file), "--threshold", "0.2")
    assert flagged["settings"]["threshold"] == 0.2
    number = score_json(cli, adapter, "--config", str(run_file), "--select", "number", "-k", "3")
    assert number["settings"]["select"] == "number"
    assert number["summary"]["threshold_used"] < 0.7


def test_cli_flags_override_a_builtin_presets_models(trio: Trio, cli: Cli) -> None:
    report = score_json(
        cli, str(trio.adapter), "--preset", "llama-2-7b-chat", "-k", "4",
        "--base", str(trio.base), "--aligned", str(trio.aligned),
    )  # fmt: skip
    assert report["inputs"]["base"]["path"] == str(trio.base)
    assert report["settings"]["num_layers"] == 4


@pytest.mark.parametrize("command", ["patch", "score"])
@pytest.mark.parametrize(
    ("args", "run_file", "message"),
    [
        (["--preset", "nope"], None, "--preset 'nope': no such preset"),
        (["--config", "RUN"], "colour = 'red'\n", "unknown key 'colour'"),
        (["--config", "RUN"], "select = \n", "not valid TOML"),
        (["--config", "MISSING"], None, "no such file"),
        (["--aligned", "ALIGNED"], None, "no --base given"),
        ([], None, "no --base and no --aligned given"),
    ],
    ids=["unknown-preset", "unknown-key", "bad-toml", "missing-file", "no-base", "no-models"],
)
def test_cli_config_errors_are_usage_errors_on_one_line(
    trio: Trio,
    cli: Cli,
    tmp_path: Path,
    command: str,
    args: list[str],
    run_file: str | None,
    message: str,
) -> None:
    path = write(tmp_path / "run.toml", run_file) if run_file else tmp_path / "missing.toml"
    swap = {"RUN": str(path), "MISSING": str(path), "ALIGNED": str(trio.aligned)}
    args = [swap.get(a, a) for a in args]
    out = tmp_path / "out"
    extra = ["-o", str(out)] if command == "patch" else []
    result = cli([command, str(trio.adapter), *args, *extra])
    expect_error(result, ExitCode.USAGE, message, "(hint: ", output=out)


def test_cli_bad_preset_path_is_a_usage_error(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PRESET_PATH_ENV, str(tmp_path / "nowhere"))
    for args in (["presets"], ["score", str(trio.adapter), "--preset", "x"]):
        result = cli(args)
        assert result.exit_code == ExitCode.USAGE
        assert f"{PRESET_PATH_ENV}:" in result.stderr

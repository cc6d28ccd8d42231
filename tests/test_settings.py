"""Settings: defaults, validation, and the one options model the CLI and run files derive from."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from safelora_cli.errors import ExitCode, UsageError
from safelora_cli.inputs import config
from safelora_cli.inputs.config import resolve_run
from safelora_cli.settings import OPTIONS, SETTING_OPTIONS, Projection, Select, Settings
from tests.helpers import invoke

NUMBER, THRESHOLD = Select.NUMBER, Select.THRESHOLD


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        pytest.param({"num_layers": 0}, "--num-layers", id="k-zero"),
        pytest.param({"num_layers": -3}, "--num-layers", id="k-negative"),
        pytest.param({"select": THRESHOLD, "threshold": 1.0001}, "--threshold", id="t-above-one"),
        pytest.param({"select": THRESHOLD, "threshold": -1.5}, "--threshold", id="t-below-minus-1"),
        pytest.param({"select": THRESHOLD, "threshold": math.nan}, "--threshold", id="t-nan"),
        pytest.param({"select": "topk"}, "--select", id="unknown-mode"),
        pytest.param({"projection": "pca"}, "--projection", id="unknown-projection"),
        pytest.param({"rank": 4}, "--rank", id="rank-with-paper"),
        pytest.param({"projection": "subspace"}, "--rank", id="subspace-without-k"),
        pytest.param({"projection": "subspace", "rank": 2, "energy": 0.5}, "--rank", id="both"),
        pytest.param({"projection": "subspace", "rank": 0}, "--rank", id="rank-zero"),
        pytest.param({"projection": "subspace", "energy": 1.5}, "--energy", id="energy-above-1"),
        pytest.param({"projection": "subspace", "energy": 0.0}, "--energy", id="energy-zero"),
        pytest.param({"projection": "subspace", "energy": -0.0}, "--energy", id="energy-minus-0"),
        pytest.param({"projection": "subspace", "energy": math.nan}, "--energy", id="energy-nan"),
        # an unused cut out of range is a mistake too, never silently ignored
        pytest.param({"threshold": 5.0}, "--threshold", id="t-out-of-range-in-number-mode"),
        pytest.param({"select": THRESHOLD, "num_layers": 0}, "--num-layers", id="k-zero-unused"),
    ],
)
def test_invalid_settings_are_usage_errors(changes: dict[str, Any], flag: str) -> None:
    with pytest.raises(UsageError) as caught:
        Settings(**changes)
    assert caught.value.exit_code == ExitCode.USAGE
    assert flag in caught.value.message


def test_unknown_choice_lists_the_choices() -> None:
    with pytest.raises(UsageError, match="'number', 'threshold'"):
        Settings(select="lowest")


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"num_layers": 1, "threshold": 1.0}, id="k-one"),
        pytest.param({"select": "threshold", "threshold": -1.0, "num_layers": 1}, id="t-minus-1"),
        pytest.param({"select": "threshold", "threshold": 1.0}, id="t-one"),
        pytest.param({"projection": "subspace", "energy": 1.0}, id="energy-one"),
    ],
)
def test_bounds_are_accepted(changes: dict[str, Any]) -> None:
    settings = Settings(**changes)
    assert settings.select in (NUMBER, THRESHOLD)  # strings became the enum


def test_k_is_checked_against_the_adapter() -> None:
    Settings(num_layers=4).check_modules(4)
    Settings(select="threshold", num_layers=99).check_modules(4)  # K unused in threshold mode
    with pytest.raises(UsageError, match=r"outside 1\.\.4"):
        Settings(num_layers=5).check_modules(4)


def test_describe_nulls_the_unused_cut_and_names_the_device() -> None:
    number = Settings(num_layers=3).describe("cpu")
    assert (number["select"], number["num_layers"], number["threshold"]) == ("number", 3, None)
    threshold = Settings(select="threshold", threshold=0.3).describe("cuda:0")
    assert (threshold["num_layers"], threshold["threshold"]) == (None, 0.3)
    assert threshold["device"] == "cuda:0"
    assert set(number) == {option.key for option in SETTING_OPTIONS}


@pytest.mark.parametrize("command", ["patch", "score"])
def test_every_option_is_a_flag_of_patch_and_score(command: str) -> None:
    text = invoke([command, "--help"], env={"COLUMNS": "200"}).stdout
    for option in OPTIONS:
        assert option.flag in text, option.key
    assert "--config" in text
    assert "[number|threshold]" in text.replace("<", "[").replace(">", "]")


def test_every_option_is_a_run_file_key() -> None:
    assert {option.key for option in OPTIONS} == set(config.RUN_KEYS)


# one value per setting that differs from its default
NON_DEFAULT = {
    "select": ("threshold", "threshold"),
    "num_layers": ("3", 3),
    "threshold": ("0.25", 0.25),
    "projection": ("subspace", "subspace"),
    "rank": ("5", 5),
    "energy": (None, None),  # excludes --rank
    "device": ("cpu", "cpu"),
    "adapter_name": ("other", "other"),
    "targets": ("q_proj", ["q_proj"]),
}


def test_flags_and_run_files_give_the_same_settings(tmp_path: Path) -> None:
    """Each setting given as a flag (through typer) or as a run-file key gives one Settings."""
    given = {key: v for key, v in NON_DEFAULT.items() if v[0] is not None}
    assert set(NON_DEFAULT) == {option.key for option in SETTING_OPTIONS}
    lines = [f"{key} = {value!r}".replace("'", '"') for key, (_, value) in given.items()]
    run_file = tmp_path / "run.toml"
    run_file.write_text("\n".join(['base = "b"', 'aligned = "a"', *lines]) + "\n")
    from_file = resolve_run({}, run_file, {}).settings

    captured: list[Settings] = []

    def fake_score_many(
        adapters: Any, base: Any, aligned: Any, settings: Settings, *a: Any, **kw: Any
    ) -> Any:
        captured.append(settings)
        raise UsageError("stop here")

    flags = [
        part for key, (text, _) in given.items() for part in ("--" + key.replace("_", "-"), text)
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("safelora_cli.api.score_many", fake_score_many)
        result = invoke(["score", "x", "--base", "b", "--aligned", "a", *flags])
    assert result.exit_code == ExitCode.USAGE
    assert captured == [from_file]
    assert (from_file.projection, from_file.rank) == (Projection.SUBSPACE, 5)
    assert from_file != Settings(projection="subspace", rank=5)  # every value took effect

"""Hostile folders: downloaded adapters and models are untrusted input. Nothing from them leaks
into an output, hangs a run, or reaches the terminal raw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from safelora_cli.errors import ExitCode, FilesystemError
from safelora_cli.inputs.adapter import CONFIG_NAME, WEIGHTS_NAME
from safelora_cli.inputs.pairing import MODEL_CONFIG
from safelora_cli.inputs.resolve import ResolvedInput
from safelora_cli.inputs.smallfiles import MAX_DEPTH
from safelora_cli.notices import NOTE, Notice, Notices
from safelora_cli.output.report import REPORT_NAME
from safelora_cli.output.writer import STAGE_PREFIX, OutputFolder
from tests.conftest import Trio, TrioFactory
from tests.helpers import assert_error, invoke

PREFIX = "base_model.model."
SECRET = b"hf_secret_token_do_not_publish"


def patch_args(trio: Trio, output: Path, *extra: str) -> list[str]:
    return trio.patch_args(output, "--num-layers", "3", *extra)


def no_staging(folder: Path) -> bool:
    return not any(p.name.startswith(STAGE_PREFIX) for p in folder.iterdir())


# --- files that lead outside the adapter folder ----------------------------------------------


def test_sidecar_linking_outside_is_not_copied_and_warned(trio: Trio, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_bytes(SECRET)
    (trio.adapter / "notes.txt").symlink_to(secret)
    (trio.adapter / "README.md").symlink_to(secret)
    (trio.adapter / "docs").mkdir()
    (trio.adapter / "docs" / "card.md").write_text("inside")
    (trio.adapter / "CARD.md").symlink_to(trio.adapter / "docs" / "card.md")  # stays inside
    out = tmp_path / "out"
    result = invoke(patch_args(trio, out, "--quiet"))
    assert result.exit_code == 0, result.stderr
    assert not (out / "notes.txt").exists()
    assert (out / "CARD.md").read_text() == "inside"
    assert all(SECRET not in p.read_bytes() for p in out.iterdir() if p.is_file())
    assert "notes.txt: not copied" in result.stderr
    assert "README.md leads outside its folder" in result.stderr
    assert (out / "README.md").read_text().startswith("---\n")  # a card of our own instead
    report = json.loads((out / REPORT_NAME).read_text())
    assert sorted(w["code"] for w in report["warnings"]) == ["file-outside-input", "model-card"]


def test_hub_snapshot_links_into_its_repository_are_copied(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--lora"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "1234").write_text("card from the hub")
    (snapshot / "README.md").symlink_to(Path("../../blobs/1234"))
    (tmp_path / "elsewhere").write_bytes(SECRET)
    (snapshot / "stolen.txt").symlink_to(tmp_path / "elsewhere")
    resolved = ResolvedInput("org/lora", snapshot, hub_id="org/lora")
    assert resolved.trusted_root == repo.resolve()
    notices = Notices()
    with OutputFolder(tmp_path / "out") as out:
        out.copy_files(snapshot, resolved.trusted_root, notices)
    assert (tmp_path / "out" / "README.md").read_text() == "card from the hub"
    assert not (tmp_path / "out" / "stolen.txt").exists()
    assert [n.code for n in notices.items] == ["file-outside-input"]


def test_unreadable_sidecar_is_an_input_error(
    trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (trio.adapter / "tokenizer.json").write_text("{}")
    real_open = Path.open

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        if self.name == "tokenizer.json" and self.parent == trio.adapter:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", refuse)
    out = tmp_path / "out"
    result = invoke(patch_args(trio, out, "--quiet"))
    assert_error(result, ExitCode.CORRUPT, str(trio.adapter / "tokenizer.json"), "cannot read")
    assert not out.exists()
    assert no_staging(tmp_path)


# --- names that would drive the terminal -------------------------------------------------------

HOSTILE = "model.layers.0.self_attn.q_proj[/x][red]\x1b]0;owned\x07\x9b2J"


def _rename_module(trio: Trio, old: str, new: str) -> None:
    for folder in (trio.base, trio.aligned):
        path = folder / "model.safetensors"
        tensors = load_file(path)
        tensors[f"{new}.weight"] = tensors.pop(f"{old}.weight")
        save_file(tensors, path)
    path = trio.adapter / WEIGHTS_NAME
    tensors = load_file(path)
    for kind in ("lora_A", "lora_B"):
        tensors[f"{PREFIX}{new}.{kind}.weight"] = tensors.pop(f"{PREFIX}{old}.{kind}.weight")
    save_file(tensors, path)


def test_hostile_tensor_names_never_reach_the_terminal_raw(trio: Trio, tmp_path: Path) -> None:
    _rename_module(trio, "model.layers.0.self_attn.q_proj", HOSTILE)
    out = tmp_path / "out"
    result = invoke(patch_args(trio, out, "--num-layers", "14"))  # every module in the table
    assert result.exit_code == 0, result.stderr
    for raw in ("\x1b", "\x07", "\x9b"):
        assert raw not in result.stderr
        assert raw not in result.stdout
    assert "\\x1b]0;owned\\x07\\x9b2J" in result.stderr
    assert "[/x][red]" in result.stderr  # markup shown as written, not interpreted
    report = json.loads((out / REPORT_NAME).read_text())
    assert HOSTILE in {m["module"] for m in report["modules"]}  # the report keeps the real name
    shown = invoke(["inspect", str(trio.adapter)])
    assert shown.exit_code == 0, shown.stderr
    assert "\x1b" not in shown.stderr
    assert "\\x1b]0;owned" in shown.stderr


def test_unprintable_paths_do_not_fail_a_finished_run(trio: Trio, tmp_path: Path) -> None:
    out = tmp_path / "sortie-é-[bold]"
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C"}
    done = subprocess.run(
        [sys.executable, "-m", "safelora_cli", *patch_args(trio, out)],
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (out / WEIGHTS_NAME).is_file()
    assert done.stdout == os.fsencode(str(out)) + b"\n"  # the real path, for scripts


def test_error_lines_escape_newlines_and_shorten_long_names(trio: Trio, tmp_path: Path) -> None:
    result = invoke(patch_args(trio, trio.adapter / "x\nINJECTED"))
    line = assert_error(result, ExitCode.FILESYSTEM, "x\\x0aINJECTED")
    assert "\n" not in line
    long_ref = str(tmp_path / ("d" * 200) / "base")
    result = invoke(
        ["score", str(trio.adapter), "--base", long_ref, "--aligned", str(trio.aligned)]
    )
    line = assert_error(result, ExitCode.USAGE, "chars)")
    assert len(line) < len(long_ref) + 100


def test_name_too_long_for_the_file_system_is_a_usage_error(trio: Trio, tmp_path: Path) -> None:
    out = tmp_path / ("o" * 300)
    assert_error(invoke(patch_args(trio, out)), ExitCode.USAGE, "--output", "too long")
    assert no_staging(tmp_path)
    base = tmp_path / ("b" * 300)
    result = invoke(
        ["score", str(trio.adapter), "--base", str(base), "--aligned", str(trio.aligned)]
    )
    assert_error(result, ExitCode.USAGE, "--base")


# --- JSON and TOML inputs: one checked reader ---------------------------------------------------


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def _deep(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def _deep_object(path: Path) -> None:
    value: object = 1
    for _ in range(MAX_DEPTH + 1):
        value = {"a": value}
    path.write_text(json.dumps({"model_type": "llama", "x": value}))


def _garbage(path: Path) -> None:
    path.write_bytes(b"\xff\xfe not json")


@pytest.mark.parametrize(
    "damage", [_fifo, _dev_zero, _deep, _deep_object, _garbage], ids=lambda f: f.__name__[1:]
)
@pytest.mark.parametrize("which", ["model-config", "adapter-config", "run-file"])
def test_json_and_toml_inputs_are_read_with_checks(
    trio: Trio, tmp_path: Path, damage: object, which: str
) -> None:
    """A FIFO or device never hangs the run; deep nesting and garbage are clean errors."""
    run_file = tmp_path / "run.toml"
    run_file.write_text('select = "number"\n')
    target = {
        "model-config": trio.base / MODEL_CONFIG,
        "adapter-config": trio.adapter / CONFIG_NAME,
        "run-file": run_file,
    }[which]
    assert callable(damage)
    damage(target)
    args = [sys.executable, "-m", "safelora_cli", "score", str(trio.adapter), "--base",
            str(trio.base), "--aligned", str(trio.aligned), "--config", str(run_file)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    assert str(target) in lines[0]
    expected = {ExitCode.CORRUPT, ExitCode.INCOMPATIBLE, ExitCode.USAGE}
    if damage in (_fifo, _dev_zero):  # the file itself cannot be used: 3 for every file
        expected = {ExitCode.CORRUPT}
    assert done.returncode in expected, done.stderr


# --- patterns from the input are matched in bounded time ----------------------------------------


def test_catastrophic_rank_pattern_is_refused_not_a_hang(trio: Trio) -> None:
    config = json.loads((trio.adapter / CONFIG_NAME).read_text())
    config["rank_pattern"] = {"(.*)*z": 4}
    (trio.adapter / CONFIG_NAME).write_text(json.dumps(config))
    result = invoke(["inspect", str(trio.adapter)])
    assert_error(result, ExitCode.INCOMPATIBLE, "(.*)*z", "catastrophic backtracking")


def test_overlong_pattern_is_refused(trio: Trio) -> None:
    config = json.loads((trio.adapter / CONFIG_NAME).read_text())
    config["alpha_pattern"] = {"q" * 5000: 4}
    (trio.adapter / CONFIG_NAME).write_text(json.dumps(config))
    assert_error(invoke(["inspect", str(trio.adapter)]), ExitCode.INCOMPATIBLE, "longer than")


# --- --report -----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["output", "inside-output"])
def test_report_in_the_output_folder_is_refused(trio: Trio, tmp_path: Path, where: str) -> None:
    out = tmp_path / "out"
    report = out if where == "output" else out / "sub" / "r.json"
    result = invoke(patch_args(trio, out, "--report", str(report)))
    assert_error(result, ExitCode.USAGE, "--report", "inside the output")
    assert not out.exists()


def test_existing_report_needs_force(trio: Trio, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    report.write_text("keep me")
    out = tmp_path / "out"
    assert_error(invoke(patch_args(trio, out, "--report", str(report))), ExitCode.FILESYSTEM)
    assert report.read_text() == "keep me"
    assert not out.exists()
    result = invoke(patch_args(trio, out, "--report", str(report), "--force"))
    assert result.exit_code == 0, result.stderr
    assert json.loads(report.read_text())["output"] == str(out)


def test_report_is_never_published_without_its_output(
    trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = tmp_path / "r.json"
    out = tmp_path / "out"

    def refuse(self: OutputFolder) -> None:
        raise FilesystemError("--output: publishing refused for the test")

    monkeypatch.setattr(OutputFolder, "_publish", refuse)
    result = invoke(patch_args(trio, out, "--report", str(report)))
    assert_error(result, ExitCode.FILESYSTEM, "publishing refused")
    assert not report.exists()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.json")] == []


# --- batches: all or none ------------------------------------------------------------------------


def test_batch_writing_failure_publishes_nothing(
    make_trio: TrioFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trio = make_trio()
    second = tmp_path / "second"
    second.mkdir()
    for src in trio.adapter.iterdir():
        (second / src.name).write_bytes(src.read_bytes())
    (second / "tokenizer.json").write_text("{}")
    real_open = Path.open

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        if self == second / "tokenizer.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", refuse)
    out = tmp_path / "out"
    args = ["patch", str(trio.adapter), str(second), "--base", str(trio.base),
            "--aligned", str(trio.aligned), "--output", str(out), "--num-layers", "3"]  # fmt: skip
    assert_error(invoke(args), ExitCode.CORRUPT, "tokenizer.json")
    assert not out.exists()  # the first adapter, written fine, was not published either
    assert no_staging(tmp_path)


def test_batch_publish_race_says_what_was_published(tmp_path: Path) -> None:
    from safelora_cli.runs.execute import publish_all

    folders = [OutputFolder(tmp_path / name) for name in ("a", "b", "c")]
    for folder in folders:
        folder.open()
        (folder.path / "w").write_text(folder.target.name)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "theirs").write_text("another run")
    with pytest.raises(FilesystemError) as caught:
        publish_all(folders)
    assert "published a; not published: c" in caught.value.message
    assert (tmp_path / "a" / "w").read_text() == "a"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["theirs"]
    assert not (tmp_path / "c").exists()
    assert no_staging(tmp_path)


# --- REFs ----------------------------------------------------------------------------------------


def test_local_typo_is_not_taken_for_a_hub_id(
    trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(trio.root)  # holds ./base
    result = invoke(["score", str(trio.adapter), "--base", "base/typo", "--aligned", "aligned"])
    assert_error(result, ExitCode.USAGE, "base/typo", "no such folder")


def test_hub_ref_is_noted_before_it_is_looked_up(
    trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    seen: list[Notice] = []
    from safelora_cli import api as pipeline
    from safelora_cli.errors import HubError
    from safelora_cli.settings import Settings

    with pytest.raises(HubError):
        pipeline.score(trio.adapter, "org/base-model", trio.aligned, Settings(), notify=seen.append)
    assert [(n.code, n.level) for n in seen] == [("hub-ref", NOTE)]
    assert "org/base-model" in seen[0].message


def test_dimension_past_any_tensor_is_corrupt(trio: Trio) -> None:
    path = trio.adapter / WEIGHTS_NAME
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[f"{name}.extra"] = {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]}
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])
    assert_error(invoke(["inspect", str(trio.adapter)]), ExitCode.CORRUPT, "past any tensor")


def test_warnings_are_printed_even_when_quiet(trio: Trio, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_bytes(SECRET)
    (trio.adapter / "notes.txt").symlink_to(secret)
    result = invoke(patch_args(trio, tmp_path / "out", "--quiet"))
    assert result.exit_code == 0
    assert result.stderr.startswith("warning: ")
    assert len(result.stderr.splitlines()) == 1


def test_zero_width_and_bom_characters_are_shown_escaped(trio: Trio, tmp_path: Path) -> None:
    """Two names that look the same must not be shown the same: invisible characters (zero-width
    space and joiners, word joiner, BOM) are escaped in tables, the heat map and error lines."""
    lookalike = "model.layers.0.self_attn.q\u200b_proj\u2060\ufeff"
    _rename_module(trio, "model.layers.0.self_attn.q_proj", lookalike)
    out = tmp_path / "out"
    result = invoke(patch_args(trio, out, "--num-layers", "14"))
    assert result.exit_code == 0, result.stderr
    for raw in ("\u200b", "\u2060", "\ufeff"):
        assert raw not in result.stderr
    assert "q\\u200b_proj\\u2060\\ufeff" in result.stderr
    missing = invoke(patch_args(trio, tmp_path / "o\u200but", "--base", str(tmp_path / "n\ufeff")))
    line = assert_error(missing, ExitCode.USAGE, "n\\ufeff")
    assert "\ufeff" not in line

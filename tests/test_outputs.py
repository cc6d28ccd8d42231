"""The output folder and the run around it: folders that must not be written (existing, inside an
input, a file, a symlink, not writable), disk full while writing, inputs changed or removed during
the run, and every error as one line on stderr.

Each case runs ``safelora patch`` in-process on a seeded ``make_trio()`` trio. A refusal leaves
what was there untouched and no staging folder behind; a failure while writing leaves nothing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

from safelora_cli.errors import ExitCode
from safelora_cli.output import writer
from safelora_cli.runs import execute
from safelora_cli.runs.run import Run
from tests.conftest import Trio
from tests.helpers import (
    CONFIG,
    MODEL,
    WEIGHTS,
    Cli,
    edit_tensors,
    expect_error,
    expect_ok,
    snapshot,
    truncate,
    write_lfs_pointer,
)

FILESYSTEM = ExitCode.FILESYSTEM


def run_patch(cli: Cli, trio: Trio, output: Path, *extra: str) -> Any:
    return cli(trio.patch_args(output, "--quiet", *extra))


# --- folders that must not be written ---------------------------------------------------------


def test_non_empty_output_is_refused_untouched_unless_force(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    expect_error(
        run_patch(cli, trio, out), FILESYSTEM, str(out), "not empty", "--force",
        output=out, output_existed=True,
    )  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    expect_ok(run_patch(cli, trio, out, "--force"), out)
    assert (out / "notes.txt").read_text() == "mine"


def test_empty_output_folder_is_used(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    expect_ok(run_patch(cli, trio, out), out)


@pytest.mark.parametrize("inside", ["adapter", "adapter/sub", "base", "aligned/x/y"])
def test_output_inside_an_input_is_refused_and_inputs_untouched(
    trio: Trio, cli: Cli, tmp_path: Path, inside: str
) -> None:
    out = trio.root / inside
    before = {p: p.read_bytes() for p in trio.root.rglob("*") if p.is_file()}
    line = expect_error(
        run_patch(cli, trio, out, "--force"), FILESYSTEM, "--output", "inside the input folder",
        output=out, output_existed=out.exists(),
    )  # fmt: skip
    assert inside.split("/")[0] in line
    assert {p: p.read_bytes() for p in trio.root.rglob("*") if p.is_file()} == before


def test_output_that_is_a_file_is_refused_untouched(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    expect_error(
        run_patch(cli, trio, out, "--force"), FILESYSTEM, str(out), "not a folder",
        output=out, output_existed=True,
    )  # fmt: skip
    assert out.read_text() == "a file"


def test_output_whose_parent_is_missing_is_refused(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "missing" / "out"
    expect_error(
        run_patch(cli, trio, out), FILESYSTEM, "--output", "missing", "does not exist", output=out
    )
    assert not out.parent.exists()


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root writes anywhere: permissions cannot be tested as root",
)
def test_output_in_a_read_only_folder_is_refused(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        out = parent / "out"
        expect_error(run_patch(cli, trio, out), FILESYSTEM, "--output", str(parent), output=out)
    finally:
        parent.chmod(0o700)


def test_staging_folder_that_cannot_be_created_is_refused(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same failure as a read-only parent, as root sees it: creating the staging folder."""

    def refused(self: Path, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), FILESYSTEM, "--output", "Permission denied", output=out)


@pytest.mark.parametrize("where", ["elsewhere", "dangling", "into-input"])
def test_output_that_is_a_symlink_is_refused(
    trio: Trio, cli: Cli, tmp_path: Path, where: str
) -> None:
    target = {
        "elsewhere": tmp_path / "real",
        "dangling": tmp_path / "nowhere",
        "into-input": trio.adapter,
    }[where]
    if where == "elsewhere":
        target.mkdir()
    adapter_before = snapshot(trio.adapter)
    out = tmp_path / "out"
    out.symlink_to(target, target_is_directory=True)
    expect_error(
        run_patch(cli, trio, out, "--force"), FILESYSTEM, str(out), "symlink",
        output=out, output_existed=True,
    )  # fmt: skip
    assert out.is_symlink()
    if where == "elsewhere":
        assert list(target.iterdir()) == []
    assert snapshot(trio.adapter) == adapter_before


def test_report_path_that_is_a_symlink_is_refused(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("keep")
    report = tmp_path / "report.json"
    report.symlink_to(elsewhere)
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out, "--report", str(report)), FILESYSTEM, "--report", output=out
    )
    assert elsewhere.read_text() == "keep"


# --- disk full --------------------------------------------------------------------------------


def _disk_full_in_save_file(stage_files: list[Path]) -> Callable[..., None]:
    """safetensors' save_file on a full disk: a partial file, then its own (non-OSError) error."""

    def save(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        path = Path(filename)
        path.write_bytes(b"partial")
        stage_files.append(path)
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    return save


def test_disk_full_writing_the_weights_leaves_nothing(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial: list[Path] = []
    monkeypatch.setattr(writer, "save_file", _disk_full_in_save_file(partial))
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), FILESYSTEM, str(out), "disk full", output=out)
    assert partial
    assert not any(p.exists() for p in partial)


def test_disk_full_writing_the_report_leaves_nothing(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_dump = json.dump

    def dump(value: Any, fh: Any, **kwargs: Any) -> None:
        real_dump({"partial": True}, fh)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", dump)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), FILESYSTEM, str(out), "disk full", output=out)


def test_disk_full_with_force_keeps_the_existing_files(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / WEIGHTS).write_bytes(b"previous run")
    monkeypatch.setattr(writer, "save_file", _disk_full_in_save_file([]))
    expect_error(
        run_patch(cli, trio, out, "--force"), FILESYSTEM, "disk full", output=out,
        output_existed=True,
    )  # fmt: skip
    assert [p.name for p in out.iterdir()] == [WEIGHTS]
    assert (out / WEIGHTS).read_bytes() == b"previous run"


# --- inputs changed or removed during the run -------------------------------------------------


def _after_prepare(monkeypatch: pytest.MonkeyPatch, change: Callable[[], None]) -> None:
    """Run ``change`` once the headers are validated, before any tensor data is read."""
    real = execute.prepare

    def prepare(*args: Any, **kwargs: Any) -> Run:
        job = real(*args, **kwargs)
        change()
        return job

    monkeypatch.setattr(execute, "prepare", prepare)


def _replace_with_other_shapes(path: Path) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            tensors[key] = torch.randn(3, 5)

    edit_tensors(path, edit)


@pytest.mark.parametrize(
    ("change", "phrases"),
    [
        pytest.param(
            lambda t: shutil.rmtree(t.aligned), ("aligned/model.safetensors", "removed"),
            id="aligned-folder-removed",
        ),
        pytest.param(
            lambda t: (t.base / MODEL).unlink(), ("base/model.safetensors", "removed"),
            id="base-file-removed",
        ),
        pytest.param(
            lambda t: truncate(t.base / MODEL), ("base/model.safetensors", "changed"),
            id="base-file-truncated",
        ),
        pytest.param(
            lambda t: _replace_with_other_shapes(t.aligned / MODEL),
            ("aligned/model.safetensors", "changed"), id="aligned-file-replaced",
        ),
        pytest.param(
            lambda t: (t.adapter / WEIGHTS).unlink(), ("adapter/adapter_model.safetensors",),
            id="adapter-weights-removed",
        ),
        pytest.param(
            lambda t: _replace_with_other_shapes(t.adapter / WEIGHTS),
            ("adapter/adapter_model.safetensors", "changed"), id="adapter-weights-replaced",
        ),
        pytest.param(
            lambda t: (t.adapter / CONFIG).unlink(), ("adapter_config.json", "removed"),
            id="adapter-config-removed",
        ),
    ],
)  # fmt: skip
def test_input_changed_during_the_run_is_a_clean_error(
    trio: Trio,
    cli: Cli,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[Trio], None],
    phrases: tuple[str, ...],
) -> None:
    _after_prepare(monkeypatch, lambda: change(trio))
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), ExitCode.CORRUPT, *phrases, output=out)


# --- one line per error -----------------------------------------------------------------------


def test_errors_are_one_line_without_quiet(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    """The progress display must not add lines to an error (CI logs read stderr)."""
    write_lfs_pointer(trio.base / MODEL)
    out = tmp_path / "out"
    expect_error(cli(trio.patch_args(out)), ExitCode.CORRUPT, "git lfs pull", output=out)


def test_debug_env_adds_the_traceback(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAFELORA_DEBUG", "1")
    write_lfs_pointer(trio.base / MODEL)
    out = tmp_path / "out"
    result = run_patch(cli, trio, out)
    assert result.exit_code == ExitCode.CORRUPT
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: ")
    assert not out.exists()

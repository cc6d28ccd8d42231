"""Publishing an output is atomic against other runs writing to the same folder.

Without --force, a target that appeared (non-empty) during the run is exit 6 and nothing of it is
touched; with --force, the folder holds one run's files, never a mix of two runs'.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from safelora_cli.errors import ExitCode, FilesystemError
from safelora_cli.output import writer
from safelora_cli.output.staging import OLD_NAME
from safelora_cli.output.writer import STAGE_PREFIX, OutputFolder, write_json
from tests.conftest import Trio
from tests.helpers import REPORT, WORK_PREFIX, Cli, expect_ok, leftovers, snapshot, start_patch


def test_working_folders_share_the_prefix_the_tests_look_for(tmp_path: Path) -> None:
    assert STAGE_PREFIX.startswith(WORK_PREFIX)
    assert OutputFolder(tmp_path / "out").path.parent.name.startswith(WORK_PREFIX)


def test_target_appearing_during_the_run_is_refused_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "out"
    late = OutputFolder(target).__enter__()
    (late.path / "weights").write_bytes(b"late run")
    with OutputFolder(target) as early:  # started after, finishes first
        (early.path / "weights").write_bytes(b"early run")
    with pytest.raises(FilesystemError, match="appeared during the run") as caught:
        late.__exit__(None, None, None)
    assert caught.value.exit_code == ExitCode.FILESYSTEM
    assert snapshot(target) == {"weights": b"early run"}
    assert leftovers(tmp_path) == []


def test_force_swaps_the_whole_folder_and_carries_other_files(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with OutputFolder(target) as first:
        (first.path / "README.md").write_bytes(b"first run's card")
        (first.path / "weights").write_bytes(b"first")
        first.write_report({"run": 1})
    (target / "notes.txt").write_bytes(b"the user's own file")
    assert "README.md" in (target / REPORT).read_text()  # the report lists its files

    with OutputFolder(target, force=True) as second:
        (second.path / "weights").write_bytes(b"second")
        second.write_report({"run": 2})
    got = snapshot(target)
    # the first run's README is its own file: gone; the user's file is kept
    assert set(got) == {"weights", REPORT, "notes.txt"}
    assert got["weights"] == b"second"
    assert got["notes.txt"] == b"the user's own file"
    assert leftovers(tmp_path) == []


def test_force_onto_a_folder_without_a_report_replaces_only_same_names(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "weights").write_bytes(b"old")
    (target / "keep.txt").write_bytes(b"mine")
    with OutputFolder(target, force=True) as out:
        (out.path / "weights").write_bytes(b"new")
    assert snapshot(target) == {"keep.txt": b"mine", "weights": b"new"}


def test_failed_force_swap_puts_the_user_files_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_bytes(b"mine")
    (target / "weights").write_bytes(b"old")
    real_rename = os.rename

    def fail_on_the_swap(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == OLD_NAME and Path(dst).parent.name.startswith(STAGE_PREFIX):
            raise OSError(5, "Input/output error", str(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_on_the_swap)
    with pytest.raises(FilesystemError, match="Input/output error"):  # noqa: SIM117
        with OutputFolder(target, force=True) as out:
            (out.path / "weights").write_bytes(b"new")
    assert snapshot(target) == {"keep.txt": b"mine", "weights": b"old"}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [False, True], ids=["new-folder", "force-over-old"])
def test_every_file_is_on_disk_before_the_output_is_published(
    trio: Trio, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    """A crash right after the rename must not publish empty or partial files: every file of the
    staging folder is fsynced before the folder is renamed into place."""
    (trio.adapter / "README.md").write_text("card")  # a copied file, not only written ones
    out = tmp_path / "out"
    if force:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    synced: set[int] = set()
    unsynced_at_publish: list[list[str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def rename(src: str | Path, dst: str | Path) -> None:
        source = Path(src)
        if source.parent.name.startswith(STAGE_PREFIX) and Path(dst) == out:
            unsynced_at_publish.append(
                [p.name for p in source.iterdir() if p.stat().st_ino not in synced]
            )
        real_rename(src, dst)

    monkeypatch.setattr(writer.os, "fsync", fsync)
    monkeypatch.setattr(writer.os, "rename", rename)
    report = expect_ok(cli(trio.patch_args(out, "--quiet", *(["--force"] if force else []))), out)
    [unsynced] = unsynced_at_publish  # published once...
    assert {"README.md", REPORT} <= set(report["files"])
    assert set(unsynced).isdisjoint(report["files"])  # ...with every file it wrote synced
    assert set(unsynced) == ({"notes.txt"} if force else set())  # the user's, carried over


def test_report_written_alone_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


RUNS = 4


def _adapters(trio: Trio, tmp_path: Path) -> list[Path]:
    """RUNS copies of the adapter, each with its own README (to tell the runs' files apart)."""
    copies = []
    for i in range(RUNS):
        copy = tmp_path / f"adapter{i}"
        copy.mkdir()
        for src in trio.adapter.iterdir():
            (copy / src.name).write_bytes(src.read_bytes())
        (copy / "README.md").write_text(f"run {i}\n")
        copies.append(copy)
    return copies


@pytest.mark.slow
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_runs_started_together_never_mix(trio: Trio, tmp_path: Path, force: bool) -> None:
    output = tmp_path / "out"
    procs = [
        start_patch(adapter, trio.base, trio.aligned, output, *(["--force"] if force else []))
        for adapter in _adapters(trio, tmp_path)
    ]
    codes = [proc.wait(timeout=300) for proc in procs]
    errors = [proc.stderr.read() if proc.stderr else "" for proc in procs]
    if force:
        assert codes == [ExitCode.OK] * RUNS, errors
    else:
        assert codes.count(ExitCode.OK) == 1, (codes, errors)
        assert sorted(codes) == [ExitCode.OK] + [ExitCode.FILESYSTEM] * (RUNS - 1), errors
    winner = int((output / "README.md").read_text().rsplit("run ", 1)[1].split()[0])
    # the report and the card come from the same run
    report = json.loads((output / REPORT).read_text())
    assert report["inputs"]["adapter"]["path"] == f"adapter{winner}"
    assert sorted(p.name for p in output.iterdir()) == report["files"]
    if not force:
        assert codes[winner] == ExitCode.OK
    assert leftovers(tmp_path) == []

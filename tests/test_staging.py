"""Interrupted runs' staging is reclaimed; a live run's, another host's and user files are not.

Runs are killed with SIGKILL in a subprocess (``python -c``, as ``tests/test_signals.py`` drives
``python -m safelora_cli``), at chosen points: the script wraps a library function so that the
process kills itself right there (after the staging began, while shards are written, right before
publishing, while a profile or a page is written); no hook in the product code. The next run into
the same folder removes exactly the dead staging, and says so with the space freed; ``safelora
clean`` lists and removes it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from safelora_cli.errors import ExitCode
from safelora_cli.notices import Notices
from safelora_cli.output import staging
from safelora_cli.output.reclaim import (
    DEAD,
    INTERRUPTED_PUBLISH,
    LIVE,
    OTHER_HOST,
    STALE_AFTER_DAYS,
    UNKNOWN,
    disk_usage,
    human_size,
    survey,
)
from safelora_cli.output.staging import (
    OWNER_NAME,
    STAGE_PREFIX,
    Owner,
    Staging,
    this_boot,
    this_host,
)
from safelora_cli.synthetic import LlamaShape, PairSpec, all_modules, make_adapter, make_pair
from tests.helpers import invoke, leftovers

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and flock")
TIMEOUT = 300
# Runs the CLI with one library function wrapped so that the process SIGKILLs itself: the
# function's name is argv[1] (``module:Class.method`` or ``module:function``); "after" kills
# once it has returned, "before" instead of calling it.
KILLER = textwrap.dedent(
    """
    import importlib, os, signal, sys
    where, when = sys.argv[1], sys.argv[2]
    module_name, _, attr = where.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    def killed(*args, **kwargs):
        if when == "after":
            real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(owner, name, killed)
    sys.argv = ["safelora", *sys.argv[3:]]
    from safelora_cli.cli import main
    main()
    """
)
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from safelora_cli.output.staging import Staging
    stage = Staging(Path(sys.argv[1]), "output folder")
    stage.create(folder=True)
    (stage.staged / "weights").write_bytes(b"live run")
    print(stage.path, flush=True)
    time.sleep(600)
    """
)
POINTS = {
    "after staging began": ("safelora_cli.output.staging:Staging.create", "after"),
    "while writing shards": ("safelora_cli.output.shards:ShardWriter.replace", "after"),
    "right before publishing": ("safelora_cli.output.writer:OutputFolder._publish", "before"),
}


def killed_run(point: str, when: str, *args: str) -> None:
    """Run ``safelora ARGS`` in a subprocess that SIGKILLs itself at ``point``."""
    env = {**os.environ, "SAFELORA_DEBUG": "0"}
    done = subprocess.run([sys.executable, "-c", KILLER, point, when, *args], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr)


@pytest.fixture
def live_run(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A live run's staging in ``tmp_path/out`` (for its target ``out/busy``): (folder, staging)."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / "busy")],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    staging = Path(proc.stdout.readline().strip())
    try:
        yield out, staging
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("staging")
    base, aligned = make_pair(root, PairSpec(shards=2, seed=7))
    adapter = make_adapter(root / "one", base, aligned, all_modules(LlamaShape()), seed=1)
    second = make_adapter(root / "two", base, aligned, all_modules(LlamaShape()), seed=2)
    return {"base": base, "aligned": aligned, "one": adapter, "two": second}


def _merge_args(models: dict[str, Path], output: Path, *extra: str) -> list[str]:
    return ["patch", str(models["one"]), "--base", str(models["base"]), "--aligned",
            str(models["aligned"]), "-o", str(output), "--merge", *extra]  # fmt: skip


def _user_files(folder: Path) -> None:
    (folder / "notes.txt").write_text("mine")
    (folder / ".safelora-tmp-notes.txt").write_text("a file, not a staging folder")
    (folder / "data").mkdir()
    (folder / "data" / "x").write_text("mine too")


def _notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("note: ")]


@pytest.mark.parametrize("point", list(POINTS))
def test_a_killed_merge_is_reclaimed_by_the_next_run_and_nothing_else(
    models: dict[str, Path], live_run: tuple[Path, Path], point: str
) -> None:
    out, live = live_run
    _user_files(out)
    killed_run(*POINTS[point], *_merge_args(models, out / "merged", "-q"))
    [dead] = [p for p in out.iterdir() if p.name.startswith(f"{STAGE_PREFIX}merged-")]
    assert (dead / OWNER_NAME).is_file()
    size = disk_usage(dead)
    result = invoke(_merge_args(models, out / "merged", "-q"))  # --quiet: the note still shows
    assert result.exit_code == ExitCode.OK, result.stderr
    [note] = _notes(result.stderr)
    assert note.startswith(f"note: removed an interrupted run's staging folder {dead} (")
    assert f"({human_size(size)} freed, pid " in note
    assert not dead.exists()
    assert live.is_dir()  # a live concurrent run's staging survives
    assert (live / "new" / "weights").read_bytes() == b"live run"
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / ".safelora-tmp-notes.txt").is_file()
    assert (out / "data" / "x").read_text() == "mine too"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".safelora-tmp-notes.txt", "data", "merged", "notes.txt", live.name]
    )


def test_a_killed_batch_and_its_report_staging_are_reclaimed(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    batch = ["patch", str(models["one"]), str(models["two"]), "--base", str(models["base"]),
             "--aligned", str(models["aligned"]), "-o", str(out), "-q"]  # fmt: skip
    killed_run(*POINTS["right before publishing"], *batch)
    assert len(leftovers(out)) == 2  # both adapters were staged
    result = invoke(batch)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert len(_notes(result.stderr)) == 2
    assert leftovers(out) == []
    report = tmp_path / "reports" / "r.json"
    report.parent.mkdir()
    single = [*_merge_args(models, tmp_path / "m"), "--report", str(report), "-q"]
    killed_run(*POINTS["right before publishing"], *single)
    assert [p.name.startswith(f"{STAGE_PREFIX}r.json-") for p in report.parent.iterdir()] == [True]
    result = invoke(single)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert len(_notes(result.stderr)) == 2  # the folder's staging and the report's
    assert leftovers(report.parent) == []
    assert leftovers(tmp_path) == []


def test_a_killed_profile_and_html_page_are_reclaimed(
    models: dict[str, Path], tmp_path: Path
) -> None:
    pair = ["--base", str(models["base"]), "--aligned", str(models["aligned"])]
    profile = ["profile", *pair, "--rank", "2", "-o", str(tmp_path / "p.safetensors"), "-q"]
    killed_run("safelora_cli.output.atomic:save_safetensors", "after", *profile)
    [dead] = leftovers(tmp_path)
    assert dead.startswith(f"{STAGE_PREFIX}p.safetensors-")
    result = invoke(profile)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert f"staging folder {tmp_path / dead} (" in _notes(result.stderr)[0]
    assert leftovers(tmp_path) == []
    scored = invoke(["score", str(models["one"]), *pair, "--json"])
    (tmp_path / "r.json").write_text(scored.stdout)
    show = ["show", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")]
    killed_run("safelora_cli.output.atomic:StagedFile.publish", "before", *show)
    [dead] = leftovers(tmp_path)
    assert dead.startswith(f"{STAGE_PREFIX}r.html-")
    result = invoke(show)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert any(f"staging folder {tmp_path / dead} (" in n for n in _notes(result.stderr))
    assert leftovers(tmp_path) == []


def _fake_staging(folder: Path, name: str, owner: Owner | None, age_days: float = 0) -> Path:
    """A staging folder as a run of another host (or an older tool) leaves it."""
    path = folder / f"{STAGE_PREFIX}{name}-0123456789abcdef"
    (path / "new").mkdir(parents=True)
    (path / "new" / "weights").write_bytes(b"x" * 5000)
    if owner is not None:
        (path / OWNER_NAME).write_bytes(owner.encode())
    then = time.time() - age_days * 86400
    os.utime(path, (then, then))
    return path


def test_what_cannot_be_told_is_left_unless_old(tmp_path: Path) -> None:
    now = time.time()
    old = now - (STALE_AFTER_DAYS + 1) * 86400
    elsewhere = _fake_staging(tmp_path, "a", Owner("another-host", 1, now, "output folder", "a"))
    elsewhere_old = _fake_staging(tmp_path, "b", Owner("another-host", 1, old, "report", "b"))
    unknown = _fake_staging(tmp_path, "c", None)
    unknown_old = _fake_staging(tmp_path, "d", None, age_days=STALE_AFTER_DAYS + 1)
    found = {item.path: item for item in survey(tmp_path)}
    assert {p: (f.state, f.removable) for p, f in found.items()} == {
        elsewhere: (OTHER_HOST, False),
        elsewhere_old: (OTHER_HOST, True),
        unknown: (UNKNOWN, False),
        unknown_old: (UNKNOWN, True),
    }
    result = invoke(["clean", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{human_size(found[p].size)}\t{p}" for p in (elsewhere_old, unknown_old)
    ]
    notes = _notes(result.stderr)
    assert len(notes) == 2
    assert "another host" in notes[0]
    assert str(elsewhere) in notes[0]
    assert "cannot be told" in notes[1]
    assert f"{STALE_AFTER_DAYS} days" in notes[1]
    assert sorted(p for p in tmp_path.iterdir()) == [elsewhere, unknown]


def test_killed_while_publishing_is_left_to_the_user(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from safelora_cli.output.staging import PUBLISHING, Staging
        stage = Staging(Path(sys.argv[1]), "output folder")
        stage.create(folder=True)
        os.rename(Path(sys.argv[1]) / "notes.txt", stage.staged / "notes.txt")  # carried over
        stage.mark(PUBLISHING)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(target)], check=False)
    assert done.returncode == -signal.SIGKILL
    [stage] = [tmp_path / name for name in leftovers(tmp_path)]
    [found] = survey(tmp_path, remove=True)
    assert (found.state, found.removable) == (INTERRUPTED_PUBLISH, False)
    assert (stage / "new" / "notes.txt").read_text() == "mine"  # kept for the user
    result = invoke(["clean", str(tmp_path)])
    assert result.stdout == ""
    assert "killed while publishing out" in _notes(result.stderr)[0]
    assert stage.is_dir()


def test_clean_dry_run_lists_and_clean_removes(
    models: dict[str, Path], live_run: tuple[Path, Path]
) -> None:
    out, live = live_run
    _user_files(out)
    killed_run(*POINTS["while writing shards"], *_merge_args(models, out / "merged", "-q"))
    [dead] = [p for p in out.iterdir() if p.name.startswith(f"{STAGE_PREFIX}merged-")]
    size = disk_usage(dead)
    listed = f"{human_size(size)}\t{dead}\n"
    dry = invoke(["clean", str(out), "--dry-run"])
    assert dry.exit_code == 0, dry.stderr
    assert dry.stdout == listed
    assert f"would remove 1 staging folder(s), {human_size(size)}" in dry.stderr
    assert "its run is still going" in dry.stderr  # the live one, named, left alone
    assert dead.is_dir()
    as_json = invoke(["clean", str(out), "--dry-run", "--json"])
    states = {Path(e["path"]): (e["state"], e["removable"]) for e in json.loads(as_json.stdout)}
    assert states == {dead: (DEAD, True), live: (LIVE, False)}
    assert dead.is_dir()
    done = invoke(["clean", str(out)])
    assert done.exit_code == 0, done.stderr
    assert done.stdout == listed
    assert f"removed 1 staging folder(s), {human_size(size)} freed" in done.stderr
    assert not dead.exists()
    assert live.is_dir()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".safelora-tmp-notes.txt", "data", "notes.txt", live.name]
    )


def test_clean_with_nothing_to_clean_and_on_a_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke(["clean", str(tmp_path)])
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr.strip() == f"nothing to clean in {tmp_path}"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    missing = invoke(["clean", str(tmp_path / "nowhere")])
    assert missing.exit_code == ExitCode.FILESYSTEM
    assert missing.stderr.startswith(f"error: {tmp_path / 'nowhere'}: is not a folder")


def test_sizes_read_as_people_write_them() -> None:
    assert [human_size(n) for n in (0, 999, 1000, 12_345, 340_000_000, 12 * 10**9)] == [
        "0 B", "999 B", "1.0 kB", "12 kB", "340 MB", "12 GB",
    ]  # fmt: skip


def test_a_staging_folder_being_removed_is_never_taken_for_unknown(tmp_path: Path) -> None:
    """A run removes its staging with the owner file last: until then it is live; once the
    owner file is gone, the folder is empty and goes silently."""
    stage = Staging(tmp_path / "out", "output folder")
    stage.create(folder=True)
    (stage.staged / "weights").write_bytes(b"w" * 10_000)
    [found] = survey(tmp_path)
    assert found.state == LIVE
    empty = tmp_path / f"{STAGE_PREFIX}out-ffffffffffffffff"
    empty.mkdir()  # as the owner's removal leaves it just before its rmdir
    notices = Notices()
    found_now = {f.path: f for f in survey(tmp_path, remove=True, notices=notices)}
    assert found_now[empty].state == DEAD
    assert notices.items == []
    assert not empty.exists()
    assert stage.path.is_dir()
    stage.remove()
    assert list(tmp_path.iterdir()) == []


def test_another_container_of_this_machine_and_a_reboot_are_told_dead(tmp_path: Path) -> None:
    """Containers of one machine share its kernel (boot id): their locks are this kernel's, so a
    free lock is a dead run whatever the container's host name; after a reboot, every run of this
    host is dead."""
    now = time.time()
    container = _fake_staging(
        tmp_path, "a", Owner("container-7f3a", 1, now, "output folder", "a", boot=this_boot())
    )
    rebooted = _fake_staging(
        tmp_path, "b", Owner(this_host(), 1, now, "output folder", "b", boot="an-earlier-boot")
    )
    found = survey(tmp_path, remove=True)
    assert [(f.path, f.state, f.removable) for f in found] == [
        (container, DEAD, True),
        (rebooted, DEAD, True),
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_file_system_without_locks_still_writes_and_tells_nothing(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(staging.fcntl, "flock", no_locks)
    dead = _fake_staging(tmp_path, "x", Owner(this_host(), 1, time.time(), "report", "x"))
    result = invoke(_merge_args(models, tmp_path / "merged", "-q"))
    assert result.exit_code == ExitCode.OK, result.stderr
    [note] = _notes(result.stderr)
    assert f"left {dead} (" in note
    assert "cannot be told" in note
    assert dead.is_dir()
    assert (tmp_path / "merged" / "config.json").is_file()

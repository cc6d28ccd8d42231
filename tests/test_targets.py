"""One output-target policy (``output.target.check_target``) for every path safelora writes.

A device, FIFO or socket given as an output (``patch --output`` / ``--report``, merged and
full-model outputs, a batch's folders, ``profile --output``, ``show --html``) is exit 6 with one
line naming it, with or without ``--force``, and the node is left as it is; nothing is written.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from safelora_cli.errors import ExitCode, FilesystemError
from safelora_cli.output.atomic import stage_file, write_text
from safelora_cli.output.target import check_target
from safelora_cli.output.writer import OutputFolder
from safelora_cli.synthetic import (
    FineTuneSpec,
    LlamaShape,
    PairSpec,
    all_modules,
    make_adapter,
    make_full_finetune,
    make_pair,
)
from tests.helpers import assert_error, invoke, leftovers

DEV_NULL = Path("/dev/null")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model pair, two adapters, a full fine-tune and a saved report."""
    root = tmp_path_factory.mktemp("targets")
    base, aligned = make_pair(root, PairSpec(seed=4))
    modules = all_modules(LlamaShape())
    one = make_adapter(root / "one", base, aligned, modules, seed=1)
    two = make_adapter(root / "two", base, aligned, modules, seed=2)
    ft = make_full_finetune(root / "ft", base, aligned, FineTuneSpec())
    scored = invoke(["score", str(one), "--base", str(base), "--aligned", str(aligned), "--json"])
    assert scored.exit_code == 0, scored.stderr
    report = root / "r.json"
    report.write_text(scored.stdout)
    return {"base": base, "aligned": aligned, "one": one, "two": two, "ft": ft, "report": report}


def _pair(inputs: dict[str, Path]) -> list[str]:
    return ["--base", str(inputs["base"]), "--aligned", str(inputs["aligned"])]


# each command, given the node as its output; the node is made at ``node`` beforehand
COMMANDS: dict[str, Callable[[dict[str, Path], Path], list[str]]] = {
    "patch --output": lambda i, node: ["patch", str(i["one"]), *_pair(i), "-o", str(node)],
    "patch --report": lambda i, node: [
        "patch",
        str(i["one"]),
        *_pair(i),
        "-o",
        str(node.parent / "out"),
        "--report",
        str(node),
    ],  # fmt: skip
    "patch --merge": lambda i, node: [
        "patch",
        str(i["one"]),
        *_pair(i),
        "-o",
        str(node),
        "--merge",
    ],  # fmt: skip
    "patch FT_MODEL": lambda i, node: ["patch", str(i["ft"]), *_pair(i), "-o", str(node)],
    "patch (batch)": lambda i, node: [  # node is OUTPUT/one: the batch's first folder
        "patch",
        str(i["one"]),
        str(i["two"]),
        *_pair(i),
        "-o",
        str(node.parent),
    ],  # fmt: skip
    "profile --output": lambda i, node: ["profile", *_pair(i), "--rank", "2", "-o", str(node)],
    "show --html": lambda i, node: ["show", str(i["report"]), "--html", str(node)],
}
FLAGS = {"patch --report": "--report", "show --html": "--html"}


def _make_fifo(path: Path) -> Iterator[None]:
    os.mkfifo(path)
    yield


def _make_socket(path: Path) -> Iterator[None]:
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(path.parent)  # a relative name: socket paths are limited to 108 bytes
    try:
        sock.bind(path.name)
    finally:
        os.chdir(cwd)
    yield
    sock.close()


NODES = {"fifo": (_make_fifo, "FIFO", stat.S_ISFIFO), "socket": (_make_socket, "socket",
         stat.S_ISSOCK)}  # fmt: skip


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("kind", list(NODES))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_a_node_as_its_output_and_leaves_it(
    inputs: dict[str, Path], tmp_path: Path, command: str, kind: str, force: bool
) -> None:
    folder = tmp_path / "where"
    folder.mkdir()
    node = folder / "one"
    make, word, is_kind = NODES[kind]
    for _ in make(node):
        args = COMMANDS[command](inputs, node) + (["--force"] if force else [])
        result = invoke([*args, "--quiet"] if not command.startswith("show") else args)
        flag = FLAGS.get(command, "--output")
        assert_error(result, ExitCode.FILESYSTEM, flag, str(node), word)
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
        assert is_kind(os.lstat(node).st_mode)  # left as it is
        assert sorted(p.name for p in folder.iterdir()) == ["one"]  # nothing else written
        assert leftovers(folder) == []


@pytest.mark.parametrize(
    "command", ["show --html", "patch --report", "profile --output", "patch --output"]
)
def test_dev_null_is_never_replaced_even_with_force(inputs: dict[str, Path], command: str) -> None:
    before = os.stat(DEV_NULL)
    args = COMMANDS[command](inputs, DEV_NULL)
    if command == "patch --report":  # the output beside a report in /dev would be refused first
        args[args.index("-o") + 1] = str(inputs["one"].parent / "out-null")
    result = invoke([*args, "--force"])
    assert_error(result, ExitCode.FILESYSTEM, str(DEV_NULL), "character device")
    after = os.stat(DEV_NULL)
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_rdev, after.st_ino) == (before.st_rdev, before.st_ino)
    assert not (inputs["one"].parent / "out-null").exists()


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_check_target_is_the_one_policy(tmp_path: Path, folder: bool, force: bool) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for node in (fifo, DEV_NULL):
        with pytest.raises(FilesystemError, match="left as it is") as caught:
            check_target(node, "--junit", folder=folder, force=force)
        assert caught.value.exit_code == ExitCode.FILESYSTEM
        assert "--junit" in caught.value.message
    assert check_target(tmp_path / "new", "--junit", folder=folder) == (tmp_path / "new")
    existing = tmp_path / "existing"
    if folder:
        existing.mkdir()
        (existing / "f").write_text("x")
    else:
        existing.write_text("x")
    if force:
        check_target(existing, "--junit", folder=folder, force=True)
    else:
        with pytest.raises(FilesystemError, match="exists"):
            check_target(existing, "--junit", folder=folder)
    wrong = tmp_path / ("file" if folder else "dir")
    wrong.write_text("x") if folder else wrong.mkdir()
    with pytest.raises(FilesystemError, match="not a folder" if folder else "is a folder"):
        check_target(wrong, "--junit", folder=folder, force=force)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "new")
    with pytest.raises(FilesystemError, match="symlink"):
        check_target(link, "--junit", folder=folder, force=force)
    with pytest.raises(FilesystemError, match="inside the input"):
        check_target(tmp_path / "new", "--junit", folder=folder, inputs=[tmp_path])


def test_a_fifo_appearing_during_the_run_is_left_and_nothing_published(tmp_path: Path) -> None:
    target, report = tmp_path / "out", tmp_path / "report.json"
    out = OutputFolder(target).__enter__()
    (out.path / "weights").write_bytes(b"w")
    out.attach_json(report, {"run": 1})
    os.mkfifo(report)  # appears while the run writes
    with pytest.raises(FilesystemError, match="--report .*FIFO"):
        out.__exit__(None, None, None)
    assert stat.S_ISFIFO(os.lstat(report).st_mode)
    assert not target.exists()  # the folder is never published without its report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_file_write_never_replaces_a_node_that_appeared(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    staged = stage_file(page, lambda fh: fh.write(b"<html>"), "--html")
    os.mkfifo(page)
    with pytest.raises(FilesystemError, match="--html .*FIFO"):
        staged.publish()
    assert stat.S_ISFIFO(os.lstat(page).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]  # the staged file went
    write_text(tmp_path / "ok.html", "fine", "--html")
    assert (tmp_path / "ok.html").read_text() == "fine"


def test_show_html_on_a_regular_file_still_works_with_force(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    page = tmp_path / "r.html"
    page.write_text("old")
    result = invoke(["show", str(inputs["report"]), "--html", str(page), "--force"])
    assert result.exit_code == 0, result.stderr
    assert "<html" in page.read_text().lower()
    assert json.loads(inputs["report"].read_text())  # the input report is untouched

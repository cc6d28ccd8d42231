"""Outputs on any file system, with the modes the umask gives, published under the lock.

- Another file system than the inputs: the kernel refuses ``os.copy_file_range`` (EXDEV; ENOSYS,
  EINVAL, EOPNOTSUPP elsewhere) and the copy goes through a buffer, still atomic and
  byte-identical. Checked with an injected EXDEV (every machine) and with a real tmpfs mounted by
  the test (as root; skipped otherwise).
- Modes: files 0666 and folders 0777 less the umask, under two umasks.
- The publish lock: a publisher waits while another holds the lock on the parent folder.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from safelora_cli.output import shards
from safelora_cli.output.atomic import publish_lock
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
from tests.helpers import CARD, REPORT, invoke, leftovers

REFUSALS = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A sharded model pair, an adapter, a full fine-tune and a saved report."""
    root = tmp_path_factory.mktemp("filesystems")
    base, aligned = make_pair(root, PairSpec(shards=2, seed=5))
    adapter = make_adapter(root / "adapter", base, aligned, all_modules(LlamaShape()), seed=1)
    ft = make_full_finetune(root / "ft", base, aligned, FineTuneSpec(shards=2))
    scored = invoke(["score", str(adapter), "--base", str(base), "--aligned", str(aligned),
                     "--json"])  # fmt: skip
    assert scored.exit_code == 0, scored.stderr
    (root / "r.json").write_text(scored.stdout)
    return {
        "base": base,
        "aligned": aligned,
        "adapter": adapter,
        "ft": ft,
        "report": root / "r.json",
    }


def _pair(inputs: dict[str, Path]) -> list[str]:
    return ["--base", str(inputs["base"]), "--aligned", str(inputs["aligned"]), "-q"]


def _write_everything(inputs: dict[str, Path], where: Path) -> None:
    """Every kind of output into ``where``: adapter + --report, merged model, full model,
    profile, HTML page."""
    runs = [
        ["patch", str(inputs["adapter"]), *_pair(inputs), "-o", str(where / "adapter"),
         "--report", str(where / "report.json")],
        ["patch", str(inputs["adapter"]), *_pair(inputs), "-o", str(where / "merged"), "--merge"],
        ["patch", str(inputs["ft"]), *_pair(inputs), "-o", str(where / "full"), "-k", "3"],
        ["profile", *_pair(inputs), "--rank", "2", "-o", str(where / "p.safetensors")],
        ["show", str(inputs["report"]), "--html", str(where / "r.html")],
    ]  # fmt: skip
    for args in runs:
        result = invoke(args)
        assert result.exit_code == 0, (args, result.stderr)
    assert leftovers(where) == []


def _contents(where: Path) -> dict[str, Any]:
    """Every file under ``where`` but those that name the output's own path (reports, cards);
    the profile as its parsed header and its data (safetensors writes the metadata's keys in
    any order)."""
    got: dict[str, Any] = {}
    for path in sorted(where.rglob("*")):
        if path.is_file() and path.name not in (REPORT, CARD, "report.json"):
            blob = path.read_bytes()
            if path.name == "p.safetensors":
                size = struct.unpack("<Q", blob[:8])[0]
                blob = (json.loads(blob[8 : 8 + size]), blob[8 + size :])  # type: ignore[assignment]
            got[str(path.relative_to(where))] = blob
    return got


@pytest.fixture(scope="module")
def reference(
    inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, bytes]:
    """What every output holds when written on the inputs' file system."""
    where = tmp_path_factory.mktemp("reference")
    _write_everything(inputs, where)
    return _contents(where)


def test_injected_exdev_everywhere_gives_the_same_bytes(
    inputs: dict[str, Path],
    reference: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused: list[int] = []

    def cross_device(*args: Any) -> int:
        refused.append(1)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    _write_everything(inputs, tmp_path)
    assert refused  # the merged and full outputs asked the kernel, and were refused
    got = _contents(tmp_path)
    assert sorted(got) == sorted(reference)
    assert got == reference


@pytest.fixture
def other_file_system(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted for the test: another file system than the inputs'."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_outputs_on_another_file_system_are_byte_identical(
    inputs: dict[str, Path], reference: dict[str, Any], other_file_system: Path
) -> None:
    assert os.stat(other_file_system).st_dev != os.stat(inputs["base"]).st_dev
    _write_everything(inputs, other_file_system)
    assert _contents(other_file_system) == reference


@pytest.mark.parametrize("code", REFUSALS, ids=[errno.errorcode[c] for c in REFUSALS])
def test_copy_range_falls_back_on_each_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "src").write_bytes(data)

    def refuse(*args: Any) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(shards, "_BUFFER", 1 << 20)  # several buffered rounds
    with (
        (tmp_path / "src").open("rb", buffering=0) as src,
        (tmp_path / "dst").open("wb", buffering=0) as dst,
    ):
        shards.copy_range(src, dst, 5, len(data) - 7)  # type: ignore[arg-type]
    got = (tmp_path / "dst").read_bytes()
    assert got[5:] == data[5 : len(data) - 7]
    assert got[:5] == b"\0" * 5


def test_copy_range_still_raises_a_write_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "src").write_bytes(b"x" * 100)

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full)
    with (
        (tmp_path / "src").open("rb", buffering=0) as src,
        (tmp_path / "dst").open("wb", buffering=0) as dst,
        pytest.raises(OSError, match="No space"),
    ):
        shards.copy_range(src, dst, 0, 100)  # type: ignore[arg-type]


def _modes(where: Path) -> dict[str, int]:
    return {str(p.relative_to(where)): stat.S_IMODE(os.lstat(p).st_mode) for p in where.rglob("*")}


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_outputs_follow_the_umask(inputs: dict[str, Path], tmp_path: Path, mask: int) -> None:
    previous = os.umask(mask)
    try:
        _write_everything(inputs, tmp_path)
    finally:
        os.umask(previous)
    modes = _modes(tmp_path)
    assert {"adapter", "merged", "full", "p.safetensors", "r.html", "report.json"} <= set(modes)
    for name, mode in modes.items():
        want = (0o777 if (tmp_path / name).is_dir() else 0o666) & ~mask
        assert mode == want, (name, oct(mode), oct(want))


def test_a_publisher_waits_while_the_lock_is_held(tmp_path: Path) -> None:
    target = tmp_path / "out"
    out = OutputFolder(target).__enter__()
    (out.path / "weights").write_bytes(b"w")
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            out.__exit__(None, None, None)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with publish_lock(tmp_path):
        publisher = threading.Thread(target=publish)
        publisher.start()
        publisher.join(timeout=1.0)
        waiting = publisher.is_alive()
        published_early = target.exists()
    publisher.join(timeout=60)
    assert waiting  # it waited for the lock
    assert not published_early
    assert not errors
    assert (target / "weights").read_bytes() == b"w"

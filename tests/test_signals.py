"""Ctrl-C or SIGTERM at any point -> exit 130, nothing partial left.

``python -m safelora_cli patch`` runs in a subprocess on a synthetic trio big enough for each phase
to last: scoring (full SVDs of 1024-wide weights) and writing (a 200 MB passthrough tensor). The
signal is sent when the phase is seen to have started: the base weights opened by the process
(/proc/PID/fd), or the staging folder beside the output. No hook in the product code.

An interrupt can also land where the run cannot stop any more: inside torch, which may swallow the
KeyboardInterrupt, or while the output is being renamed into place. The run then finishes, exits
130 and says its output is complete: the subprocess tests then check that output against an
uninterrupted run's, and two in-process tests make those two landings happen every time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from safelora_cli.errors import ExitCode
from safelora_cli.output import staging, writer
from safelora_cli.output.staging import OWNER_NAME
from safelora_cli.output.writer import STAGE_PREFIX
from safelora_cli.runs import execute
from safelora_cli.synthetic import LlamaShape, PairSpec, all_modules, make_adapter, make_pair
from tests.conftest import Trio
from tests.helpers import (
    CONFIG,
    REPORT,
    WEIGHTS,
    expect_ok,
    invoke,
    leftovers,
    snapshot,
    start_patch,
)

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not Path("/proc/self/fd").exists(),
    reason="watches /proc/PID/fd and sends POSIX signals",
)
SHAPE = LlamaShape(hidden=1024, intermediate=2816, layers=2, heads=8, kv_heads=8, vocab=256)
PASSTHROUGH = "base_model.model.lm_head.modules_to_save.default.weight"
TIMEOUT = 120.0
INTERRUPTED = "error: interrupted; nothing was written"
FINISHED = "error: interrupted as the run finished; its output is complete"


@pytest.fixture(scope="module")
def big_trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """base/aligned (100 MB each), a small adapter and one with a 200 MB passthrough tensor;
    removed after the module's tests (they are most of what a test run leaves on disk)."""
    root = tmp_path_factory.mktemp("signals")
    base, aligned = make_pair(root, PairSpec(shape=SHAPE))
    adapter = make_adapter(root / "adapter", base, aligned, all_modules(SHAPE), rank=8)
    heavy = root / "heavy"
    heavy.mkdir()
    (heavy / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors[PASSTHROUGH] = torch.ones(50_000_000)
    save_file(tensors, str(heavy / "adapter_model.safetensors"))
    yield {"base": base, "aligned": aligned, "adapter": adapter, "heavy": heavy}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def uninterrupted(
    big_trio: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Path]]:
    """``uninterrupted(adapter_key, *extra)``: the output of the same run left to finish, made
    (in-process) only when an interrupted run says it finished anyway, then kept for the module."""
    root = tmp_path_factory.mktemp("uninterrupted")
    made: dict[tuple[str, ...], Path] = {}

    def run(adapter: str, *extra: str) -> Path:
        key = (adapter, *extra)
        if key not in made:
            out = root / f"out{len(made)}"
            models = ["--base", str(big_trio["base"]), "--aligned", str(big_trio["aligned"])]
            args = ["patch", str(big_trio[adapter]), *models, "--output", str(out), "--quiet"]
            args += extra
            expect_ok(invoke(args), out)
            made[key] = out
        return made[key]

    yield run
    shutil.rmtree(root, ignore_errors=True)


def start(trio: dict[str, Path], adapter: str, output: Path, *extra: str) -> subprocess.Popen[str]:
    return start_patch(trio[adapter], trio["base"], trio["aligned"], output, *extra)


def wait_until(proc: subprocess.Popen[str], seen: Callable[[], bool]) -> None:
    """Poll (tightly) until ``seen()``; fail if the process ends first."""
    deadline = time.monotonic() + TIMEOUT
    while not seen():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"finished (exit {proc.returncode}) before the phase was seen: {err!r}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("phase never seen")
        time.sleep(0.001)


def opens_file(pid: int, path: Path) -> Callable[[], bool]:
    """True once the process holds ``path`` open (its weights are read, not memory-mapped)."""
    target = str(path.resolve())

    def seen() -> bool:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            return False
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return True
            except OSError:
                continue
        return False

    return seen


def staging_in(folder: Path) -> Callable[[], bool]:
    return lambda: any(p.name.startswith(STAGE_PREFIX) for p in folder.iterdir())


def same_output(output: Path, reference: Path, carried: dict[str, bytes] | None = None) -> None:
    """``output`` is exactly what the uninterrupted run wrote (plus ``carried`` files of the
    user's): the same files, the weights and config byte for byte, the same report."""
    carried = carried or {}
    names = sorted(p.name for p in output.iterdir())
    assert names == sorted([*(p.name for p in reference.iterdir()), *carried])
    for name in (WEIGHTS, CONFIG):
        assert (output / name).read_bytes() == (reference / name).read_bytes(), name
    for name, data in carried.items():
        assert (output / name).read_bytes() == data, name
    got, want = (json.loads((folder / REPORT).read_text()) for folder in (output, reference))
    assert got.pop("output") == output.name  # published: the folder's name
    assert want.pop("output") == reference.name
    assert got == want


def finish(proc: subprocess.Popen[str], output: Path, reference: Callable[[], Path]) -> str:
    """Wait for the interrupted run; check exit 130, one stderr line, nothing partial left.

    torch can swallow the KeyboardInterrupt (a C-level hasattr clears it) and the run then
    finishes: that is still exit 130, with a message that says so, and then the output must be
    complete and correct: the same as ``reference()``, the run left to finish. Returns the line.
    """
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == ExitCode.INTERRUPTED, f"exit {proc.returncode}: {err!r}"
    assert leftovers(output.parent) == []
    if err.splitlines() == [FINISHED]:
        same_output(output, reference())
        return FINISHED
    assert err.splitlines() == [INTERRUPTED], err
    assert out == ""
    assert not output.exists()
    return INTERRUPTED


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_scoring_leaves_nothing(
    big_trio: dict[str, Path],
    uninterrupted: Callable[..., Path],
    tmp_path: Path,
    signum: signal.Signals,
) -> None:
    output = tmp_path / "out"
    extra = ("--projection", "subspace", "--rank", "900")
    proc = start(big_trio, "adapter", output, *extra)
    wait_until(proc, opens_file(proc.pid, big_trio["base"] / "model.safetensors"))
    proc.send_signal(signum)
    finish(proc, output, lambda: uninterrupted("adapter", *extra))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_writing_leaves_nothing(
    big_trio: dict[str, Path],
    uninterrupted: Callable[..., Path],
    tmp_path: Path,
    signum: signal.Signals,
) -> None:
    output = tmp_path / "out"
    proc = start(big_trio, "heavy", output)
    wait_until(proc, staging_in(tmp_path))
    proc.send_signal(signum)
    finish(proc, output, lambda: uninterrupted("heavy"))


def test_signal_with_force_keeps_the_existing_output(
    big_trio: dict[str, Path], uninterrupted: Callable[..., Path], tmp_path: Path
) -> None:
    """Interrupted while writing over an existing folder: the old files are left as they were
    (or, if the run finished anyway, replaced by a complete output that keeps the user's file)."""
    output = tmp_path / "out"
    output.mkdir()
    (output / WEIGHTS).write_bytes(b"previous run")
    (output / "notes.txt").write_text("mine")
    proc = start(big_trio, "heavy", output, "--force")
    wait_until(proc, staging_in(tmp_path))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    if err.splitlines() == [FINISHED]:
        same_output(output, uninterrupted("heavy"), carried={"notes.txt": b"mine"})
        return
    assert err.splitlines() == [INTERRUPTED]
    assert snapshot(output) == {WEIGHTS: b"previous run", "notes.txt": b"mine"}


# --- interrupts the run cannot act on any more, made to land every time -----------------------


def _swallowed_interrupt() -> None:
    """What torch sometimes does: the signal's KeyboardInterrupt is raised and cleared inside."""
    try:
        signal.raise_signal(signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary, still in here
    except KeyboardInterrupt:
        pass


def test_interrupt_swallowed_inside_the_math_still_exits_130_with_a_complete_output(
    trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = tmp_path / "reference"
    expect_ok(invoke(trio.patch_args(reference, "--quiet")), reference)
    real_score_job = execute.score

    def score_job(*args: Any, **kwargs: Any) -> Any:
        scored = real_score_job(*args, **kwargs)
        _swallowed_interrupt()
        return scored

    monkeypatch.setattr(execute, "score", score_job)
    output = tmp_path / "out"
    result = invoke(trio.patch_args(output, "--quiet"))
    assert result.exit_code == ExitCode.INTERRUPTED, result.stderr
    assert result.stderr.splitlines() == [FINISHED]
    assert leftovers(tmp_path) == []
    same_output(output, reference)


@pytest.mark.parametrize("force", [False, True], ids=["new-folder", "force-over-old"])
def test_interrupt_while_publishing_is_held_back_and_the_output_is_complete(
    trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    """A signal during the renames that publish the output waits for them: never half a swap."""
    reference = tmp_path / "reference"
    expect_ok(invoke(trio.patch_args(reference, "--quiet")), reference)
    output = tmp_path / "out"
    carried: dict[str, bytes] = {}
    if force:
        output.mkdir()
        (output / WEIGHTS).write_bytes(b"previous run")
        (output / "notes.txt").write_text("mine")
        carried = {"notes.txt": b"mine"}
    real_rename = os.rename
    sent: list[bool] = []

    def rename(src: str | Path, dst: str | Path) -> None:
        if not sent:  # the first rename of the publish: the signal lands in the middle of it
            sent.append(True)
            signal.raise_signal(signal.SIGTERM)
        real_rename(src, dst)

    monkeypatch.setattr(writer.os, "rename", rename)
    result = invoke(trio.patch_args(output, "--quiet", *(["--force"] if force else [])))
    assert sent
    assert result.exit_code == ExitCode.INTERRUPTED, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: interrupted just after {output} was written; it is complete")
    assert leftovers(tmp_path) == []
    same_output(output, reference, carried)


@pytest.mark.parametrize(
    "point", ["folder-made", "owner-file-opened", "new-made", "handler-put-back", "lock-let-go"]
)
def test_interrupt_while_the_staging_folder_is_made_leaves_nothing(
    trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """SIGTERM (or SIGINT) landing at each step of making the staging folder (just after its
    mkdir, before the run has recorded it as its own; as soon as its handler that held it back
    is put back; as the folder's lock is let go): exit 130, and no staging folder left behind."""
    real_mkdir, real_open, real_close, real_signal = os.mkdir, os.open, os.close, signal.signal
    sent: list[str] = []

    def staging_exists() -> bool:
        return any(p.name.startswith(STAGE_PREFIX) for p in tmp_path.iterdir())

    def signal_after(name: str, path: Any, signum: int = signal.SIGTERM) -> None:
        if not sent and name == point:
            sent.append(str(path))
            signal.raise_signal(signum)

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        real_mkdir(path, *args, **kwargs)
        path = Path(path)
        if path.name.startswith(STAGE_PREFIX):
            signal_after("folder-made", path)
        elif path.name == "new" and path.parent.name.startswith(STAGE_PREFIX):
            signal_after("new-made", path)

    def open_(path: Any, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, *args, **kwargs)
        if Path(path).name == OWNER_NAME:
            try:
                signal_after("owner-file-opened", path)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def close(fd: int) -> None:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        real_close(fd)
        if name == str(tmp_path.resolve()) and staging_exists():  # the parent's lock
            signal_after("lock-let-go", name)

    def install(signum: int, handler: Any) -> Any:
        previous = real_signal(signum, handler)
        if getattr(previous, "__name__", "") == "record" and staging_exists():
            signal_after("handler-put-back", signum, signum)  # the one just put back
        return previous

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "close", close)
    monkeypatch.setattr(signal, "signal", install)
    output = tmp_path / "out"
    result = invoke(trio.patch_args(output, "--quiet"))
    assert sent
    assert result.exit_code == ExitCode.INTERRUPTED, result.stderr
    assert result.stderr.splitlines() == [INTERRUPTED]
    assert leftovers(tmp_path) == []
    assert not output.exists()


def test_a_signal_while_interrupts_are_being_held_back_puts_every_handler_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM landing after SIGINT's handler was swapped, before SIGTERM's: its interrupt goes
    through, and Ctrl-C is not left swallowed by the handler that held it back."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    real_signal = signal.signal
    previous = {s: real_signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:

        def install(signum: int, handler: Any) -> Any:
            old = real_signal(signum, handler)
            if signum == signal.SIGINT and handler is not interrupt:
                signal.raise_signal(signal.SIGTERM)
            return old

        monkeypatch.setattr(signal, "signal", install)
        with pytest.raises(KeyboardInterrupt), staging.deferred_signals():
            pytest.fail("the interrupt should have landed before the block")
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGINT) is interrupt
        assert signal.getsignal(signal.SIGTERM) is interrupt
    finally:
        for signum, handler in previous.items():
            real_signal(signum, handler)


def test_interrupt_as_publishing_lets_go_of_its_lock_says_the_output_is_complete(
    trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal landing just after the renames, as the publish lock is let go: the output is in
    place and complete, and the message says so (never "nothing was written")."""
    reference = tmp_path / "reference"
    expect_ok(invoke(trio.patch_args(reference, "--quiet")), reference)
    output = tmp_path / "out"
    real_close = os.close
    sent: list[bool] = []

    def close(fd: int) -> None:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        real_close(fd)
        if not sent and name == str(tmp_path.resolve()) and output.is_dir():
            sent.append(True)
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(os, "close", close)
    result = invoke(trio.patch_args(output, "--quiet"))
    assert sent
    assert result.exit_code == ExitCode.INTERRUPTED, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: interrupted just after {output} was written; it is complete")
    assert leftovers(tmp_path) == []
    same_output(output, reference)

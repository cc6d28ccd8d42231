"""Ctrl-C or SIGTERM at any point -> exit 130, nothing partial left.

``python -m safelora_cli patch`` runs in a subprocess on a synthetic trio big enough for each phase
to last: scoring (full SVDs of 1024-wide weights) and writing (a 200 MB passthrough tensor). The
signal is sent when the phase is seen to have started: the base weights memory-mapped by the
process (/proc/PID/fd), or the staging folder beside the output. No hook in the product code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safelora_cli.synthetic import LlamaShape, PairSpec, all_modules, make_adapter, make_pair
from safelora_cli.writer import STAGE_PREFIX

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
def big_trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base/aligned (100 MB each), a small adapter and one with a 200 MB passthrough tensor."""
    root = tmp_path_factory.mktemp("signals")
    base, aligned = make_pair(root, PairSpec(shape=SHAPE))
    adapter = make_adapter(root / "adapter", base, aligned, all_modules(SHAPE), rank=8)
    heavy = root / "heavy"
    heavy.mkdir()
    (heavy / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors[PASSTHROUGH] = torch.ones(50_000_000)
    save_file(tensors, str(heavy / "adapter_model.safetensors"))
    return {"base": base, "aligned": aligned, "adapter": adapter, "heavy": heavy}


def start(adapter: Path, trio: dict[str, Path], output: Path, *extra: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "safelora_cli", "patch", str(adapter),
            "--base", str(trio["base"]), "--aligned", str(trio["aligned"]),
            "--output", str(output), "--quiet", *extra]  # fmt: skip
    env = {**os.environ, "SAFELORA_DEBUG": "0"}
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


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


def finish(proc: subprocess.Popen[str], output: Path) -> None:
    """Wait for the interrupted run; check exit 130, one stderr line, nothing partial left.

    torch can swallow the KeyboardInterrupt (a C-level hasattr clears it) and the run then
    finishes: that is still exit 130, with a complete output and a message that says so.
    """
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, f"exit {proc.returncode}: {err!r}"
    assert [p.name for p in output.parent.iterdir() if p.name.startswith(STAGE_PREFIX)] == []
    if err.splitlines() == [FINISHED]:
        assert load_file(str(output / "adapter_model.safetensors"))
        assert (output / "adapter_config.json").is_file()
        assert (output / "safelora_report.json").is_file()
        return
    assert err.splitlines() == [INTERRUPTED], err
    assert out == ""
    assert not output.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_row32_signal_while_scoring(
    big_trio: dict[str, Path], tmp_path: Path, signum: signal.Signals
) -> None:
    output = tmp_path / "out"
    proc = start(big_trio["adapter"], big_trio, output, "--projection", "subspace", "--rank", "900")
    wait_until(proc, opens_file(proc.pid, big_trio["base"] / "model.safetensors"))
    proc.send_signal(signum)
    finish(proc, output)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_row32_signal_while_writing(
    big_trio: dict[str, Path], tmp_path: Path, signum: signal.Signals
) -> None:
    output = tmp_path / "out"
    proc = start(big_trio["heavy"], big_trio, output)
    wait_until(proc, staging_in(tmp_path))
    proc.send_signal(signum)
    finish(proc, output)


def test_row32_signal_with_force_keeps_existing_output(
    big_trio: dict[str, Path], tmp_path: Path
) -> None:
    """Interrupted while writing over an existing folder: the old files are left as they were."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "adapter_model.safetensors").write_bytes(b"previous run")
    (output / "notes.txt").write_text("mine")
    proc = start(big_trio["heavy"], big_trio, output, "--force")
    wait_until(proc, staging_in(tmp_path))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    if err.splitlines() == [FINISHED]:
        return
    assert err.splitlines() == [INTERRUPTED]
    assert (output / "adapter_model.safetensors").read_bytes() == b"previous run"
    assert sorted(p.name for p in output.iterdir()) == ["adapter_model.safetensors", "notes.txt"]

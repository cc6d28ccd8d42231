"""Where the time goes: one run of a command under py-spy, samples grouped by pipeline step.

py-spy samples every Python thread (``--threads``) and, by default, only while the thread is on
CPU, so the stream's worker threads (reads, V, products) and the main thread (start-up, writing)
are counted apart.
Each sample is charged to the innermost frame that names a step (see ``RULES``); a sample anywhere
below an import is charged to "import". Without py-spy, cProfile gives the main thread's
cumulative times for the same steps (the worker threads are then invisible).
"""

from __future__ import annotations

import linecache
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import safelora_cli

PYSPY_RATE = 50  # per second and thread: 200 Hz slowed the 2-core run 2.5x, 50 Hz by ~10%
SRC = Path(safelora_cli.__file__).resolve().parent.parent

# (module, function, text the sampled source line must contain or "", step); innermost wins.
# Rules for code that is gone do no harm: they just never match.
RULES: list[tuple[str, str, str, str]] = [
    ("loader", "TensorReader.read_into", "", "read: weights into reused buffers (readinto)"),
    ("projection", "alignment_matrix_into", "block.copy_", "convert: W_a bf16→fp32"),
    ("projection", "alignment_matrix_into", "tmp.copy_", "convert: W_b bf16→fp32"),
    ("projection", "alignment_matrix_into", "sub_", "subtract: V = W_a − W_b (fp32)"),
    ("projection", "alignment_matrix_into", "dot", "‖V‖² (fused, per block)"),
    ("projection", "alignment_matrix_into", "", "alignment: other (block loop, ‖V‖ sync)"),
    ("projection", "paper_projections", "", "matmul: paper Ĉ B (two passes over V's blocks)"),
    ("projection", "paper_project", "", "matmul: paper Ĉ B (two passes over V's blocks)"),
    ("projection", "_products.<locals>.<lambda>", "", "matmul: subspace basis, passes over V"),
    ("projection", "_block_krylov", "qr", "matmul: subspace basis, QR of the Krylov blocks"),
    ("projection", "_block_krylov", "", "matmul: subspace basis, Gram-Schmidt and Ritz"),
    ("projection", "_top_singular", "", "matmul: subspace basis (exact: Gram eigh or SVD)"),
    ("projection", "subspace_basis", "", "matmul: subspace basis (exact: Gram eigh or SVD)"),
    ("projection", "factored_cosine", "", "cosine: r×r Grams in fp64"),
    ("projection", "_module_score", "", "cosine: small norms of P B"),
    ("projection", "score_modules", "", "score: other (U_k U_kᵀ B, B norms)"),
    ("scoring", "_read_factor", "", "read adapter factors (+ isfinite check)"),
    ("pipeline", "_stage", "", "write patched adapter + model card + report"),
    ("job", "prepare", "", "resolve/index/pair (headers only)"),
    ("report", "build", "", "report build"),
    ("loader", "TensorReader.read", "", "safetensors get_tensor (adapter, mmap view)"),
    ("display", "emit_results", "", "CLI output (summary table)"),
]
IMPORT = "import (python, torch, safelora modules)"
IDLE = "worker thread waiting for work (idle, missed by py-spy's idle filter)"
NO_FRAME = "interpreter start/exit (no Python frame)"
OTHER = "other (interpreter, CLI, waits)"


@dataclass
class Profile:
    """Seconds per step, per thread kind (main / workers)."""

    tool: str
    wall_s: float
    seconds: dict[str, defaultdict[str, float]] = field(default_factory=dict)
    note: str = ""
    settings: str = ""

    def add(self, thread: str, step: str, seconds: float) -> None:
        self.seconds.setdefault(thread, defaultdict(float))[step] += seconds


def _frame(frame: str) -> tuple[str, str, int]:
    """'func (path/file.py:12)' -> (func, path, line)."""
    func, _, where = frame.rpartition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    return func, path, int(line) if line.isdigit() else 0


def _source(path: str, line: int) -> str:
    return linecache.getline(str(SRC / path), line) if path.startswith("safelora_cli/") else ""


def classify(frames: list[str]) -> str:
    """The step a sampled stack (outermost first) belongs to."""
    if not frames:
        return NO_FRAME
    if any(f.startswith("_find_and_load (") for f in frames):
        return IMPORT
    if _frame(frames[-1])[0] == "_worker":
        return IDLE
    for frame in reversed(frames):
        func, path, line = _frame(frame)
        for module, name, text, step in RULES:
            if path == f"safelora_cli/{module}.py" and func == name and text in _source(path, line):
                return step
    return OTHER


def pyspy() -> str | None:
    """The py-spy executable: next to this Python, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def profile(command: list[str]) -> Profile:
    """Run ``command`` once under py-spy (or cProfile for a Python command) and group the time."""
    exe = pyspy()
    with tempfile.TemporaryDirectory(prefix="safelora-profile-") as tmp:
        if exe is not None:
            return _pyspy_profile(exe, command, Path(tmp) / "stacks.txt")
        return _cprofile(command, Path(tmp) / "profile.out")


def _pyspy_profile(exe: str, command: list[str], out: Path) -> Profile:
    # --nonblocking: stopping the process for each sample distorts a run of many short torch ops
    argv = [exe, "record", "--threads", "--nonblocking", "-r", str(PYSPY_RATE), "-f", "raw",
            "-o", str(out), "--", *command]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = Profile("py-spy", time.perf_counter() - started)
    result.settings = f" (`py-spy record --threads --nonblocking -r {PYSPY_RATE}`)"
    names: dict[str, str] = {}
    stacks: list[tuple[str, list[str], int]] = []
    for row in out.read_text().splitlines():
        stack, _, samples = row.rpartition(" ")
        thread, *frames = stack.split(";")
        tid, _, name = thread.partition(": ")
        if name:
            names[tid] = name
        stacks.append((tid, frames, int(samples)))
    for tid, frames, count in stacks:
        kind = "workers" if "safelora-weights" in names.get(tid, "") else "main"
        result.add(kind, classify(frames), count / PYSPY_RATE)
    return result


def _cprofile(command: list[str], out: Path) -> Profile:
    """Fallback: cumulative times of the step functions in the main thread."""
    safelora = Path(command[0])
    if safelora.name != "safelora":
        raise ValueError("the cProfile fallback profiles a `safelora ...` command only")
    argv = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "safelora_cli", *command[1:]]
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = Profile("cProfile", time.perf_counter() - started)
    result.note = (
        "cProfile: cumulative seconds (nested steps overlap), main thread only: the worker "
        "threads' work is missing."
    )
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    steps = {(module, name): step for module, name, text, step in RULES if not text}
    for (file, _line, func), (_cc, _nc, _tt, cumulative, _callers) in stats.items():
        step = steps.get((Path(file).stem, func.rpartition(".")[2]))
        if step is not None and "safelora_cli" in file:
            result.add("main", step, cumulative)
    return result

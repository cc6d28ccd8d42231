"""Measure a command as a whole process: wall time and peak RSS, warm page cache.

Each case runs once to warm the page cache (and to find out whether the CLI accepts it), then
``runs`` more times. The wall time is taken around the child process; the peak RSS and the child's
CPU time come from ``/usr/bin/time -v`` when it is there, else from ``getrusage(RUSAGE_CHILDREN)``
in a fresh wrapper process per run (its maximum then covers the one child it waited for).

The machine may be shared: before each run we wait (bounded) for the other processes to go quiet,
and we record how much CPU the rest of the machine used during the run (``/proc/stat`` busy time
minus the child's own CPU time), so a noisy number can be recognised as such.
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

GNU_TIME = "/usr/bin/time"
# Runs argv[1:]; prints peak RSS (KiB, Linux ru_maxrss unit) and CPU seconds of that child last.
_RUSAGE_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(u.ru_maxrss, u.ru_utime + u.ru_stime, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)
IDLE_CORES = 0.3  # the rest of the machine counts as quiet below this many busy cores
IDLE_WINDOW_S = 1.0


@functools.cache
def has_gnu_time() -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        return False
    probe = subprocess.run([GNU_TIME, "-v", "true"], capture_output=True, text=True, check=False)
    return "Maximum resident set size" in probe.stderr


def rss_method() -> str:
    """How peak RSS is measured on this machine."""
    if has_gnu_time():
        return "`/usr/bin/time -v` (Maximum resident set size of the measured process)"
    return "`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` in a fresh wrapper process per run"


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores, from /proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait_s: float) -> float:
    """Wait until the machine is quiet (or ``max_wait_s`` passed); returns the last busy cores."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = busy_seconds()
        time.sleep(IDLE_WINDOW_S)
        cores = (busy_seconds() - before) / IDLE_WINDOW_S
        if cores < IDLE_CORES or time.monotonic() >= deadline:
            return cores


@dataclass(frozen=True)
class Sample:
    """One run of a command. ``other_cores``: CPU the rest of the machine used meanwhile."""

    rc: int
    wall_s: float
    peak_rss_kib: int
    cpu_s: float
    other_cores: float
    stderr_tail: str


@dataclass
class Measurement:
    """A case's samples (warm-up excluded), or why it has none."""

    case: str
    command: list[str]
    samples: list[Sample] = field(default_factory=list)
    unavailable: str | None = None  # the CLI rejected the invocation: feature not there (yet)
    error: str | None = None  # a run that must work failed

    @property
    def ok(self) -> bool:
        return bool(self.samples) and self.unavailable is None and self.error is None

    @property
    def walls(self) -> list[float]:
        return [s.wall_s for s in self.samples]

    @property
    def median_s(self) -> float:
        return statistics.median(self.walls)

    @property
    def peak_rss_mb(self) -> float:
        """Largest peak RSS over the runs, in MB (10^6 bytes)."""
        return max(s.peak_rss_kib for s in self.samples) * 1024 / 1e6

    @property
    def other_cores(self) -> float:
        """Most CPU the rest of the machine used during any run, in cores."""
        return max(s.other_cores for s in self.samples)


def run_once(command: Sequence[str]) -> Sample:
    """Run ``command`` once (stdout discarded, stderr kept) and measure it."""
    with tempfile.TemporaryDirectory(prefix="safelora-bench-") as tmp:
        err_path, time_path = Path(tmp) / "stderr", Path(tmp) / "time"
        if has_gnu_time():
            argv = [GNU_TIME, "-v", "-o", str(time_path), *command]
        else:
            argv = [sys.executable, "-c", _RUSAGE_WRAPPER, *command]
        with err_path.open("wb") as err:
            busy = busy_seconds()
            started = time.perf_counter()
            rc = subprocess.call(argv, stdout=subprocess.DEVNULL, stderr=err)
            wall = time.perf_counter() - started
            busy = busy_seconds() - busy
        stderr = err_path.read_text(errors="replace")
        if has_gnu_time():
            rss, cpu = _parse_gnu_time(time_path.read_text())
        else:
            lines = stderr.rstrip().splitlines()
            rss_text, cpu_text = lines[-1].split()
            rss, cpu, stderr = int(rss_text), float(cpu_text), "\n".join(lines[:-1])
    tail = "\n".join(stderr.rstrip().splitlines()[-3:])
    other = max(0.0, busy - cpu) / wall if wall > 0 else 0.0
    return Sample(rc, wall, rss, cpu, other, tail)


def _parse_gnu_time(text: str) -> tuple[int, float]:
    values = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        values[key] = value
    try:
        cpu = float(values["User time (seconds)"]) + float(values["System time (seconds)"])
        return int(values["Maximum resident set size (kbytes)"]), cpu
    except (KeyError, ValueError) as exc:
        raise ValueError(f"unexpected /usr/bin/time -v output:\n{text}") from exc


def measure(
    case: str,
    command: list[str],
    runs: int,
    *,
    optional: bool = False,
    output: Path | None = None,
    wait_idle_s: float = 0.0,
    settle: bool = False,
) -> Measurement:
    """Warm up once, then run ``runs`` times.

    Args:
        optional: a nonzero exit of the warm-up marks the case "not available" (a feature the
            CLI does not have yet) instead of an error.
        output: a folder the command creates; removed before every run (the last one is kept).
        wait_idle_s: before each run, wait up to this long for the machine to be quiet.
        settle: before each run, write back the dirty pages of the runs before (``os.sync``):
            for cases that write gigabytes, whose time otherwise depends on the writeback the
            case before left.
    """
    result = Measurement(case, command)
    for k in range(runs + 1):
        if output is not None:
            shutil.rmtree(output, ignore_errors=True)
        if settle:
            os.sync()
        if wait_idle_s > 0:
            wait_for_idle(wait_idle_s)
        sample = run_once(command)
        label = "warm-up" if k == 0 else f"run {k}/{runs}"
        log(
            f"  {case}: {label}: {sample.wall_s:.2f} s, {sample.peak_rss_kib / 1024:.0f} MiB, "
            f"other load {sample.other_cores:.2f} cores"
        )
        if sample.rc != 0:
            last = sample.stderr_tail.splitlines()[-1:] or [""]
            reason = f"exit {sample.rc}: {last[0]}"
            if optional and k == 0:
                result.unavailable = reason
            else:
                result.error = reason
            log(f"  {case}: {reason}")
            return result
        if k > 0:
            result.samples.append(sample)
    return result


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

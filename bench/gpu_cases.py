"""The GPU rows of the benchmark (run by ``bench/gpu.sh`` on a machine with CUDA).

Each case is a whole process of the real CLI on ``--device cuda``: wall time around the child,
and the peak GPU memory the child's torch allocated (``torch.cuda.max_memory_allocated``, read
in the child just before it exits). Writes a markdown table to ``--results``.

Usage: python bench/gpu_cases.py --results FILE [--only CASE ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import FULL, SLICE, ensure, ensure_finetune  # noqa: E402

BENCH = Path(__file__).resolve().parent
# Runs the CLI in this process, then writes the peak GPU memory it allocated to argv[1].
_CHILD = (
    "import sys, torch\n"
    "from safelora_cli.cli import main\n"
    "peak_file = sys.argv.pop(1)\n"
    "sys.argv[0] = 'safelora'\n"
    "code = 0\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as exc:\n"
    "    code = exc.code if isinstance(exc.code, int) else 1\n"
    "peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else -1\n"
    "open(peak_file, 'w').write(str(peak))\n"
    "sys.exit(code)\n"
)


def run(args: list[str]) -> tuple[int, float, float, str]:
    """(exit code, wall s, peak GPU MB, last stderr line) of ``safelora ARGS`` in a child."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(peak_file), *args],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - started
        peak = float(peak_file.read_text()) / 1e6 if peak_file.exists() else float("nan")
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return done.returncode, wall, peak, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    cache = BENCH / "cache"
    full, part = ensure(cache, FULL), ensure(cache, SLICE)
    finetune = ensure_finetune(part)
    out = cache / "gpu-out"
    pair22 = ["--base", str(full.base), "--aligned", str(full.aligned)]
    pair6 = ["--base", str(part.base), "--aligned", str(part.aligned)]
    cuda = ["--device", "cuda", "--quiet", "--force"]
    cases = [
        ("patch-22", "patch 22-layer (154 modules, r16), cuda",
         ["patch", str(full.adapter), *pair22, "-o", str(out / "patch-22"), *cuda]),
        ("subspace-22", "patch 22-layer `--projection subspace --rank 16`, cuda",
         ["patch", str(full.adapter), *pair22, "-o", str(out / "sub-22"), *cuda,
          "--projection", "subspace", "--rank", "16"]),
        ("profile-22", "profile the 22-layer pair (default `--tolerance`), cuda",
         ["profile", *pair22, "-o", str(out / "profile-22.safetensors"), *cuda]),
        ("full-6", "full fine-tune, 6-layer (42 weights), paper, cuda",
         ["patch", str(finetune), *pair6, "-o", str(out / "full-6"), *cuda]),
    ]  # fmt: skip
    rows = []
    for key, label, argv in cases:
        if args.only and key not in args.only:
            continue
        run(argv)  # warm-up: page cache, CUDA context
        rc, wall, peak, last = run(argv)
        print(f"{key}: rc {rc}, {wall:.2f} s, peak GPU {peak:.0f} MB  {last}", flush=True)
        note = "" if rc == 0 else f"exit {rc}: {last}".replace("|", "/")
        rows.append(f"| {label} | {wall:.2f} | {peak:.0f} | {note} |")
    import torch

    lines = [
        "## GPU",
        "",
        f"`bench/gpu.sh` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}. Whole processes, one "
        "warm-up then one measured run; peak GPU memory is `torch.cuda.max_memory_allocated`.",
        "",
        "| case | wall s | peak GPU MB | note |",
        "|---|---:|---:|---|",
        *rows,
        "",
    ]
    args.results.write_text("\n".join(lines), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make bench-7b``: the Llama-2-7B shape, measured (opt-in: never in CI or ``make test``).

Builds, streamed shard by shard (memory about one shard), a seeded Llama-2-7B-shaped bf16 pair
(32 layers, hidden 4096, intermediate 11008, 32 heads, vocab 32000; 13.5 GB each), a full
fine-tune of the aligned model and an r16 adapter on the 7 projections of every layer, then
measures as whole processes, with peak RSS: patch (paper, subspace), making a profile, score
through it, ``--merge``, a full fine-tune through the profile and a full fine-tune on the pair
(the first ``--full-layers`` layers only, extrapolated to 32 and said so).

The pair, the fine-tune and the outputs need about 60 GB: the free disk is checked first. What
was built is removed at the end unless ``--keep``; a kept build is reused by the next run.

Usage: python bench/bench_7b.py [--dir DIR] [--keep] [--only CASE ...] [--full-layers N]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import log, run_once  # noqa: E402
from results import machine  # noqa: E402
from safelora_cli.synthetic import LlamaShape, all_modules, make_adapter  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHAPE = LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
LAYERS_PER_SHARD = 4
RANK = 16
NEED_BYTES = 60 * 10**9
FORMAT = 1


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def aligned(self) -> Path:
        return self.root / "aligned"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def profile(self) -> Path:
        return self.out / "profile.safetensors"


def shard_plan() -> list[list[str]]:
    """Tensor names per shard: LAYERS_PER_SHARD layers each; embeddings first, head last."""
    shapes = SHAPE.weight_shapes()
    shards: list[list[str]] = []
    for first in range(0, SHAPE.layers, LAYERS_PER_SHARD):
        layers = range(first, min(first + LAYERS_PER_SHARD, SHAPE.layers))
        prefixes = tuple(f"model.layers.{k}." for k in layers)
        shards.append([n for n in shapes if n.startswith(prefixes)])
    shards[0].insert(0, "model.embed_tokens.weight")
    shards[-1] += [n for n in shapes if n in ("model.norm.weight", "lm_head.weight")]
    return shards


def _triple(
    name: str, shape: tuple[int, ...], gen: torch.Generator, lean: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Base, aligned and fine-tuned values of one tensor, as ``synthetic`` builds them:
    V of rank 4 at 2 % scale; D of 1 % of ‖W_aligned‖ leaning towards V by ``lean``."""
    if len(shape) == 1:
        ones = torch.ones(shape, dtype=torch.bfloat16)
        return ones, ones, ones
    out, inp = shape
    w = torch.randn(shape, generator=gen) / math.sqrt(inp)
    v = torch.randn(out, 4, generator=gen) @ torch.randn(4, inp, generator=gen)
    v *= 0.02 / math.sqrt(4 * inp)
    aligned = w + v
    noise = torch.randn(shape, generator=gen)
    d = lean * v / max(float(v.norm()), 1e-30) + (1 - lean) * noise / float(noise.norm())
    d *= 0.01 * float(aligned.norm()) / max(float(d.norm()), 1e-30)
    return w.to(torch.bfloat16), aligned.to(torch.bfloat16), (aligned + d).to(torch.bfloat16)


def build(paths: Paths) -> None:
    """Write base, aligned and fine-tune shard by shard, then the adapter (reads V per module)."""
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(7)
    plan = shard_plan()
    shapes = SHAPE.weight_shapes()
    matrices = [n for n, s in shapes.items() if len(s) == 2]
    folders = (paths.base, paths.aligned, paths.finetune)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for k, names in enumerate(plan):
        shard = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        parts: tuple[dict[str, torch.Tensor], ...] = ({}, {}, {})
        for name in names:
            lean = (matrices.index(name) + 1) / (len(matrices) + 1) if name in matrices else 0.0
            for part, value in zip(parts, _triple(name, shapes[name], gen, lean), strict=True):
                part[name] = value
            total += parts[0][name].numel() * 2
            weight_map[name] = shard
        for folder, part in zip(folders, parts, strict=True):
            save_file(part, str(folder / shard), metadata={"format": "pt"})
        log(f"  shard {k + 1}/{len(plan)} written, {time.perf_counter() - started:.0f} s")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    config = SHAPE.hf_config(torch.bfloat16)
    for folder in folders:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    make_adapter(paths.adapter, paths.base, paths.aligned, all_modules(SHAPE), rank=RANK, seed=8)
    log(f"  pair, fine-tune and adapter built in {time.perf_counter() - started:.0f} s")


def cases(paths: Paths, full_layers: int) -> list[tuple[str, str, list[str], Path | None]]:
    """(key, label, command, output to remove afterwards) in the order they run."""
    cli = [str(Path(sys.executable).parent / "safelora")]
    pair = ["--base", str(paths.base), "--aligned", str(paths.aligned)]
    out = paths.out
    first = "|".join(str(k) for k in range(full_layers))
    return [
        ("patch", "patch, paper (224 modules, r16)",
         [*cli, "patch", str(paths.adapter), *pair, "-o", str(out / "patched"), "-q"],
         out / "patched"),
        ("subspace", "patch, `--projection subspace --rank 16`",
         [*cli, "patch", str(paths.adapter), *pair, "-o", str(out / "sub"), "-q",
          "--projection", "subspace", "--rank", "16"], out / "sub"),
        ("profile", "make the profile (default `--tolerance`)",
         [*cli, "profile", *pair, "-o", str(paths.profile), "-q"], None),
        ("score-profile", "score through the profile (no model read)",
         [*cli, "score", str(paths.adapter), "--profile", str(paths.profile), "-q"], None),
        ("merge", "patch `--merge` (a 13.5 GB model out)",
         [*cli, "patch", str(paths.adapter), *pair, "-o", str(out / "merged"), "-q", "--merge"],
         out / "merged"),
        ("full-profile", "full fine-tune through the profile (224 weights)",
         [*cli, "patch", str(paths.finetune), "--profile", str(paths.profile), "--aligned",
          str(paths.aligned), "-o", str(out / "ft-profile"), "-q"], out / "ft-profile"),
        ("full-pair", f"full fine-tune on the pair, layers 0–{full_layers - 1} only "
         f"({7 * full_layers} of 224 weights)",
         [*cli, "patch", str(paths.finetune), *pair, "-o", str(out / "ft-pair"), "-q",
          "--targets", rf"model\.layers\.({first})\..*_proj"], out / "ft-pair"),
    ]  # fmt: skip


Row = dict[str, Any]
"""One measured case: key, label, wall_s, rss_mb, other_cores, note, when, source."""


def render(rows: list[Row], full_layers: int, cmd: str) -> str:
    lines = [
        "# safelora at the Llama-2-7B shape",
        "",
        f"Generated by a real run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"`{cmd}` (what `make bench-7b` runs). Seeded synthetic bf16 pair of the Llama-2-7B "
        f"shape (32 layers, hidden 4096, intermediate 11008, vocab 32000; 13.5 GB each, "
        f"{len(shard_plan())} shards), a full fine-tune of the aligned model, and an r16 adapter "
        "on the 7 projections of every layer. Each case is one whole process "
        "(the pair does not fit in the page cache next to itself, so reads are mostly from "
        'disk); peak RSS from `/usr/bin/time -v`; "other load" is the CPU the rest of the '
        "machine used meanwhile (above ~0.3 cores the wall time is inflated). Cases may be "
        "measured in several sittings (`--only`, with `--keep`): each row says when, on which "
        "source.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine()],
        "",
        "## Results",
        "",
        "| case | wall s | peak RSS MB | other load (cores) | note | measured |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['wall_s']:.1f} | {row['rss_mb']:.0f} | "
            f"{row['other_cores']:.2f} | {row['note']} | {row['when']}, {row['source']} |"
        )
    lines += [
        "",
        f"The full fine-tune on the pair was measured on {full_layers} of 32 layers; the "
        "extrapolated whole-model time in its note is that wall time minus start-up, × "
        f"{32 / full_layers:g}, plus start-up: an extrapolation, not a measurement.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=BENCH / "cache" / "llama-7b")
    parser.add_argument(
        "--keep", action="store_true", help="keep what was built (reused next time)"
    )
    parser.add_argument("--only", nargs="*", help="these cases only")
    parser.add_argument("--full-layers", type=int, default=2)
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS-7B.md")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape: checks the script")
    args = parser.parse_args(argv)
    if args.tiny:
        global SHAPE, NEED_BYTES
        SHAPE, NEED_BYTES = LlamaShape(layers=4, hidden=256, intermediate=512, heads=4), 0
    paths = Paths(args.dir.resolve())
    stamp = paths.root / "SPEC.json"
    spec = {"format": FORMAT, "shape": SHAPE.__dict__, "rank": RANK}
    built = stamp.is_file() and json.loads(stamp.read_text()) == spec
    paths.root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(paths.root).free
    if not built and free < NEED_BYTES:
        log(f"error: {free / 1e9:.0f} GB free at {paths.root}; the 7B bench needs "
            f"{NEED_BYTES / 1e9:.0f} GB (the pair, a fine-tune and the outputs)")  # fmt: skip
        return 6
    try:
        if not built:
            shutil.rmtree(paths.root)
            log(f"building the 7B shape in {paths.root} ({free / 1e9:.0f} GB free)")
            build(paths)
            stamp.write_text(json.dumps(spec))
        paths.out.mkdir(exist_ok=True)
        store = args.results.with_suffix(".json")
        saved: dict[str, Row] = json.loads(store.read_text()) if store.is_file() else {}
        source = dict(machine())["source"]
        startup: float | None = saved.get("score-profile", {}).get("wall_s")
        for key, label, command, output in cases(paths, args.full_layers):
            if args.only and key not in args.only:
                continue
            log(f"{key}: {' '.join(command)}")
            sample = run_once(command)
            mib = sample.peak_rss_kib / 1024
            log(f"  {key}: rc {sample.rc}, {sample.wall_s:.1f} s, {mib:.0f} MiB, "
                f"other load {sample.other_cores:.2f}")  # fmt: skip
            note = "" if sample.rc == 0 else f"exit {sample.rc}: {sample.stderr_tail[-200:]}"
            if key == "score-profile" and sample.rc in (0, 1):
                startup = sample.wall_s  # an upper bound on start-up: it reads no model
                note = ""
            if key == "full-pair" and sample.rc == 0:
                base = startup or 0.0
                whole = base + (sample.wall_s - base) * SHAPE.layers / args.full_layers
                note = (
                    f"extrapolated to {SHAPE.layers} layers: ≈ {whole / 60:.0f} min (not measured)"
                )
            saved[key] = {
                "label": label, "wall_s": sample.wall_s, "other_cores": sample.other_cores,
                "rss_mb": sample.peak_rss_kib * 1024 / 1e6,
                "note": note.replace("|", "/").replace("\n", " "),
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "source": source,
            }  # fmt: skip
            store.write_text(json.dumps(saved, indent=1), encoding="utf-8")
            if output is not None:
                shutil.rmtree(output, ignore_errors=True)
        cmd = " ".join(["python bench/bench_7b.py", *(argv if argv is not None else sys.argv[1:])])
        order = [key for key, *_ in cases(paths, args.full_layers)]
        rows = [saved[key] for key in order if key in saved]
        args.results.write_text(render(rows, args.full_layers, cmd), encoding="utf-8")
        log(f"wrote {args.results}")
    finally:
        if not args.keep:
            shutil.rmtree(paths.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())

"""Bench fixtures: seeded synthetic TinyLlama-1.1B-shaped model pairs and adapters, built once.

Everything comes from ``safelora_cli.synthetic`` (the factory the tests and the demo use). Each
fixture lives in ``bench/cache/<name>/`` with a ``SPEC.json`` stamp; it is rebuilt only when the
stamp is missing or differs (a changed spec, or an interrupted build: the folder is built under a
temporary name and renamed into place when complete).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from safelora_cli.synthetic import (
    FineTuneSpec,
    LlamaShape,
    PairSpec,
    all_modules,
    make_adapter,
    make_full_finetune,
    make_pair,
)

FORMAT = 1  # bump to force a rebuild of every cached fixture
BATCH_SIZE = 8
RANK = 16


def tinyllama(layers: int) -> LlamaShape:
    """TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 32/4 heads, vocab 32000)."""
    return LlamaShape(
        hidden=2048, intermediate=5632, layers=layers, heads=32, kv_heads=4, vocab=32000
    )


@dataclass(frozen=True)
class Fixture:
    """A base/aligned pair, one adapter on it, and optionally a batch of adapters."""

    name: str
    layers: int
    shards: int
    seed: int
    batch: int = 0

    @property
    def shape(self) -> LlamaShape:
        return tinyllama(self.layers)

    def stamp(self) -> dict[str, object]:
        return {"format": FORMAT, "rank": RANK, **asdict(self), "shape": asdict(self.shape)}


@dataclass(frozen=True)
class Built:
    """Paths of a built fixture."""

    root: Path
    base: Path
    aligned: Path
    adapter: Path
    batch: list[Path]
    modules: list[str]

    def size_bytes(self, which: str) -> int:
        folder = getattr(self, which)
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))

    def shards(self) -> list[Path]:
        """The base and aligned shard files (what the read floor reads)."""
        return sorted(self.base.glob("*.safetensors")) + sorted(self.aligned.glob("*.safetensors"))


FULL = Fixture("tinyllama-22", layers=22, shards=4, seed=0)
SLICE = Fixture("tinyllama-6", layers=6, shards=2, seed=10, batch=BATCH_SIZE)


def _paths(root: Path, fixture: Fixture) -> Built:
    batch = [root / "batch" / f"adapter-{k + 1}" for k in range(fixture.batch)]
    modules = all_modules(fixture.shape)
    return Built(root, root / "base", root / "aligned", root / "adapter", batch, modules)


def _build(root: Path, fixture: Fixture) -> None:
    spec = PairSpec(
        shape=fixture.shape, dtype=torch.bfloat16, shards=fixture.shards, seed=fixture.seed
    )
    started = time.perf_counter()
    base, aligned = make_pair(root, spec)
    _log(f"  {fixture.name}: pair built in {time.perf_counter() - started:.0f} s")
    modules = all_modules(fixture.shape)
    make_adapter(root / "adapter", base, aligned, modules, rank=RANK, seed=fixture.seed + 1)
    for k in range(fixture.batch):
        folder = root / "batch" / f"adapter-{k + 1}"
        make_adapter(folder, base, aligned, modules, rank=RANK, seed=fixture.seed + 100 + k)
    _log(f"  {fixture.name}: adapters built, {time.perf_counter() - started:.0f} s in all")


def ensure(cache: Path, fixture: Fixture) -> Built:
    """The fixture's paths, building it first unless a matching one is cached."""
    root = cache / fixture.name
    stamp_file = root / "SPEC.json"
    stamp = fixture.stamp()
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return _paths(root, fixture)
    _log(f"building {fixture.name} in {root} (once; cached afterwards)")
    staging = cache / f".{fixture.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with torch.inference_mode():
        _build(staging, fixture)
    (staging / "SPEC.json").write_text(json.dumps(stamp, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return _paths(root, fixture)


def ensure_finetune(built: Built, shards: int = 2) -> Path:
    """A full fine-tune of the fixture's aligned model (``synthetic.make_full_finetune``, bf16,
    every 2-D weight changed by 1% of its norm), built once into ``<fixture>/finetune``."""
    folder = built.root / "finetune"
    if (folder / "config.json").is_file():
        return folder
    staging = built.root / ".finetune.building"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    with torch.inference_mode():
        make_full_finetune(staging, built.base, built.aligned, FineTuneSpec(shards=shards))
    staging.rename(folder)
    _log(f"  {built.root.name}: full fine-tune built in {time.perf_counter() - started:.0f} s")
    return folder


def ensure_linked_batch(built: Built, count: int) -> list[Path]:
    """``count`` copies of the fixture's adapter, hard-linked (no disk, the same bytes: what
    each is patched to must be what the adapter alone is), built once into
    ``<fixture>/linked-<count>``."""
    root = built.root / f"linked-{count}"
    folders = [root / f"adapter-{k + 1}" for k in range(count)]
    if all((folder / "adapter_config.json").is_file() for folder in folders):
        return folders
    staging = built.root / f".linked-{count}.building"
    shutil.rmtree(staging, ignore_errors=True)
    for folder in folders:
        shutil.copytree(built.adapter, staging / folder.name, copy_function=os.link)
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return folders


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":  # build the fixtures only: python bench/fixtures.py
    target = Path(__file__).resolve().parent / "cache"
    for item in (SLICE, FULL):
        print(ensure(target, item).root)

"""Seeded fixture factory: small synthetic base/aligned/adapter trios, built per test, nothing
downloaded. Every builder is in ``safelora_cli.synthetic`` (shared with ``make demo`` and bench).

Hypothesis runs derandomized and without its example database, so that every run (a CI job, a
laptop) tries the same examples and a failure reproduces; ``HYPOTHESIS_PROFILE=explore`` draws
fresh random examples instead, for a local bug hunt.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from hypothesis import settings
from typer.testing import Result

from safelora_cli.synthetic import (
    ALL_PROJ,
    LlamaShape,
    PairSpec,
    all_modules,
    make_adapter,
    make_pair,
)
from tests.helpers import invoke

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class Trio:
    """A base/aligned pair and an adapter trained (synthetically) on it."""

    root: Path
    base: Path
    aligned: Path
    adapter: Path
    shape: LlamaShape
    modules: list[str]

    def patch_args(self, output: Path, *extra: str) -> list[str]:
        return ["patch", str(self.adapter), "--base", str(self.base),
                "--aligned", str(self.aligned), "--output", str(output), *extra]  # fmt: skip


TrioFactory = Callable[..., Trio]


@pytest.fixture
def make_trio(tmp_path: Path) -> TrioFactory:
    """Build a trio under tmp_path. Keyword arguments go to PairSpec / make_adapter.

    Example: ``make_trio(dtype=torch.bfloat16, shards=2, projs=("q_proj", "v_proj"), rank=4)``
    """
    counter = iter(range(1000))

    def build(
        shape: LlamaShape | None = None,
        dtype: torch.dtype = torch.float32,
        adapter_dtype: torch.dtype | None = None,
        shards: int = 1,
        seed: int = 0,
        projs: Iterable[str] = ALL_PROJ,
        rank: int = 4,
        identical: tuple[str, ...] = (),
        key_prefix: str = "base_model.model.",
        adapter_name: str = "",
    ) -> Trio:
        shape = shape or LlamaShape()
        root = tmp_path / f"trio{next(counter)}"
        spec = PairSpec(shape=shape, dtype=dtype, shards=shards, seed=seed, identical=identical)
        base, aligned = make_pair(root, spec)
        modules = all_modules(shape, projs)
        adapter = make_adapter(
            root / "adapter", base, aligned, modules, rank=rank,
            dtype=adapter_dtype or dtype, seed=seed + 1,
            key_prefix=key_prefix, adapter_name=adapter_name,
        )  # fmt: skip
        return Trio(root, base, aligned, adapter, shape, modules)

    return build


@pytest.fixture
def trio(make_trio: TrioFactory) -> Trio:
    """The default trio: fp32, single file, 2 layers, all seven projections, rank 4."""
    return make_trio()


@pytest.fixture
def cli() -> Callable[..., Result]:
    """Run the CLI in-process; ``result.stdout`` and ``result.stderr`` are separate."""
    return invoke


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline hub cache under tmp_path; the working directory holds no ``org/`` folder."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache

"""A batch holds about one weight's factors at once, whatever its size, and its outputs are the
bytes each adapter gets alone: projected B's wait in a scratch file (``runs/keep.py``), and
each weight's modules are scored a part at a time (``adapters.FACTOR_FLOOR``)."""

from __future__ import annotations

import json
import shutil
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from safelora_cli import Settings, patch, patch_many, score_many
from safelora_cli.math.projection import ModuleScore
from safelora_cli.runs import adapters as adapter_runs
from safelora_cli.runs.keep import Drop, InMemory, Spill
from safelora_cli.sources.stream import WORKERS
from safelora_cli.synthetic import make_adapter
from tests.conftest import Trio, TrioFactory
from tests.helpers import CONFIG, WEIGHTS, leftovers


class LiveBytes:
    """Bytes of the tensors handed to ``track`` still alive, and the most there were at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            self.now += size
            self.peak = max(self.peak, self.now)
        weakref.finalize(tensor, self._free, size)
        return tensor

    def _free(self, size: int) -> None:
        with self._lock:
            self.now -= size


def watch_factors(monkeypatch: pytest.MonkeyPatch) -> LiveBytes:
    """Track every factor the adapters' scoring reads and every projected B it makes."""
    live = LiveBytes()
    real_read, real_projector = adapter_runs.read_factor, adapter_runs.projector

    def read_factor(*args: Any) -> torch.Tensor:
        return live.track(real_read(*args))

    def projector(*args: Any) -> Any:
        scorer = real_projector(*args)

        def scores(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[ModuleScore]:
            found = scorer(factors)
            for score in found:
                if score.projected_b is not None:
                    live.track(score.projected_b)
            return found

        return scores

    monkeypatch.setattr(adapter_runs, "read_factor", read_factor)
    monkeypatch.setattr(adapter_runs, "projector", projector)
    return live


def copies(adapter: Path, root: Path, count: int) -> list[Path]:
    """``count`` copies of one adapter folder, hard-linked (as the bench's batch of 100)."""
    made = []
    for k in range(count):
        folder = root / f"copy-{k}"
        shutil.copytree(adapter, folder, copy_function=lambda s, d: Path(d).hardlink_to(s))
        made.append(folder)
    return made


def weight_bytes(trio: Trio) -> int:
    """The largest V of the trio's weights, float32."""
    return max(out * inp * 4 for out, inp in map(trio.shape.proj_shape, ("gate_proj", "o_proj")))


def projected_bytes(trio: Trio, rank: int) -> int:
    """One adapter's projected B's (float32), every module."""
    return sum(trio.shape.proj_shape(m.rsplit(".", 1)[1])[0] * rank * 4 for m in trio.modules)


def test_a_batch_holds_about_one_weight_of_factors_whatever_its_size(
    make_trio: TrioFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty-four adapters: every one's projected B's at once would be ~30x one weight's V;
    the batch holds at most one weight's worth of factors per weight in flight."""
    trio = make_trio(rank=8)
    batch = copies(trio.adapter, tmp_path / "batch", 24)
    monkeypatch.setattr(adapter_runs, "FACTOR_FLOOR", 0)  # parts as small as the weights
    live = watch_factors(monkeypatch)
    patch_many(batch, trio.base, trio.aligned, tmp_path / "out", Settings(num_layers=3))
    bound = WORKERS * weight_bytes(trio)
    assert 24 * projected_bytes(trio, 8) > 8 * bound  # what holding them all would take
    assert 0 < live.peak <= bound
    assert live.now == 0
    assert leftovers(tmp_path) == []  # the scratch file has no name, and is gone


def test_scoring_a_batch_keeps_no_projected_b(
    make_trio: TrioFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``score`` writes nothing: each projected B is dropped as soon as it is scored."""
    trio = make_trio(rank=8)
    batch = copies(trio.adapter, tmp_path / "batch", 24)
    monkeypatch.setattr(adapter_runs, "FACTOR_FLOOR", 0)
    live = watch_factors(monkeypatch)
    results = score_many(batch, trio.base, trio.aligned, Settings(num_layers=3))
    assert len({json.dumps(r.report["modules"]) for r in results}) == 1  # the same adapter
    assert 0 < live.peak <= WORKERS * weight_bytes(trio)
    assert live.now == 0


@pytest.mark.parametrize(
    "settings",
    [
        Settings(num_layers=3),
        Settings(select="threshold", threshold=0.6, projection="subspace", rank=3),
    ],
    ids=["paper-number", "subspace-threshold"],
)
def test_a_batch_scored_in_parts_writes_what_each_adapter_gets_alone(
    trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    others = [
        make_adapter(
            tmp_path / f"other-{seed}", trio.base, trio.aligned, trio.modules, rank=rank, seed=seed
        )  # fmt: skip
        for seed, rank in ((7, 4), (8, 2), (9, 6), (10, 4))
    ]
    adapters = [trio.adapter, *others, *copies(trio.adapter, tmp_path / "copies", 2)]
    monkeypatch.setattr(adapter_runs, "FACTOR_FLOOR", 0)
    results = patch_many(adapters, trio.base, trio.aligned, tmp_path / "batch", settings)
    assert any(r.report["summary"]["projected"] for r in results)
    for adapter, result in zip(adapters, results, strict=True):
        alone = patch(adapter, trio.base, trio.aligned, tmp_path / f"alone-{adapter.name}",
                      settings)  # fmt: skip
        assert result.output is not None
        assert (result.output / WEIGHTS).read_bytes() == (alone.output / WEIGHTS).read_bytes()
        assert (result.output / CONFIG).read_bytes() == (alone.output / CONFIG).read_bytes()
        assert result.report["modules"] == alone.report["modules"]


def test_a_batch_merge_writes_what_each_adapter_merges_alone(trio: Trio, tmp_path: Path) -> None:
    second = make_adapter(tmp_path / "second", trio.base, trio.aligned, trio.modules, seed=7)
    settings = Settings(num_layers=4)
    results = patch_many([trio.adapter, second], trio.base, trio.aligned, tmp_path / "batch",
                         settings, merge=True)  # fmt: skip
    for adapter, result in zip([trio.adapter, second], results, strict=True):
        alone = patch(adapter, trio.base, trio.aligned, tmp_path / f"alone-{adapter.name}",
                      settings, merge=True)  # fmt: skip
        assert result.output is not None
        assert alone.output is not None
        for shard in sorted(alone.output.glob("*.safetensors")):
            assert (result.output / shard.name).read_bytes() == shard.read_bytes()


def score_of(projected: torch.Tensor | None) -> ModuleScore:
    return ModuleScore(0.5, projected, 1.0, 2.0, 1.5, 0.3)


@pytest.mark.parametrize("keep_kind", ["spill", "memory"])
def test_kept_projected_bs_come_back_bit_for_bit(tmp_path: Path, keep_kind: str) -> None:
    keep = Spill(tmp_path) if keep_kind == "spill" else InMemory()
    values = {(i, f"m{i}"): torch.randn(5 + i, 3, generator=torch.Generator().manual_seed(i))
              for i in range(4)}  # fmt: skip
    kept = {key: keep.put(*key, score_of(value)) for key, value in values.items()}
    assert keep.put(9, "skipped", score_of(None)).projected_b is None
    for key, value in values.items():
        assert torch.equal(keep.take(*key), value)  # type: ignore[arg-type]
        assert kept[key].cosine == 0.5
        assert (kept[key].projected_b is None) == (keep_kind == "spill")
    assert keep.take(9, "skipped") is None
    assert keep.take(0, "unknown") is None
    keep.close()
    assert list(tmp_path.iterdir()) == []  # the scratch file never had a name there


def test_score_keeps_no_projected_b() -> None:
    assert Drop().put(0, "m", score_of(torch.ones(2, 2))).projected_b is None
    assert Drop().take(0, "m") is None

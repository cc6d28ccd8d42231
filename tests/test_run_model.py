"""The run model's extension point: a new source of V is a class that follows ``Source``,
handed to ``run.score`` and ``run.report`` like the two built in (``PairSource``,
``ProfileSource``); nothing else of the run changes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from safelora_cli import Settings
from safelora_cli.api import make_profile, score
from safelora_cli.errors import UsageError
from safelora_cli.math.lowrank import LowRank, RankRule
from safelora_cli.notices import Notices
from safelora_cli.runs import run as runs
from safelora_cli.runs.adapters import AdapterUpdate, load_adapters
from safelora_cli.runs.kinds import Written
from safelora_cli.runs.pair_source import PairSource
from safelora_cli.runs.profile_source import ProfileSource
from safelora_cli.runs.source import Source, Weight
from safelora_cli.sources.profile import load_entry
from tests.conftest import Trio

CPU = torch.device("cpu")


class ServedProfile(ProfileSource):
    """A profile whose entries come from elsewhere (here a dict, as a cache of entries fetched
    over HTTP would hold them); its header and metadata are the file's."""

    def __init__(self, base: ProfileSource, entries: dict[str, LowRank]) -> None:
        super().__init__(base.profile_input, base.profile)
        self.entries = entries
        self.served: list[str] = []

    def stream(self, weights: Sequence[Weight], device: torch.device) -> Iterator[LowRank]:
        for weight in weights:
            self.served.append(weight.name)
            yield self.entries[weight.name]


def scored_reports(source: Source, trio: Trio, settings: Settings) -> list[dict[str, object]]:
    notices = Notices()
    loaded = load_adapters([trio.adapter], settings, notices)
    update = AdapterUpdate.pair(loaded, source, settings, notices)
    run = runs.Run(update, source, settings, notices, Written.NOTHING)
    return [runs.report(run, s, CPU, None) for s in runs.score(run, CPU)]


def test_a_new_source_of_v_scores_through_the_same_run(trio: Trio, tmp_path: Path) -> None:
    path = tmp_path / "pair.safetensors"
    make_profile(trio.base, trio.aligned, path, RankRule(rank=8, tolerance=None))
    settings = Settings(num_layers=3)
    on_file = ProfileSource.open(path, None, Notices())
    served = ServedProfile(
        on_file, {w: load_entry(on_file.profile, w) for w in on_file.profile.weights}
    )
    [want] = scored_reports(on_file, trio, settings)
    [got] = scored_reports(served, trio, settings)
    assert got == want
    assert sorted(served.served) == sorted({f"{m}.weight" for m in trio.modules})
    assert want == score(trio.adapter, None, None, settings, profile=path).report


def test_the_model_pair_source_is_what_patch_and_score_use(trio: Trio) -> None:
    settings = Settings(num_layers=3)
    pair = PairSource.open(trio.base, trio.aligned, None, Notices())
    [report] = scored_reports(pair, trio, settings)
    assert report == score(trio.adapter, trio.base, trio.aligned, settings).report


def test_a_profile_cannot_write_a_merged_model(trio: Trio, tmp_path: Path) -> None:
    """What is written must suit the source: a merge needs the aligned model's weights."""
    path = tmp_path / "p.safetensors"
    make_profile(trio.base, trio.aligned, path, RankRule(rank=4, tolerance=None))
    request = runs.Request([trio.adapter], None, None, path, Settings(), Written.MERGED)
    with pytest.raises(UsageError, match="--merge needs the aligned model's weights"):
        runs.prepare(request, full=False)

"""The run model's vocabulary: what is patched (an ``Update``: LoRA adapters or a full model),
what each patched input reports (``Target``), how it scored (``Scored``), and what is written.

A run is an update kind × a source of V (``source.Source``) × what is written (``Written``);
``run.py`` takes every combination through the same steps. A new update kind is one class that
follows ``Update`` (its pairing through the source, its kernel in ``math/``, its writer), and
one line in ``run.prepare``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import torch

from safelora_cli.inputs.resolve import ResolvedInput
from safelora_cli.math.projection import ModuleScore
from safelora_cli.notices import Notices
from safelora_cli.output.writer import OutputFolder
from safelora_cli.runs.keep import Keep
from safelora_cli.runs.source import Source
from safelora_cli.settings import Settings

CARD_SKIP = frozenset({"README.md"})  # output.card.CARD_NAME: written last, never copied
ProgressFn = Callable[[int, int, str], None]
"""Called as ``progress(bytes_done, bytes_total, weight)`` after each weight is processed: the
bytes read so far (model weights, or profile entries), of all there are to read."""


class Written(Enum):
    """What a run writes; the value is the model card's kind."""

    NOTHING = "nothing"  # score
    ADAPTER = "adapter"  # the patched adapter
    MERGED = "merged"  # the model the patched adapter makes (W_aligned + s · B' A)
    MODEL = "full"  # the patched full model (W_aligned + P D)


@dataclass(frozen=True)
class Module:
    """One module as the report lists it: where it is and its layout."""

    name: str
    weight: str
    shape: tuple[int, int]  # (out, in)
    rank: int | None  # None for a full fine-tune's weight
    tied: bool = False
    transposed: bool = False


@dataclass(frozen=True)
class Target:
    """One patched input (an adapter, or a full model) and its modules.

    ``notices`` files what is found about it: scoped to it in a batch of adapters, so that each
    report lists its own.
    """

    input: ResolvedInput
    modules: tuple[Module, ...]
    notices: Notices
    passthrough: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scored:
    """One target after scoring and selection: what the report and the writer need.

    ``index``: the target's position in the run; ``uncertain``: modules the source's bounds
    leave open (through a profile).
    """

    index: int
    target: Target
    scores: dict[str, ModuleScore]
    selected: set[str]
    threshold_used: float | None
    uncertain: frozenset[str] = frozenset()


class Update(Protocol):
    """What is patched: ``AdapterUpdate`` (LoRA adapters) or ``FullUpdate`` (a full model)."""

    kind: str
    """The report's ``kind``: "adapter" or "full"."""
    writes: frozenset[Written]
    """What this kind can write (besides nothing)."""

    @property
    def targets(self) -> Sequence[Target]: ...

    def local_inputs(self) -> list[Path]:
        """Local folders read (an output must not overwrite them)."""
        ...

    def inputs(self, source: Source, target: Target) -> dict[str, Any]:
        """The report's ``inputs`` for ``target``."""
        ...

    def score(
        self,
        source: Source,
        settings: Settings,
        device: torch.device,
        progress: ProgressFn | None,
        keep: Keep,
    ) -> list[dict[str, ModuleScore]]:
        """For each target, module name -> score: one pass over the source's weights; what
        the writer needs beyond the scores (the projected B's) goes to ``keep``."""
        ...

    def write(
        self,
        written: Written,
        source: Source,
        scored: Scored,
        out: OutputFolder,
        device: torch.device,
    ) -> None:
        """Write ``scored``'s patched input into ``out`` (the card and report come after)."""
        ...

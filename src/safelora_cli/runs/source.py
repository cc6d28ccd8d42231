"""Where V comes from: one interface over the model pair and an alignment profile.

A run asks its source three things: to record what it was made from (the report's ``inputs``,
the provenance checks), to pair the modules being patched with its weights (by name and shape,
every problem at once, headers only), and, in the source's reading order, for the alignment of
each weight the run needs: ``Dense`` (V itself, streamed from the model pair) or ``LowRank`` (a
profile entry: U_k, σ and the tail bound). The update kind's kernel takes either form
(``adapters.score_factors``, ``fullmodel.score_weight``).

A new source (say, a profile served over HTTP) is one class that follows ``Source``, beside
``pair_source`` and ``profile_source``, and one line in ``run.open_source``; if it yields one of
the two forms, no kernel changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from safelora_cli.inputs.adapter import Adapter, LoraModule
from safelora_cli.inputs.full_targets import FullPair, Targets
from safelora_cli.inputs.index import TensorIndex, TensorInfo
from safelora_cli.inputs.resolve import ResolvedInput
from safelora_cli.math.lowrank import LowRank
from safelora_cli.math.projection import ModuleScore
from safelora_cli.notices import Notices
from safelora_cli.settings import Settings

PathLike = str | Path
T = TypeVar("T")


@dataclass(frozen=True)
class Dense:
    """V = W_aligned − W_base of one weight, float32, as the base model stores it ((out, in), or
    (in, out) for a Conv1D weight); ``norm`` is ‖V‖_F. Valid only while it is being used: the
    stream reuses its buffer."""

    v: torch.Tensor
    norm: float


Alignment = Dense | LowRank
"""What a source gives for one weight: V itself, or a profile entry (module orientation)."""


@dataclass(frozen=True)
class Weight:
    """One weight a run needs the alignment of: its name (a profile's key), and where the model
    pair stores it (``base`` and ``aligned``; None through a profile)."""

    name: str
    base: TensorInfo | None = None
    aligned: TensorInfo | None = None


@dataclass(frozen=True)
class AdapterModule:
    """One LoRA module paired with the source's weight it adapts.

    ``transpose``: the weight is stored (in, out) (a Conv1D layer, a ``fan_in_fan_out``
    adapter); ``tied``: lm_head paired with the input embedding of a tied model.
    """

    lora: LoraModule
    weight: Weight
    transpose: bool
    tied: bool = False

    @property
    def name(self) -> str:
        return self.lora.module

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the module, as lora_B @ lora_A."""
        return (self.lora.b.shape[0], self.lora.a.shape[1])


AlignedFn = Callable[[Weight, Alignment], T]
"""Called as ``fn(weight, alignment)``, possibly in a worker thread; a ``Dense`` V is valid only
during the call."""


class Source(Protocol):
    """Where V comes from (``PairSource``: the model pair; ``ProfileSource``: a profile)."""

    bounded: bool
    """Whether scores carry error bounds, so that the selection's cut is checked against them."""

    def inputs(self) -> dict[str, Any]:
        """The report's ``inputs`` for the source: ``base``, ``aligned`` (and ``profile``)."""
        ...

    def local_inputs(self) -> list[Path]:
        """Local folders and files read (an output must not overwrite them)."""
        ...

    def trained_on(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What the base and aligned models are (``describe()``): what a patched input's
        config is checked against (``provenance.check_adapter``)."""
        ...

    def check_aligned(self, aligned: ResolvedInput, notices: Notices) -> None:
        """A full fine-tune's aligned model (D = W_ft − W_aligned) against the source's."""
        ...

    def pair_adapter(self, adapter: Adapter, notices: Notices) -> list[AdapterModule]:
        """Pair each adapter module with its weight, every problem at once."""
        ...

    def pair_full(
        self, model: TensorIndex, aligned: TensorIndex, targets: Targets, model_type: str | None
    ) -> list[FullPair]:
        """Pair a full fine-tune's targeted weights (``base`` set from the model pair, None
        through a profile), and check that the source covers them."""
        ...

    def order(self, weights: Sequence[Weight]) -> list[Weight]:
        """``weights`` in the order this source reads them fastest."""
        ...

    def read_bytes(self, weight: Weight) -> int:
        """The bytes read for ``weight``'s alignment (for progress)."""
        ...

    def map(self, weights: Sequence[Weight], device: torch.device, fn: AlignedFn[T]) -> Iterator[T]:
        """``fn(weight, alignment)`` for each weight, results yielded in order."""
        ...

    def stream(self, weights: Sequence[Weight], device: torch.device) -> Iterator[Alignment]:
        """Each weight's alignment in order, in the caller's thread; each is valid until the
        next is requested."""
        ...

    def uncertain(
        self,
        settings: Settings,
        scores: dict[str, ModuleScore],
        selected: set[str],
        notices: Notices,
    ) -> frozenset[str]:
        """The modules whose selection the bounds leave open (none for exact scores)."""
        ...

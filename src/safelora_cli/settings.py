"""Settings: what a run computes, in one place, without torch.

``Settings`` holds the selection, projection and device options with their defaults (those of the
official code) and validates them. ``OPTIONS`` describes every option a run takes (the settings
and the inputs: models, preset, revision) once; the CLI flags (``cli/_options.py``), the keys of
``--config`` run files and presets (``config.py``) and the report's ``settings`` all come from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from safelora_cli.errors import UsageError


class Select(str, Enum):
    """Which modules to project: the K lowest cosines, or every cosine at most T."""

    NUMBER = "number"
    THRESHOLD = "threshold"

    def __str__(self) -> str:
        return self.value


class Projection(str, Enum):
    """The projector: the paper's Ĉ = V Vᵀ/‖V‖_F, or U_k U_kᵀ (top-k left singular vectors)."""

    PAPER = "paper"
    SUBSPACE = "subspace"

    def __str__(self) -> str:
        return self.value


DEFAULT_NUM_LAYERS = 10
DEFAULT_THRESHOLD = 0.5
PROFILE_TOLERANCE = 0.01  # `safelora profile`'s rank rule (lowrank.RankRule), kept torch-free
PROFILE_MAX_RANK = 256


@dataclass(frozen=True)
class ProjectionSpec:
    """Which projector P to use: the paper's Ĉ, or U_k U_kᵀ with k from ``rank`` or ``energy``."""

    kind: Projection = Projection.PAPER
    rank: int | None = None
    energy: float | None = None


def _choice(enum: type[Select] | type[Projection], value: Any, flag: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(repr(member.value) for member in enum)
        raise UsageError(f"{flag} {value!r} is not one of {choices}") from None


@dataclass(frozen=True)
class Settings:
    """What to compute: selection, projection and device. Defaults follow the official code.

    Strings are accepted for ``select`` and ``projection`` (``Settings(select="threshold")``);
    every value is checked on construction (UsageError, exit 2).
    """

    select: Select = Select.NUMBER
    num_layers: int = DEFAULT_NUM_LAYERS
    threshold: float = DEFAULT_THRESHOLD
    projection: Projection = Projection.PAPER
    rank: int | None = None
    energy: float | None = None
    device: str = "auto"
    adapter_name: str | None = None
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "select", _choice(Select, self.select, "--select"))
        object.__setattr__(self, "targets", tuple(self.targets or ()))
        object.__setattr__(self, "projection", _choice(Projection, self.projection, "--projection"))
        # checked whichever --select uses them: a value out of range is a mistake either way
        if not -1.0 <= self.threshold <= 1.0:
            raise UsageError(
                f"--threshold {self.threshold} is outside [-1, 1]", "a cosine lies in [-1, 1]"
            )
        if self.num_layers < 1:
            raise UsageError(
                f"--num-layers {self.num_layers} must be at least 1",
                "pick K between 1 and the number of modules, or use --select threshold",
            )
        self._check_projection()

    def _check_projection(self) -> None:
        if self.projection is Projection.PAPER:
            if self.rank is not None or self.energy is not None:
                raise UsageError("--rank/--energy apply to --projection subspace only")
            return
        if (self.rank is None) == (self.energy is None):
            raise UsageError("--projection subspace needs one of --rank K or --energy E")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--rank {self.rank} must be at least 1")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise UsageError(f"--energy {self.energy} must be in (0, 1]")

    def check_modules(self, modules: int) -> None:
        """Refuse a K that an adapter with ``modules`` LoRA modules cannot satisfy."""
        if self.select is Select.NUMBER and self.num_layers > modules:
            raise UsageError(
                f"--num-layers {self.num_layers} is outside 1..{modules} "
                f"(the adapter has {modules} LoRA modules)",
                "pick K between 1 and the number of modules, or use --select threshold",
            )

    @property
    def projection_spec(self) -> ProjectionSpec:
        return ProjectionSpec(self.projection, self.rank, self.energy)

    def describe(self, device: str) -> dict[str, Any]:
        """The report's ``settings``: every field, the unused one of K and T as null."""
        described = {key: str(v) if isinstance(v, Enum) else v for key, v in asdict(self).items()}
        described["targets"] = list(self.targets) or None
        if self.select is not Select.NUMBER:
            described["num_layers"] = None
        if self.select is not Select.THRESHOLD:
            described["threshold"] = None
        described["device"] = device
        return described


SETTING_KEYS = tuple(f.name for f in fields(Settings))


@dataclass(frozen=True)
class Option:
    """One option of a run: its key (a ``Settings`` field, or an input), type and help.

    The flag is ``--`` + the key with ``-`` for ``_``; ``preset`` marks the keys a preset may set.
    """

    key: str
    type: type
    help: str
    short: str | None = None
    metavar: str | None = None
    preset: bool = False

    @property
    def annotation(self) -> Any:
        """The Python type of the option's value: ``list[str]`` for ``list``."""
        return list[str] if self.type is list else self.type

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def default(self) -> Any:
        """The ``Settings`` default (None for the inputs, which have none)."""
        return next((f.default for f in fields(Settings) if f.name == self.key), None)


INPUT_OPTIONS = (
    Option("base", str, "Base model: local folder or hub id org/name[@rev].", metavar="REF",
           preset=True),
    Option("aligned", str, "Aligned sibling of the base (e.g. the -chat model).", metavar="REF",
           preset=True),
    Option("preset", str, "A known base/aligned pair (`safelora presets` lists them).",
           metavar="NAME"),
    Option("revision", str, "Hub revision for --base and --aligned (and --profile).",
           metavar="REV"),
    Option("profile", str, "An alignment profile (`safelora profile`) instead of --base and "
           "--aligned: a file, or a hub id org/name[@rev].", metavar="PROFILE"),
)  # fmt: skip
SETTING_OPTIONS = (
    Option("select", Select, "number: project the K lowest cosines; threshold: project when "
           "cosine ≤ T.", preset=True),
    Option("num_layers", int, "K for --select number (ties at the K-th cosine are included).",
           short="-k", metavar="K", preset=True),
    Option("threshold", float, "T for --select threshold, in [-1, 1].", metavar="T", preset=True),
    Option("projection", Projection, "paper: Ĉ = V Vᵀ/‖V‖_F (official); subspace: U_k U_kᵀ, "
           "top-k singular vectors of V.", preset=True),
    Option("rank", int, "k for --projection subspace.", metavar="K", preset=True),
    Option("energy", float, "Smallest k whose σ² cover this share of ‖V‖² (subspace).",
           metavar="E", preset=True),
    Option("device", str, "auto, cpu, cuda or cuda:N.", metavar="DEVICE"),
    Option("adapter_name", str, "Adapter to take when a file holds several.", metavar="NAME"),
    Option("targets", list, "Full fine-tunes: the weights to patch: module names (repeat or "
           "comma-separate), one regex, or all-linear. [default: every 2-D weight of the "
           "repeated blocks]", metavar="NAMES"),
)  # fmt: skip
OPTIONS = INPUT_OPTIONS + SETTING_OPTIONS
"""Every option of ``patch`` and ``score`` that a run file may also hold."""

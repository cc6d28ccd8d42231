"""Job: every input resolved, indexed, validated and paired before anything heavy is read.

``prepare`` is the first half of the data flow (resolve -> index -> pair) plus the checks that the
inputs belong together (``provenance.py``): what it returns is everything the stream needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safelora_cli.errors import UsageError
from safelora_cli.inputs.adapter import CONFIG_NAME, Adapter, LoraModule, load_adapter
from safelora_cli.inputs.index import PICKLE_SUFFIXES, TensorIndex, index_folder
from safelora_cli.inputs.pairing import MODEL_CONFIG, ModulePair, pair_modules
from safelora_cli.inputs.provenance import check_adapter, check_pair, file_identities, refuse
from safelora_cli.inputs.resolve import ResolvedInput, resolve
from safelora_cli.notices import Notices, NotifyFn
from safelora_cli.settings import Settings

PathLike = str | Path


@dataclass(frozen=True)
class AdapterJob:
    """One adapter, validated and paired against the model pair."""

    input: ResolvedInput
    adapter: Adapter
    pairs: list[ModulePair]


@dataclass(frozen=True)
class ProfiledModule:
    """One adapter module and the profile entry (its weight) it is scored against."""

    lora: LoraModule
    weight: str
    transpose: bool
    tied: bool = False

    @property
    def name(self) -> str:
        return self.lora.module

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the module, as lora_B @ lora_A."""
        return (self.lora.b.shape[0], self.lora.a.shape[1])


@dataclass(frozen=True)
class ProfiledAdapter:
    """One adapter, validated and paired against the profile."""

    input: ResolvedInput
    adapter: Adapter
    pairs: list[ProfiledModule]


@dataclass(frozen=True)
class Job:
    """Everything validated before the heavy read: inputs, indexes, module pairs, settings."""

    base_input: ResolvedInput
    aligned_input: ResolvedInput
    base: TensorIndex
    aligned: TensorIndex
    adapters: list[AdapterJob]
    settings: Settings
    notices: Notices

    def local_inputs(self) -> list[Path]:
        return [self.base_input.path, self.aligned_input.path] + [
            a.input.path for a in self.adapters
        ]


def check_inputs_pair(base: ResolvedInput, aligned: ResolvedInput, notices: Notices) -> None:
    """Refuse a model pair that cannot mean anything (the same model twice); warn about one that
    looks like a mistake (``provenance.check_pair``)."""
    findings = check_pair(
        base.describe(),
        aligned.describe(),
        file_identities(base.path),
        file_identities(aligned.path),
    )
    refuse(findings)
    for finding in findings:
        notices.add(finding.code, finding.message, values=finding.values)


def _check_provenance(
    base: ResolvedInput,
    aligned: ResolvedInput,
    adapters: list[tuple[ResolvedInput, Adapter]],
    notices: Notices,
) -> None:
    """The pair's checks, then whether each adapter was trained on ``--aligned``."""
    check_inputs_pair(base, aligned, notices)
    for adapter_input, adapter in adapters:
        for finding in check_adapter(adapter.config, base.describe(), aligned.describe()):
            notices.scoped(str(adapter_input.path)).add(
                finding.code, finding.message, values=finding.values
            )


ADAPTER, FULL = "adapter", "full"


def input_kind(path: Path) -> str:
    """What a local input folder holds: an adapter (``adapter_config.json``) or a full model
    (``config.json`` beside safetensors weights: a full fine-tune)."""
    if os.path.lexists(path / CONFIG_NAME):
        return ADAPTER
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES)]
    if os.path.lexists(path / MODEL_CONFIG) and weights:
        return FULL  # index_folder refuses pickle-only weights, with a hint
    return ADAPTER  # load_adapter says what is missing


def prepare(
    adapters: Sequence[PathLike],
    base: PathLike,
    aligned: PathLike,
    settings: Settings,
    revision: str | None = None,
    notify: NotifyFn | None = None,
) -> Job:
    """Resolve, index and pair every input. Reads headers only.

    Every adapter is validated before anything heavy is read: one bad adapter stops the run,
    named in the error.
    """
    if not adapters:
        raise UsageError("no ADAPTER given")
    notices = Notices(notify)
    loaded = []
    for ref in adapters:
        adapter_input = resolve(str(ref), revision=None, role="ADAPTER", notices=notices)
        adapter = load_adapter(adapter_input.path, settings.adapter_name)
        settings.check_modules(len(adapter.modules))
        loaded.append((adapter_input, adapter))
    base_input = resolve(str(base), revision, role="--base", notices=notices)
    aligned_input = resolve(str(aligned), revision, role="--aligned", notices=notices)
    _check_provenance(base_input, aligned_input, loaded, notices)
    base_index, aligned_index = index_folder(base_input.path), index_folder(aligned_input.path)
    jobs = [AdapterJob(i, a, pair_modules(a, base_index, aligned_index)) for i, a in loaded]
    return Job(base_input, aligned_input, base_index, aligned_index, jobs, settings, notices)

"""The library's entry points: ``patch``, ``score``, ``patch_many``, ``score_many`` and
``make_profile``, each one call into the run model (``runs/``: ``run.py`` prepares, scores,
selects and reports every kind of run; ``execute.py`` writes).

What is patched: LoRA adapters (several: a batch, each weight read once), or one full
fine-tune (a model folder: ``config.json`` and safetensors, no ``adapter_config.json``); V comes
from the model pair (``base``, ``aligned``) or from an alignment profile (``profile``); what is
written: the patched adapter, the model it makes (``merge``), the patched full model, or nothing
(``score``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safelora_cli.notices import NotifyFn
from safelora_cli.runs import execute
from safelora_cli.runs.kinds import ProgressFn, Written
from safelora_cli.runs.profile_run import make_profile
from safelora_cli.runs.run import Request
from safelora_cli.runs.source import PathLike
from safelora_cli.settings import Settings

__all__ = [
    "ProgressFn", "Result", "Settings", "make_profile", "patch", "patch_many", "score",
    "score_many",
]  # fmt: skip


@dataclass(frozen=True)
class Result:
    """A finished run for one input: its report, and its output folder (None for ``score``)."""

    report: dict[str, Any]
    output: Path | None


def score_many(
    adapters: Sequence[PathLike],
    base: PathLike | None,
    aligned: PathLike | None,
    settings: Settings = Settings(),
    revision: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
    *,
    profile: PathLike | None = None,
) -> list[Result]:
    """Score several adapters against one model pair (each weight read once) or a profile, or
    one full fine-tune; writes nothing. See ``patch`` for the arguments.

    Returns:
        One result per input, in order, with ``output`` None.
    """
    request = Request(adapters, base, aligned, profile, settings, Written.NOTHING, revision, notify)
    return [Result(report, None) for report in execute.score_all(request, progress)]


def score(
    adapter: PathLike,
    base: PathLike | None,
    aligned: PathLike | None,
    settings: Settings = Settings(),
    revision: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
    *,
    profile: PathLike | None = None,
) -> Result:
    """Score one adapter (or full fine-tune) without writing anything. See ``patch``.

    Example:
        >>> score("my-lora", None, None, Settings(num_layers=8), profile="llama2.safetensors")
    """
    [result] = score_many([adapter], base, aligned, settings, revision, progress, notify,
                          profile=profile)  # fmt: skip
    return result


def patch_many(
    adapters: Sequence[PathLike],
    base: PathLike | None,
    aligned: PathLike | None,
    output_dir: PathLike,
    settings: Settings = Settings(),
    *,
    force: bool = False,
    revision: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
    command: Sequence[str] | None = None,
    merge: bool = False,
    profile: PathLike | None = None,
) -> list[Result]:
    """Patch several adapters in one pass over the model pair (or the profile).

    Each patched adapter (with ``merge``: the model it makes) goes to
    ``output_dir/<adapter folder name>`` with its own report. Every output is staged before any
    is published: a failure while writing (disk full, an unreadable input) publishes none.
    Publishing is then one rename each; if one fails (another run wrote there meanwhile), the
    error says which were published and which were not. See ``patch`` for the arguments.
    """
    written = Written.MERGED if merge else Written.ADAPTER
    request = Request(adapters, base, aligned, profile, settings, written, revision, notify)
    done = execute.patch_batch(request, Path(output_dir), force, command, progress)
    return [Result(report, output) for report, output in done]


def patch(
    adapter: PathLike,
    base: PathLike | None,
    aligned: PathLike | None,
    output: PathLike,
    settings: Settings = Settings(),
    *,
    force: bool = False,
    report_path: PathLike | None = None,
    revision: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
    command: Sequence[str] | None = None,
    merge: bool = False,
    profile: PathLike | None = None,
) -> Result:
    """Patch one adapter: project the selected modules' lora_B and write a new adapter folder;
    or a full fine-tune: W_aligned + P D for its selected weights, written as a model folder.

    Args:
        adapter: the adapter folder, or a full fine-tune's model folder.
        base, aligned: the base model and its aligned sibling (folder or ``org/name[@rev]``);
            None with ``profile`` (a full fine-tune still needs ``aligned``: D = W_ft − W_aligned).
        output: the new folder; refused if it exists and is not empty, unless ``force``.
        settings: selection, projection, device (and ``targets`` for a full fine-tune).
        force: replace safelora's files in an existing output folder (others are kept).
        report_path: where to write the report (default ``output/safelora_report.json``).
        revision: hub revision for base and aligned (and the profile).
        progress: called as ``progress(bytes_done, bytes_total, weight)``.
        notify: called with each notice (also listed in the report's ``warnings``).
        command: the command line, for the model card (the output's README.md).
        merge: write the adapter as the full model it makes (W_aligned + s · B' A).
        profile: an alignment profile (file or hub id) instead of the model pair.
    Returns:
        The report and the output folder.
    Example:
        >>> patch("my-lora", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf",
        ...       "my-lora-safe")
        >>> patch("my-lora", None, None, "my-lora-safe", profile="llama2.safetensors")
    """
    output = Path(output)
    report_file = Path(report_path) if report_path is not None else None
    written = Written.MERGED if merge else Written.ADAPTER
    request = Request([adapter], base, aligned, profile, settings, written, revision, notify)
    report = execute.patch_one(request, output, report_file, force, command, progress)
    return Result(report, output)

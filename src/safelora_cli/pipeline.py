"""Pipeline: the library's entry points, and the only place the steps meet: prepare (``job.py``:
resolve -> index -> pair) -> score (``scoring.py``: stream -> project -> select -> report) ->
write (``writer.py``), in one direction.

An input is a LoRA adapter folder, or a full fine-tune (a model folder: ``config.json`` and
safetensors weights, no ``adapter_config.json``), which ``finetune.py`` takes through the same
steps. ``merge`` writes an adapter as the full model it makes (``merging.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli import finetune
from safelora_cli.errors import SafeLoraError, UsageError
from safelora_cli.job import FULL, Job, PathLike, input_kind, prepare
from safelora_cli.merging import write_merged
from safelora_cli.notices import Notices, NotifyFn
from safelora_cli.resolve import ResolvedInput
from safelora_cli.scoring import (
    ProgressFn,
    Scored,
    build_report,
    resolve_device,
    score_job,
)
from safelora_cli.settings import Settings
from safelora_cli.writer import (
    OutputFolder,
    check_output,
    check_report_path,
    output_error,
    write_adapter,
)

__all__ = ["ProgressFn", "Result", "Settings", "patch", "patch_many", "score", "score_many"]
CARD_SKIP = frozenset({"README.md"})  # card.CARD_NAME: written by _finish, never copied
PYTHON_COMMAND = "(the Python API: safelora_cli.patch)"
"""What the model card gives as the command line when the library was called directly."""


@dataclass(frozen=True)
class Result:
    """A finished run for one input: its report, and its output folder (None for ``score``)."""

    report: dict[str, Any]
    output: Path | None


def _full_fine_tune(inputs: Sequence[PathLike], settings: Settings) -> bool:
    """Whether the run is on a full fine-tune (a local model folder) rather than adapters."""
    full = [Path(ref).is_dir() and input_kind(Path(ref)) == FULL for ref in inputs]
    if any(full) and len(inputs) > 1:
        raise UsageError(
            "a full fine-tune (a model folder) is patched alone, not in a batch",
            "run once per fine-tune",
        )
    if not any(full) and settings.targets:
        raise UsageError("--targets applies to full fine-tunes; an adapter's modules are its own")
    return any(full)


def score_many(
    adapters: Sequence[PathLike],
    base: PathLike,
    aligned: PathLike,
    settings: Settings = Settings(),
    revision: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> list[Result]:
    """Score several adapters against one model pair (each weight read once), or one full
    fine-tune; writes nothing."""
    if _full_fine_tune(adapters, settings):
        full = finetune.prepare_full(adapters[0], base, aligned, settings, revision, notify)
        device = resolve_device(settings.device)
        scored_full = finetune.score_full(full, device, progress)
        return [Result(finetune.full_report(full, scored_full, device, None), None)]
    job = prepare(adapters, base, aligned, settings, revision, notify)
    device = resolve_device(settings.device)
    return [
        Result(build_report(job, scored, device, None), None)
        for scored in score_job(job, device, progress)
    ]


def batch_outputs(adapters: Sequence[Path], output_dir: Path) -> list[Path]:
    """``output_dir/<adapter folder name>`` for each adapter; name collisions are an error."""
    outputs: dict[str, Path] = {}
    for adapter in adapters:
        name = adapter.name
        if name in outputs:
            raise UsageError(
                f"two adapters are named {name!r} ({outputs[name]} and {adapter})",
                "each patched adapter goes to OUTPUT/<folder name>; rename one",
            )
        outputs[name] = adapter
    return [output_dir / a.name for a in adapters]


def _finish(
    out: OutputFolder,
    report: dict[str, Any],
    notices: Notices,
    card_from: ResolvedInput,
    kind: str,
    report_file: Path | None,
    command: Sequence[str] | None,
) -> None:
    """The model card (over ``card_from``'s README) and the report: the last files staged."""
    # imported here: huggingface_hub's card support costs 0.3 s of start-up that `score` and
    # every failing run would pay for nothing
    from safelora_cli.card import CARD_NAME, build_card, read_card

    original, problems = read_card(card_from.path, card_from.trusted_root)
    report["warnings"] = notices.as_list(notices.adapter)  # with what writing found
    card = build_card(original, report, kind, command or PYTHON_COMMAND)
    for problem in [*problems, *card.warnings]:
        notices.add("model-card", problem)
    report["warnings"] = notices.as_list(notices.adapter)
    out.write_bytes(CARD_NAME, card.text.encode())
    if report_file is None:
        out.write_report(report)
    else:
        out.attach_json(report_file, report)


def _stage(
    job: Job,
    scored: Scored,
    out: OutputFolder,
    report: dict[str, Any],
    report_file: Path | None,
    command: Sequence[str] | None,
    device: torch.device,
    merge: bool,
) -> None:
    """Write one patched adapter (or, with ``merge``, the model it makes), its model card and
    its report into the output being staged."""
    adapter = scored.job
    notices = job.notices.scoped(str(adapter.input.path))
    if merge:
        write_merged(job, scored, out, device, notices)
        aligned = job.aligned_input
        out.copy_files(aligned.path, aligned.trusted_root, notices, CARD_SKIP, model=True)
    else:
        replaced = scored.replaced_factors()
        inside = adapter.input.trusted_root
        write_adapter(out, adapter.adapter, replaced, inside, notices, CARD_SKIP)
    _finish(out, report, notices, adapter.input, "merged" if merge else "adapter", report_file,
            command)  # fmt: skip


def _publish_all(folders: list[OutputFolder]) -> None:
    """Publish staged outputs in order; if one cannot be, say which were and discard the rest."""
    for done, folder in enumerate(folders):
        try:
            folder.publish()
        except SafeLoraError as exc:
            for rest in folders[done + 1 :]:
                rest.discard()
            published = ", ".join(f.target.name for f in folders[:done]) or "none"
            skipped = ", ".join(f.target.name for f in folders[done + 1 :]) or "none"
            exc.message += f" (batch: published {published}; not published: {skipped})"
            raise


def patch_many(
    adapters: Sequence[PathLike],
    base: PathLike,
    aligned: PathLike,
    output_dir: PathLike,
    settings: Settings = Settings(),
    *,
    force: bool = False,
    revision: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
    command: Sequence[str] | None = None,
    merge: bool = False,
) -> list[Result]:
    """Patch several adapters in one pass over the model pair.

    Each patched adapter (with ``merge``: the model it makes) goes to
    ``output_dir/<adapter folder name>`` with its own report. Every
    output is staged before any is published: a failure while writing (disk full, an unreadable
    input) publishes none. Publishing is then one rename each; if one fails (another run wrote
    there meanwhile), the error says which were published and which were not.
    """
    if _full_fine_tune(adapters, settings):
        raise UsageError("a full fine-tune is patched alone", "give one FT_MODEL")
    job = prepare(adapters, base, aligned, settings, revision, notify)
    output_dir = Path(output_dir)
    outputs = batch_outputs([a.input.path for a in job.adapters], output_dir)
    check_output(output_dir, job.local_inputs(), force=True)  # the parent: may hold other files
    created = not output_dir.exists()
    if not created:
        for output in outputs:
            check_output(output, job.local_inputs(), force)
    device = resolve_device(settings.device)
    scored = score_job(job, device, progress)
    output_dir.mkdir(exist_ok=True)
    folders = [OutputFolder(output, force=force) for output in outputs]
    results = []
    try:
        for adapter_scored, folder in zip(scored, folders, strict=True):
            report = build_report(job, adapter_scored, device, folder.target)
            folder.open()
            _stage(job, adapter_scored, folder, report, None, command, device, merge)
            results.append(Result(report, folder.target))
    except BaseException as exc:
        for folder in folders:
            folder.discard()
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        if isinstance(exc, OSError):
            raise output_error(output_dir, exc) from exc
        raise
    _publish_all(folders)
    return results


def patch(
    adapter: PathLike,
    base: PathLike,
    aligned: PathLike,
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
) -> Result:
    """Patch one adapter: project the selected modules' lora_B and write a new adapter folder;
    or a full fine-tune: W_aligned + P D for its selected weights, written as a model folder.

    Args:
        adapter: the adapter folder, or a full fine-tune's model folder.
        base, aligned: the base model and its aligned sibling (folder or ``org/name[@rev]``).
        output: the new folder; refused if it exists and is not empty, unless ``force``.
        settings: selection, projection and device.
        force: replace safelora's files in an existing output folder (others are kept).
        report_path: where to write the report (default ``output/safelora_report.json``).
        revision: hub revision for base and aligned.
        progress: called after each weight.
        notify: called with each notice (also listed in the report's ``warnings``).
        command: the command line, for the model card (the output's README.md).
        merge: write the adapter as the full model it makes (W_aligned + s · B' A).
    Returns:
        The report and the output folder.
    Example:
        >>> patch("my-lora", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf",
        ...       "my-lora-safe")
    """
    output = Path(output)
    report_file = Path(report_path) if report_path is not None else None
    if _full_fine_tune([adapter], settings):
        finetune.check_full_settings(settings, merge)
        full = finetune.prepare_full(adapter, base, aligned, settings, revision, notify)
        _check_outputs(output, report_file, full.local_inputs(), force)
        device = resolve_device(settings.device)
        scored_full = finetune.score_full(full, device, progress)
        report = finetune.full_report(full, scored_full, device, output)
        with OutputFolder(output, force=force) as out:
            finetune.write_full(full, scored_full, out, device)
            model = full.model_input
            out.copy_files(model.path, model.trusted_root, full.notices, CARD_SKIP, model=True)
            _finish(out, report, full.notices, model, finetune.KIND, report_file, command)
        return Result(report, output)
    job = prepare([adapter], base, aligned, settings, revision, notify)
    _check_outputs(output, report_file, job.local_inputs(), force)
    device = resolve_device(settings.device)
    [scored] = score_job(job, device, progress)
    report = build_report(job, scored, device, output)
    with OutputFolder(output, force=force) as out:
        _stage(job, scored, out, report, report_file, command, device, merge)
    return Result(report, output)


def _check_outputs(output: Path, report_file: Path | None, inputs: list[Path], force: bool) -> None:
    check_output(output, inputs, force)
    if report_file is not None:
        check_report_path(report_file, inputs, output, force)


def score(
    adapter: PathLike,
    base: PathLike,
    aligned: PathLike,
    settings: Settings = Settings(),
    revision: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> Result:
    """Score one adapter without writing anything. See ``patch`` for the arguments."""
    [result] = score_many([adapter], base, aligned, settings, revision, progress, notify)
    return result

"""Pipeline: the library's entry points, and the only place the steps meet: prepare (``job.py``:
resolve -> index -> pair) -> score (``scoring.py``: stream -> project -> select -> report) ->
write (``writer.py``), in one direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safelora_cli.errors import SafeLoraError, UsageError
from safelora_cli.job import Job, PathLike, prepare
from safelora_cli.notices import NotifyFn
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
PYTHON_COMMAND = "(the Python API: safelora_cli.patch)"
"""What the model card gives as the command line when the library was called directly."""


@dataclass(frozen=True)
class Result:
    """A finished run for one adapter: its report, and its output folder (None for ``score``)."""

    report: dict[str, Any]
    output: Path | None


def score_many(
    adapters: Sequence[PathLike],
    base: PathLike,
    aligned: PathLike,
    settings: Settings = Settings(),
    revision: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> list[Result]:
    """Score several adapters against one model pair (each weight read once); writes nothing."""
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


def _stage(
    job: Job,
    scored: Scored,
    out: OutputFolder,
    report: dict[str, Any],
    report_file: Path | None,
    command: Sequence[str] | None,
) -> None:
    """Write one patched adapter, its model card and its report into the output being staged."""
    # imported here: huggingface_hub's card support costs 0.3 s of start-up that `score` and
    # every failing run would pay for nothing
    from safelora_cli.card import CARD_NAME, build_card, read_card

    adapter = scored.job
    notices = job.notices.scoped(str(adapter.input.path))
    inside = adapter.input.trusted_root
    replaced = scored.replaced_factors()
    skip = frozenset({CARD_NAME})
    write_adapter(out, adapter.adapter, replaced, inside, notices, skip)
    original, problems = read_card(adapter.input.path, inside)
    report["warnings"] = notices.as_list(notices.adapter)  # with what writing found
    card = build_card(original, report, "adapter", command or PYTHON_COMMAND)
    for problem in [*problems, *card.warnings]:
        notices.add("model-card", problem)
    report["warnings"] = notices.as_list(notices.adapter)
    out.write_bytes(CARD_NAME, card.text.encode())
    if report_file is None:
        out.write_report(report)
    else:
        out.attach_json(report_file, report)


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
) -> list[Result]:
    """Patch several adapters in one pass over the model pair.

    Each patched adapter goes to ``output_dir/<adapter folder name>`` with its own report. Every
    output is staged before any is published: a failure while writing (disk full, an unreadable
    input) publishes none. Publishing is then one rename each; if one fails (another run wrote
    there meanwhile), the error says which were published and which were not.
    """
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
            _stage(job, adapter_scored, folder, report, None, command)
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
) -> Result:
    """Patch one adapter: project the selected modules' lora_B and write a new adapter folder.

    Args:
        adapter: the adapter folder.
        base, aligned: the base model and its aligned sibling (folder or ``org/name[@rev]``).
        output: the new folder; refused if it exists and is not empty, unless ``force``.
        settings: selection, projection and device.
        force: replace safelora's files in an existing output folder (others are kept).
        report_path: where to write the report (default ``output/safelora_report.json``).
        revision: hub revision for base and aligned.
        progress: called after each weight.
        notify: called with each notice (also listed in the report's ``warnings``).
        command: the command line, for the model card (the output's README.md).
    Returns:
        The report and the output folder.
    Example:
        >>> patch("my-lora", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf",
        ...       "my-lora-safe")
    """
    job = prepare([adapter], base, aligned, settings, revision, notify)
    output = Path(output)
    check_output(output, job.local_inputs(), force)
    report_file = Path(report_path) if report_path is not None else None
    if report_file is not None:
        check_report_path(report_file, job.local_inputs(), output, force)
    device = resolve_device(settings.device)
    [scored] = score_job(job, device, progress)
    report = build_report(job, scored, device, output)
    with OutputFolder(output, force=force) as out:
        _stage(job, scored, out, report, report_file, command)
    return Result(report, output)


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

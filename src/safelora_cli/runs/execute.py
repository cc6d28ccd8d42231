"""Execute: a prepared run from scoring to its published output.

``score_all`` reports and writes nothing; ``patch_one`` writes one output folder; ``patch_batch``
writes one folder per adapter of a batch, every one staged before any is published. Each
output is written by the update kind (``Update.write``: the patched adapter, the merged model or
the patched full model), then the model card and the report, the last files staged
(``finish``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

from safelora_cli.errors import SafeLoraError, UsageError
from safelora_cli.inputs.resolve import ResolvedInput
from safelora_cli.notices import Notices
from safelora_cli.output.published import published_report
from safelora_cli.output.report import mark_output
from safelora_cli.output.writer import OutputFolder, check_output, check_report_path, output_error
from safelora_cli.runs.keep import Drop, InMemory, Keep, Spill
from safelora_cli.runs.kinds import ProgressFn, Scored
from safelora_cli.runs.run import Request, Run, is_full, prepare, report, resolve_device, score

PYTHON_COMMAND = "(the Python API: safelora_cli.patch)"
"""What the model card gives as the command line when the library was called directly."""


def score_all(request: Request, progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Score every input (adapters, or one full fine-tune): one report each, nothing written."""
    device = resolve_device(request.settings.device)
    run = prepare(request, is_full(request.inputs, request.settings))
    scored = score(run, device, progress, Drop())  # nothing is written: no B' is kept
    return [report(run, one, device, None) for one in scored]


def patch_one(
    request: Request,
    output: Path,
    report_file: Path | None,
    force: bool,
    command: Sequence[str] | None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Patch one input into ``output``; returns its report."""
    device = resolve_device(request.settings.device)
    run = prepare(request, is_full(request.inputs, request.settings))
    check_output(output, run.local_inputs(), force)
    if report_file is not None:
        check_report_path(report_file, run.local_inputs(), output, force)
    [scored] = score(run, device, progress)
    found = report(run, scored, device, output)
    with OutputFolder(output, force=force, notices=run.notices) as out:
        stage(run, scored, out, found, report_file, command, device)
    return found


def batch_outputs(inputs: Sequence[Path], output_dir: Path) -> list[Path]:
    """``output_dir/<adapter folder name>`` for each adapter; name collisions are an error."""
    outputs: dict[str, Path] = {}
    for adapter in inputs:
        name = adapter.name
        if name in outputs:
            raise UsageError(
                f"two adapters are named {name!r} ({outputs[name]} and {adapter})",
                "each patched adapter goes to OUTPUT/<folder name>; rename one",
            )
        outputs[name] = adapter
    return [output_dir / a.name for a in inputs]


def patch_batch(
    request: Request,
    output_dir: Path,
    force: bool,
    command: Sequence[str] | None,
    progress: ProgressFn | None = None,
) -> list[tuple[dict[str, Any], Path]]:
    """Patch several adapters in one pass over the source, into ``output_dir/<folder name>``
    each; returns (report, output folder) for each, in order."""
    if is_full(request.inputs, request.settings):
        raise UsageError("a full fine-tune is patched alone", "give one FT_MODEL")
    run = prepare(request, full=False)
    inputs = run.local_inputs()
    outputs = batch_outputs([target.input.path for target in run.update.targets], output_dir)
    check_output(output_dir, inputs, force=True)  # the parent: may hold other files
    created = not output_dir.exists()
    if not created:
        for output in outputs:
            check_output(output, inputs, force)
    device = resolve_device(request.settings.device)
    scratch = output_dir if output_dir.is_dir() else output_dir.parent
    with closing(_keep(len(outputs), scratch)) as keep:
        scored = score(run, device, progress, keep)
        return _stage_batch(run, scored, output_dir, outputs, created, force, command, device)


def _keep(adapters: int, folder: Path) -> Keep:
    """A batch's projected B's wait in a scratch file beside its output (memory stays that of
    one adapter, whatever the batch size); one adapter's stay in memory."""
    return Spill(folder) if adapters > 1 else InMemory()


def _stage_batch(
    run: Run,
    scored: list[Scored],
    output_dir: Path,
    outputs: list[Path],
    created: bool,
    force: bool,
    command: Sequence[str] | None,
    device: torch.device,
) -> list[tuple[dict[str, Any], Path]]:
    """Stage every output, then publish them all (none if one cannot be staged)."""
    output_dir.mkdir(exist_ok=True)
    folders = [OutputFolder(output, force=force, notices=run.notices) for output in outputs]
    results = []
    try:
        for one, folder in zip(scored, folders, strict=True):
            found = report(run, one, device, folder.target)
            folder.open()
            stage(run, one, folder, found, None, command, device)
            results.append((found, folder.target))
    except BaseException as exc:
        for folder in folders:
            folder.discard()
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        if isinstance(exc, OSError):
            raise output_error(output_dir, exc) from exc
        raise
    publish_all(folders)
    return results


def stage(
    run: Run,
    scored: Scored,
    out: OutputFolder,
    found: dict[str, Any],
    report_file: Path | None,
    command: Sequence[str] | None,
    device: torch.device,
) -> None:
    """Write one target's output (what ``run.written`` says), its model card and its report
    into the output being staged."""
    run.update.write(run.written, run.source, scored, out, device)
    target = scored.target
    finish(out, found, target.notices, target.input, run.written.value, report_file, command)


def finish(
    out: OutputFolder,
    found: dict[str, Any],
    notices: Notices,
    card_from: ResolvedInput,
    kind: str,
    report_file: Path | None,
    command: Sequence[str] | None,
) -> None:
    """The model card (over ``card_from``'s README) and the report: the last files staged."""
    # imported here: huggingface_hub's card support costs 0.3 s of start-up that `score` and
    # every failing run would pay for nothing
    from safelora_cli.output.card import CARD_NAME, build_card, read_card

    original, problems = read_card(card_from.path, card_from.trusted_root)
    mark_output(found, kind)
    found["warnings"] = notices.as_list(notices.adapter)  # with what writing found
    card = build_card(original, found, kind, command or PYTHON_COMMAND)
    for problem in [*problems, *card.warnings]:
        notices.add("model-card", problem)
    found["warnings"] = notices.as_list(notices.adapter)
    out.write_bytes(CARD_NAME, card.text.encode())
    if report_file is None:  # published with the output: no local path in it
        public = published_report(found)
        out.write_report(public)
        found["files"] = public["files"]
    else:
        out.attach_json(report_file, found)


def publish_all(folders: list[OutputFolder]) -> None:
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

"""Pipeline: the library's entry points, and the only place the steps meet: prepare (``job.py``:
resolve -> index -> pair) -> score (``scoring.py``: stream -> project -> select -> report) ->
write (``writer.py``), in one direction.

What is scored: LoRA adapters against the model pair, or against an alignment profile standing in
for it (``profiled.py``); or one full fine-tune (a model folder: ``config.json`` and safetensors,
no ``adapter_config.json``), which ``finetune.py`` takes through the same steps. ``merge`` writes
an adapter as the full model it makes (``merging.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli.errors import SafeLoraError, UsageError
from safelora_cli.inputs.resolve import ResolvedInput
from safelora_cli.notices import Notices, NotifyFn
from safelora_cli.output.writer import (
    OutputFolder,
    check_output,
    check_report_path,
    output_error,
    write_adapter,
)
from safelora_cli.runs import finetune
from safelora_cli.runs.job import FULL, Job, PathLike, input_kind, prepare
from safelora_cli.runs.merging import write_merged
from safelora_cli.runs.profiled import prepare_profiled, profiled_report, score_profiled
from safelora_cli.runs.scoring import ProgressFn, Scored, build_report, resolve_device, score_job
from safelora_cli.settings import Settings

__all__ = ["ProgressFn", "Result", "Settings", "patch", "patch_many", "score", "score_many"]
CARD_SKIP = frozenset({"README.md"})  # card.CARD_NAME: written by _finish, never copied
PYTHON_COMMAND = "(the Python API: safelora_cli.patch)"
"""What the model card gives as the command line when the library was called directly."""


@dataclass(frozen=True)
class Result:
    """A finished run for one input: its report, and its output folder (None for ``score``)."""

    report: dict[str, Any]
    output: Path | None


@dataclass(frozen=True)
class _Adapters:
    """Adapters prepared against their source of V (model pair or profile): how to score them
    and report on them; ``job`` is the model-pair job (None through a profile)."""

    notices: Notices
    local_inputs: list[Path]
    adapter_paths: list[Path]
    score: Callable[[torch.device, ProgressFn | None], list[Scored]]
    report: Callable[[Scored, torch.device, Path | None], dict[str, Any]]
    job: Job | None


def _prepare(
    adapters: Sequence[PathLike],
    base: PathLike | None,
    aligned: PathLike | None,
    profile: PathLike | None,
    settings: Settings,
    revision: str | None,
    notify: NotifyFn | None,
) -> _Adapters:
    if profile is not None:
        if base is not None or aligned is not None:
            flag = "--base" if base is not None else "--aligned"
            raise UsageError(
                f"--profile and {flag} both given",
                "for an adapter the profile stands in for the model pair: give one or the other",
            )
        run = prepare_profiled(adapters, profile, settings, revision, notify)
        return _Adapters(
            run.notices,
            run.local_inputs(),
            [a.input.path for a in run.adapters],
            lambda device, progress: score_profiled(run, device, progress),
            lambda scored, device, output: profiled_report(run, scored, device, output),
            None,
        )
    job = prepare(adapters, _given(base, "--base"), _given(aligned, "--aligned"), settings,
                  revision, notify)  # fmt: skip
    return _Adapters(
        job.notices,
        job.local_inputs(),
        [a.input.path for a in job.adapters],
        lambda device, progress: score_job(job, device, progress),
        lambda scored, device, output: build_report(job, scored, device, output),
        job,
    )


def _given(ref: PathLike | None, flag: str) -> PathLike:
    if ref is None:
        raise UsageError(f"no {flag} given", "give the model pair, or a --profile")
    return ref


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


def _full_job(
    model: PathLike,
    base: PathLike | None,
    aligned: PathLike | None,
    profile: PathLike | None,
    settings: Settings,
    revision: str | None,
    notify: NotifyFn | None,
) -> finetune.FullJob:
    if profile is not None:
        if base is not None:
            raise UsageError("--profile and --base both given", "give one or the other")
        if aligned is None:
            raise UsageError(
                "a full fine-tune through a profile also needs --aligned: D = W_ft − W_aligned",
                "give --aligned REF (the profile stands in for --base only)",
            )
        return finetune.prepare_full(model, None, aligned, settings, revision, notify, profile)
    return finetune.prepare_full(
        model, _given(base, "--base"), _given(aligned, "--aligned"), settings, revision, notify
    )


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
    one full fine-tune; writes nothing. See ``patch`` for the arguments."""
    device = resolve_device(settings.device)
    if _full_fine_tune(adapters, settings):
        full = _full_job(adapters[0], base, aligned, profile, settings, revision, notify)
        scored_full = finetune.score_full(full, device, progress)
        return [Result(finetune.full_report(full, scored_full, device, None), None)]
    run = _prepare(adapters, base, aligned, profile, settings, revision, notify)
    return [
        Result(run.report(scored, device, None), None) for scored in run.score(device, progress)
    ]


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
    """Score one adapter (or full fine-tune) without writing anything. See ``patch``."""
    [result] = score_many([adapter], base, aligned, settings, revision, progress, notify,
                          profile=profile)  # fmt: skip
    return result


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
    from safelora_cli.output.card import CARD_NAME, build_card, read_card

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
    run: _Adapters,
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
    notices = run.notices.scoped(str(adapter.input.path))
    if merge:
        assert run.job is not None  # _check_merge
        write_merged(run.job, scored, out, device, notices)
        aligned = run.job.aligned_input
        out.copy_files(aligned.path, aligned.trusted_root, notices, CARD_SKIP, model=True)
    else:
        replaced = scored.replaced_factors()
        inside = adapter.input.trusted_root
        write_adapter(out, adapter.adapter, replaced, inside, notices, CARD_SKIP)
    kind = "merged" if merge else "adapter"
    _finish(out, report, notices, adapter.input, kind, report_file, command)


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


def _check_merge(run: _Adapters, merge: bool) -> None:
    if merge and run.job is None:
        raise UsageError(
            "--merge needs the aligned model's weights; a profile holds none",
            "give --base and --aligned instead of --profile",
        )


def _check_outputs(output: Path, report_file: Path | None, inputs: list[Path], force: bool) -> None:
    check_output(output, inputs, force)
    if report_file is not None:
        check_report_path(report_file, inputs, output, force)


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
    error says which were published and which were not.
    """
    if _full_fine_tune(adapters, settings):
        raise UsageError("a full fine-tune is patched alone", "give one FT_MODEL")
    run = _prepare(adapters, base, aligned, profile, settings, revision, notify)
    _check_merge(run, merge)
    output_dir = Path(output_dir)
    inputs = run.local_inputs
    outputs = batch_outputs(run.adapter_paths, output_dir)
    check_output(output_dir, inputs, force=True)  # the parent: may hold other files
    created = not output_dir.exists()
    if not created:
        for output in outputs:
            check_output(output, inputs, force)
    device = resolve_device(settings.device)
    scored = run.score(device, progress)
    output_dir.mkdir(exist_ok=True)
    folders = [OutputFolder(output, force=force) for output in outputs]
    results = []
    try:
        for adapter_scored, folder in zip(scored, folders, strict=True):
            report = run.report(adapter_scored, device, folder.target)
            folder.open()
            _stage(run, adapter_scored, folder, report, None, command, device, merge)
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
            None with ``profile``.
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
    device = resolve_device(settings.device)
    if _full_fine_tune([adapter], settings):
        finetune.check_full_settings(settings, merge)
        full = _full_job(adapter, base, aligned, profile, settings, revision, notify)
        _check_outputs(output, report_file, full.local_inputs(), force)
        scored_full = finetune.score_full(full, device, progress)
        report = finetune.full_report(full, scored_full, device, output)
        with OutputFolder(output, force=force) as out:
            finetune.write_full(full, scored_full, out, device)
            model = full.model_input
            out.copy_files(model.path, model.trusted_root, full.notices, CARD_SKIP, model=True)
            _finish(out, report, full.notices, model, finetune.KIND, report_file, command)
        return Result(report, output)
    run = _prepare([adapter], base, aligned, profile, settings, revision, notify)
    _check_merge(run, merge)
    _check_outputs(output, report_file, run.local_inputs, force)
    [scored] = run.score(device, progress)
    report = run.report(scored, device, output)
    with OutputFolder(output, force=force) as out:
        _stage(run, scored, out, report, report_file, command, device, merge)
    return Result(report, output)

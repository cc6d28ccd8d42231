"""``SafeLoraCallback``: Safe LoRA scores at every checkpoint of a ``transformers.Trainer``.

At each checkpoint save of a PEFT LoRA model the callback scores the adapter the Trainer just
wrote (``output_dir/checkpoint-N``) against an alignment profile (milliseconds) or the model pair,
writes ``safelora_report.json`` beside it, and logs ``safelora/min_cosine``,
``safelora/mean_cosine`` and ``safelora/would_project`` through the Trainer's own ``log`` (so
every reporter the Trainer has, W&B, TensorBoard, MLflow, shows the drift as a curve, and
``trainer.state.log_history`` holds it). It can stop training when too many modules would be
projected, and write the patched adapter of the final model when training ends. TRL's trainers
(``SFTTrainer``, ...) are Trainers: the callback works with them unchanged.

Example:
    >>> from safelora_cli import Settings
    >>> from safelora_cli.integrations.transformers import SafeLoraCallback
    >>> callback = SafeLoraCallback(
    ...     profile="llama-2-7b-chat.safetensors",
    ...     settings=Settings(select="threshold", threshold=0.35),
    ...     stop_if_projected=8,
    ...     patch_at_end="out/final-safe",
    ... )
    >>> trainer = Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[callback])
"""

from __future__ import annotations

import inspect
import logging
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from safelora_cli import api
from safelora_cli.errors import UsageError
from safelora_cli.notices import Notice
from safelora_cli.output.atomic import write_json
from safelora_cli.output.published import published_report
from safelora_cli.output.report import REPORT_NAME
from safelora_cli.output.writer import check_output
from safelora_cli.settings import Select, Settings

__all__ = ["METRICS", "CheckpointScore", "SafeLoraCallback"]

METRICS = ("safelora/min_cosine", "safelora/mean_cosine", "safelora/would_project")
"""The names logged at each checkpoint (cosines only when some module has one)."""

Ref = str | Path
"""A folder, file or hub id, as the library API takes it."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointScore:
    """One scored checkpoint: its step, folder, report and the metrics logged for it."""

    step: int
    folder: Path
    report: dict[str, Any]
    metrics: dict[str, float]


def checkpoint_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``safelora/*`` metrics of an adapter report: the lowest and mean cosine over the scored
    modules (left out when every module was skipped) and how many modules would be projected."""
    cosines = [m["cosine"] for m in report["modules"] if m["cosine"] is not None]
    metrics: dict[str, float] = {}
    if cosines:
        metrics["safelora/min_cosine"] = min(cosines)
        metrics["safelora/mean_cosine"] = sum(cosines) / len(cosines)
    metrics["safelora/would_project"] = report["summary"]["projected"]
    return metrics


class SafeLoraCallback(TrainerCallback):
    """Score each checkpoint's LoRA adapter; log, gate and patch it from inside training.

    Args:
        profile: an alignment profile (file or hub id) standing in for the model pair.
        base, aligned: the model pair (folders or hub ids), instead of ``profile``.
        settings: selection, projection and device, as for ``safelora score``. With
            ``stop_if_projected``, use ``Settings(select="threshold", threshold=T)``: in number
            mode K modules are always selected.
        patch_at_end: when training ends, write the patched adapter of the final model into this
            folder (new, or empty); checked before the first step.
        stop_if_projected: stop training (``control.should_training_stop``) at the first
            checkpoint where more than this many modules would be projected.
        revision: hub revision of the profile or of base and aligned.
    Raises:
        UsageError: neither or both of ``profile`` and the pair, or a negative
            ``stop_if_projected``; on ``train()``: ``patch_at_end`` not writable, or a model
            that is not a PEFT model.
    Every checkpoint scored is kept in ``scores``; ``patched`` is the final run's
    ``api.Result`` (None before the end, or without ``patch_at_end``).
    """

    def __init__(
        self,
        *,
        profile: Ref | None = None,
        base: Ref | None = None,
        aligned: Ref | None = None,
        settings: Settings = Settings(),
        patch_at_end: Ref | None = None,
        stop_if_projected: int | None = None,
        revision: str | None = None,
    ) -> None:
        if profile is None and (base is None or aligned is None):
            raise UsageError(
                "SafeLoraCallback needs profile=..., or both base=... and aligned=...",
                "give an alignment profile, or the model pair",
            )
        if profile is not None and (base is not None or aligned is not None):
            raise UsageError(
                "SafeLoraCallback: profile=... and base/aligned both given",
                "the profile stands in for the model pair: give one or the other",
            )
        if stop_if_projected is not None and stop_if_projected < 0:
            raise UsageError(
                f"SafeLoraCallback: stop_if_projected={stop_if_projected} is negative",
                "give the number of projected modules to tolerate, 0 or more",
            )
        if stop_if_projected is not None and settings.select is Select.NUMBER:
            warnings.warn(
                "SafeLoraCallback: stop_if_projected with select='number' compares a constant "
                f"(K={settings.num_layers} modules are always selected); "
                "use Settings(select='threshold', threshold=T)",
                stacklevel=2,
            )
        self.profile = profile
        self.base = base
        self.aligned = aligned
        self.settings = settings
        self.patch_at_end = Path(patch_at_end) if patch_at_end is not None else None
        self.stop_if_projected = stop_if_projected
        self.revision = revision
        self.scores: list[CheckpointScore] = []
        self.patched: api.Result | None = None
        self._trainer: weakref.ReferenceType[Any] | None = None
        self._seen: set[str] = set()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Bind the calling Trainer (for its ``log``); refuse a non-PEFT model and an unusable
        ``patch_at_end`` before the first step."""
        self._bind_trainer()
        model = kwargs.get("model")
        if model is not None and not hasattr(model, "peft_config"):
            raise UsageError(
                f"SafeLoraCallback scores LoRA adapters: the model ({type(model).__name__}) "
                "is not a PEFT model",
                "wrap it with peft.get_peft_model(model, LoraConfig(...))",
            )
        if self.patch_at_end is not None and state.is_world_process_zero:
            check_output(self.patch_at_end, [], force=False)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Score the checkpoint just written, write its report, log the metrics, gate."""
        stop = False
        if state.is_world_process_zero:
            folder = Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            scored = self._score(folder, state.global_step)
            self._log(state, scored.metrics)
            stop = self._over_limit(scored)
        if _broadcast(stop):
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """With ``patch_at_end``: save the final adapter aside and patch it into that folder."""
        model = kwargs.get("model")
        if self.patch_at_end is None or model is None or not state.is_world_process_zero:
            return
        with tempfile.TemporaryDirectory(prefix="safelora-final-") as tmp:
            model.save_pretrained(tmp)
            self.patched = api.patch(
                tmp, self.base, self.aligned, self.patch_at_end, self.settings,
                revision=self.revision, notify=self._notify, profile=self.profile,
            )  # fmt: skip
        summary = self.patched.report["summary"]
        logger.info(
            "safelora: patched adapter of the final model written to %s (%d modules projected)",
            self.patch_at_end,
            summary["projected"],
        )

    def _score(self, folder: Path, step: int) -> CheckpointScore:
        result = api.score(
            folder, self.base, self.aligned, self.settings, self.revision,
            notify=self._notify, profile=self.profile,
        )  # fmt: skip
        # a checkpoint may be pushed to the Hub: the published form, with no local path
        write_json(folder / REPORT_NAME, published_report(result.report))
        scored = CheckpointScore(step, folder, result.report, checkpoint_metrics(result.report))
        self.scores.append(scored)
        return scored

    def _over_limit(self, scored: CheckpointScore) -> bool:
        projected = scored.report["summary"]["projected"]
        if self.stop_if_projected is None or projected <= self.stop_if_projected:
            return False
        logger.warning(
            "safelora: %d modules would be projected at step %d, more than %d: stopping training",
            projected,
            scored.step,
            self.stop_if_projected,
        )
        return True

    def _log(self, state: TrainerState, metrics: dict[str, float]) -> None:
        """Through the Trainer's ``log``: every reporter's ``on_log`` and ``state.log_history``.
        Without a Trainer (a loop that calls callbacks itself), into ``log_history`` only."""
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None:
            trainer = self._bind_trainer()
        if trainer is not None:
            trainer.log(dict(metrics))
            return
        state.log_history.append({**metrics, "step": state.global_step})

    def _bind_trainer(self) -> Any | None:
        """The Trainer whose callback handler holds this callback, found up the call stack:
        ``on_save`` gets no handle on it, and its ``log`` is what reaches the reporters."""
        frame = inspect.currentframe()
        while frame is not None:
            owner = frame.f_locals.get("self")
            handler = getattr(owner, "callback_handler", None)
            if any(cb is self for cb in getattr(handler, "callbacks", ())) and hasattr(
                owner, "log"
            ):
                self._trainer = weakref.ref(owner)
                return owner
            frame = frame.f_back
        return None

    def _notify(self, notice: Notice) -> None:
        """Each distinct notice once per training run (a checkpoint repeats its predecessor's)."""
        if notice.message not in self._seen:
            self._seen.add(notice.message)
            logger.warning("safelora: %s", notice.message)


def _broadcast(stop: bool) -> bool:
    """The main process's decision, on every process of a distributed run (else as is)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stop
    decision = [stop]
    dist.broadcast_object_list(decision, src=0)
    return bool(decision[0])

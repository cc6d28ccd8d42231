"""Building a profile: one pass over (weight, V, ‖V‖_F), then one atomic write.

Call ``check_profile_output`` before the (long) build, ``build_profile`` on the stream of V's,
then ``write_profile``: the file appears complete under its name or not at all.

Example:
    >>> check_profile_output(path, force=False)
    >>> entries = build_profile(((n, v, norm) for n, v, norm in stream), RankRule(rank=32))
    >>> write_profile(path, entries, inputs={"base": {...}, "aligned": {...}}, rule=rule)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from safelora_cli.errors import NumericalError
from safelora_cli.math.lowrank import AUTO, LowRank, RankRule, decompose
from safelora_cli.notices import Notices
from safelora_cli.output.atomic import write_safetensors
from safelora_cli.output.published import public_inputs
from safelora_cli.output.target import check_target
from safelora_cli.output.writer import output_error
from safelora_cli.sources.profile import CERTIFICATE_FIELDS, FORMAT, SCHEMA_VERSION, tensor_sha256
from safelora_cli.sources.profile_summary import rule_json
from safelora_cli.version import __version__

ProgressFn = Callable[[int, int | None, str], None]
"""Called as ``progress(done, total, weight)`` after each weight; total is None when unknown."""
DEFAULT_RULE = RankRule()


def build_profile(
    items: Iterable[tuple[str, torch.Tensor, float]],
    rule: RankRule = DEFAULT_RULE,
    *,
    method: str = AUTO,
    total: int | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, LowRank]:
    """Decompose each V into a profile entry, on V's device; entries are returned on the CPU.

    Args:
        items: (weight name, V (out, in) float32 in the module's orientation, ‖V‖_F); V may be a
            reused buffer (``stream.alignment_stream``): nothing keeps a reference to it.
        rule: the rank rule; method: see ``lowrank.decompose``.
        total: how many items, for progress; progress: called after each weight.
    Returns:
        weight name -> entry, in the order given.
    Raises:
        NumericalError: a V holding NaN or Inf (its ‖V‖_F is not finite).
    """
    entries: dict[str, LowRank] = {}
    with torch.inference_mode():
        for done, (name, v, v_norm) in enumerate(items, start=1):
            if name in entries:
                raise ValueError(f"weight {name!r} given twice")
            entries[name] = profile_entry(name, v, v_norm, rule, method)
            if progress is not None:
                progress(done, total, name)
    return entries


def profile_entry(
    name: str, v: torch.Tensor, v_norm: float, rule: RankRule = DEFAULT_RULE, method: str = AUTO
) -> LowRank:
    """One weight's entry, on the CPU (V may be a reused buffer: nothing keeps a reference).

    Raises:
        NumericalError: a V holding NaN or Inf (its ‖V‖_F is not finite).
    """
    if not math.isfinite(v_norm):
        raise NumericalError(
            f"{name}: V = aligned − base holds NaN or Inf",
            "a checkpoint is damaged or out of range; fetch it again",
        )
    return _to_cpu(decompose(v, v_norm, rule, method))


def _to_cpu(entry: LowRank) -> LowRank:
    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to("cpu").contiguous()

    return LowRank(
        entry.shape, entry.v_norm, entry.kind, entry.certificate,
        cpu(entry.u), cpu(entry.s), cpu(entry.v), entry.method, entry.failure,
    )  # fmt: skip


def check_profile_output(path: Path, force: bool) -> None:
    """Refuse an output path that cannot be written safely, before any work is done
    (``output.target.check_target``, the policy of every output).

    Raises:
        FilesystemError: a device, FIFO or socket (even with ``force``), a symlink or folder, an
            existing file without ``force``, a parent folder missing or not writable.
    """
    check_target(path, "--output", force=force)


def write_profile(
    path: Path,
    entries: Mapping[str, LowRank],
    inputs: Mapping[str, Any],
    rule: RankRule,
    *,
    transposed: Collection[str] = (),
    tied: Mapping[str, str] | None = None,
    force: bool = False,
    notices: Notices | None = None,
) -> int:
    """Write the profile atomically: a temporary file beside ``path``, fsync'd, renamed over it.

    Args:
        entries: from ``build_profile``; inputs: JSON-ready description of the model pair
            (``ResolvedInput.describe()``), stored as ``published.public_inputs`` gives it.
        rule: the rank rule the entries were built with.
        transposed: weights whose stored tensor is (in, out) (Conv1D), given transposed.
        tied: {"lm_head.weight": embedding} when the model pair ties its head (written only
            then: a profile of an untied pair is as before).
        notices: where reclaiming an interrupted run's staging beside ``path`` says so.
    Returns:
        The file's size in bytes.
    Raises:
        FilesystemError: see ``check_profile_output``; disk full or any write failure (nothing
            is left behind).
    """
    check_profile_output(path, force)
    tensors: dict[str, torch.Tensor] = {}
    weights: dict[str, Any] = {}
    for name, entry in entries.items():
        stored = {"." + key: t for key in "usv" if (t := getattr(entry, key)) is not None}
        tensors.update({name + suffix: t for suffix, t in stored.items()})
        weights[name] = _weight_metadata(entry, name in transposed, stored)
    body = {
        "tool": {"name": "safelora", "version": __version__},
        "inputs": public_inputs(inputs),  # shared with everyone: no local path of its maker
        "rank_rule": rule_json(rule),
        "weights": weights,
        **({"tied": dict(tied)} if tied else {}),
    }
    metadata = {
        "format": FORMAT,
        "schema_version": str(SCHEMA_VERSION),
        "profile": json.dumps(body, allow_nan=False, sort_keys=True),
    }
    _atomic_save(path, tensors, metadata, notices)
    return path.stat().st_size


def _weight_metadata(
    entry: LowRank, transposed: bool, stored: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    cert = entry.certificate
    return {
        "shape": list(entry.shape),
        "v_norm": entry.v_norm,
        "kind": entry.kind,
        "rank": entry.rank,
        "method": entry.method,
        "transposed": transposed,
        **{key: getattr(cert, key) for key in CERTIFICATE_FIELDS},
        "captured_energy": entry.captured_energy,
        "failure_probability": entry.failure,
        "sha256": {suffix: tensor_sha256(t) for suffix, t in stored.items()},
    }


def _atomic_save(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], notices: Notices | None
) -> None:
    try:
        write_safetensors(save_file, path, tensors, metadata, "--output", "profile", notices)
    except OSError as exc:
        raise output_error(path, exc) from exc

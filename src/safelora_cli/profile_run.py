"""Making an alignment profile: one streamed pass over the model pair, one atomic file.

The weights profiled are those a run can need: by default every 2-D weight of the repeated
blocks (all an adapter can target there), or ``--targets`` (``full_targets``: names, a regex or
all-linear; name ``lm_head`` or the embeddings to include them). Each V = W_aligned − W_base comes
from ``stream.alignment_stream`` in the module's (out, in) orientation (Conv1D weights are
transposed, and recorded as such), is decomposed under the rank rule (``lowrank.decompose``),
and the file is written by ``profile_build.write_profile``: complete under its name, or absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safelora_cli.full_targets import FullPair, Targets, pair_full_weights
from safelora_cli.index import TensorInfo, index_folder
from safelora_cli.job import PathLike, check_inputs_pair
from safelora_cli.lowrank import RankRule
from safelora_cli.notices import Notices, NotifyFn
from safelora_cli.pairing import MODEL_CONFIG
from safelora_cli.profile import read_profile
from safelora_cli.profile_build import build_profile, check_profile_output, write_profile
from safelora_cli.profile_summary import describe
from safelora_cli.resolve import resolve
from safelora_cli.scoring import ProgressFn
from safelora_cli.smallfiles import load_json
from safelora_cli.stream import alignment_stream


@dataclass(frozen=True)
class _Pair:
    """(W_base, W_aligned) as a ``stream.Difference``."""

    base: TensorInfo
    aligned: TensorInfo


def make_profile(
    base: PathLike,
    aligned: PathLike,
    output: PathLike,
    rule: RankRule = RankRule(),
    *,
    targets: tuple[str, ...] = (),
    device: torch.device | None = None,
    revision: str | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> dict[str, Any]:
    """Profile the model pair into ``output``.

    Args:
        base, aligned: the model pair (folder or hub id).
        output: the profile file; refused if it exists, unless ``force``.
        rule: the rank rule (``--rank K``, or ``--tolerance T`` up to ``--max-rank``).
        targets: which weights (default: every 2-D weight of the repeated blocks).
        device: where the decompositions run (default CPU).
        progress: called as ``progress(bytes_done, bytes_total, weight)``.
    Returns:
        ``profile_summary.describe`` of the file written, with the run's ``warnings``.
    Example:
        >>> make_profile("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf",
        ...              "llama-2-7b-chat.safetensors", RankRule(rank=32))
    """
    notices = Notices(notify)
    output = Path(output)
    base_input = resolve(str(base), revision, role="--base", notices=notices)
    aligned_input = resolve(str(aligned), revision, role="--aligned", notices=notices)
    check_inputs_pair(base_input, aligned_input, notices)
    base_index, aligned_index = index_folder(base_input.path), index_folder(aligned_input.path)
    config_path = base_input.path / MODEL_CONFIG
    model_type = (load_json(config_path, "model config") if config_path.exists() else {}).get(
        "model_type"
    )
    pairs = pair_full_weights(
        aligned_index,  # every profiled weight must be in both models, with one shape
        aligned_index,
        base_index,
        Targets.parse(targets) if targets else Targets(),
        model_type if isinstance(model_type, str) else None,
    )
    check_profile_output(output, force)
    entries = build_profile(
        _items(pairs, device or torch.device("cpu"), progress), rule, total=len(pairs)
    )
    inputs = {"base": base_input.describe(), "aligned": aligned_input.describe()}
    transposed = {pair.name for pair in pairs if pair.transpose}
    write_profile(output, entries, inputs, rule, transposed=transposed, force=force)
    summary = describe(read_profile(output))
    summary["warnings"] = notices.as_list()
    return summary


def _items(
    pairs: list[FullPair], device: torch.device, progress: ProgressFn | None
) -> Iterator[tuple[str, torch.Tensor, float]]:
    """(weight, V in the module's orientation, ‖V‖_F) for each pair, streamed."""
    diffs = []
    for pair in pairs:
        assert pair.base is not None  # paired against a base model
        diffs.append(_Pair(pair.base, pair.aligned))
    total = sum(d.base.nbytes + d.aligned.nbytes for d in diffs)
    done = 0
    for pair, (diff, v, v_norm) in zip(pairs, alignment_stream(diffs, device), strict=True):
        yield pair.name, (v.T if pair.transpose else v), v_norm
        done += diff.base.nbytes + diff.aligned.nbytes
        if progress is not None:
            progress(done, total, pair.name)

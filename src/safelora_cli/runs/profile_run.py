"""Making an alignment profile: one streamed pass over the model pair, one atomic file.

The weights profiled are those a run can need: by default every 2-D weight of the repeated
blocks (all an adapter can target there), or ``--targets`` (``full_targets``: names, a regex or
all-linear; name ``lm_head`` or the embeddings to include them: a tied ``lm_head`` is its
embedding, recorded as tied, ``heads.py``). Each V = W_aligned − W_base comes
from ``stream.map_alignment`` in the module's (out, in) orientation (Conv1D weights are
transposed, and recorded as such) and is decomposed under the rank rule (``lowrank.decompose``)
in the stream's worker threads, two weights at once on two cores, each single-threaded
(32-33 s against 36-40 s for the 6-layer bench pair with torch's two threads on one weight at a
time, for about 100 MB more); the file is written by ``profile_build.write_profile``: complete
under its name, or absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from safelora_cli.inputs.full_targets import FullPair, Targets, pair_full_weights
from safelora_cli.inputs.heads import HEAD, pair_heads, profiled_head
from safelora_cli.inputs.pairing import MODEL_CONFIG
from safelora_cli.inputs.smallfiles import load_json
from safelora_cli.math.lowrank import LowRank, RankRule
from safelora_cli.notices import Notices, NotifyFn
from safelora_cli.runs.kinds import ProgressFn
from safelora_cli.runs.pair_source import PairSource
from safelora_cli.runs.profile_build import check_profile_output, profile_entry, write_profile
from safelora_cli.runs.source import Alignment, Dense, PathLike, Weight
from safelora_cli.sources.profile import read_profile
from safelora_cli.sources.profile_summary import describe


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
    """Profile the model pair into ``output``: what every later run needs of V, in one file
    (``safelora profile``; public as ``safelora_cli.api.make_profile``).

    Args:
        base, aligned: the model pair (folder or hub id).
        output: the profile file; refused if it exists, unless ``force``.
        rule: the rank rule (``--rank K``, or ``--tolerance T`` up to ``--max-rank``).
        targets: which weights (default: every 2-D weight of the repeated blocks).
        device: where the decompositions run (default CPU).
        progress: called as ``progress(bytes_done, bytes_total, weight)``.
        notify: called with each notice.
    Returns:
        ``profile_summary.describe`` of the file written, with the run's ``warnings``.
    Example:
        >>> make_profile("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf",
        ...              "llama-2-7b-chat.safetensors", RankRule(rank=32))
    """
    notices = Notices(notify)
    output = Path(output)
    source = PairSource.open(base, aligned, revision, notices)
    base_index, aligned_index = source.base, source.aligned
    config_path = source.base_input.path / MODEL_CONFIG
    model_type = (load_json(config_path, "model config") if config_path.exists() else {}).get(
        "model_type"
    )
    chosen = Targets.parse(targets) if targets else Targets()
    head = profiled_head(pair_heads(base_index, aligned_index), chosen.matches("lm_head"), notices)
    pairs = pair_full_weights(
        aligned_index,  # every profiled weight must be in both models, with one shape
        aligned_index,
        base_index,
        chosen,
        model_type if isinstance(model_type, str) else None,
        model="the aligned model",
        head=head,  # a tied lm_head is its embedding, named as pairing names it
    )
    check_profile_output(output, force)
    entries = _entries(source, pairs, rule, device or torch.device("cpu"), progress)
    inputs = source.inputs()
    transposed = {pair.name for pair in pairs if pair.transpose}
    tied = {HEAD: head} if head is not None else None
    write_profile(output, entries, inputs, rule, transposed=transposed, tied=tied, force=force,
                  notices=notices)  # fmt: skip
    summary = describe(read_profile(output))
    summary["warnings"] = notices.as_list()
    return summary


def _entries(
    source: PairSource,
    pairs: list[FullPair],
    rule: RankRule,
    device: torch.device,
    progress: ProgressFn | None,
) -> dict[str, LowRank]:
    """weight -> its entry, for each pair in order: V streamed in the module's orientation."""
    transposed = {pair.name for pair in pairs if pair.transpose}

    def entry(weight: Weight, alignment: Alignment) -> LowRank:
        assert isinstance(alignment, Dense)  # the model pair streams V itself
        v = alignment.v.T if weight.name in transposed else alignment.v
        return profile_entry(weight.name, v, alignment.norm, rule)

    weights = [Weight(pair.name, pair.base, pair.aligned) for pair in pairs]
    total = sum(source.read_bytes(w) for w in weights)
    done, entries = 0, {}
    for weight, found in zip(weights, source.map(weights, device, entry), strict=True):
        entries[weight.name] = found
        done += source.read_bytes(weight)
        if progress is not None:
            progress(done, total, weight.name)
    return entries

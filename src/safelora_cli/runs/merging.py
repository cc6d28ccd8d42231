"""Merging: a patched adapter written as the full model it makes.

``--merge`` writes W_aligned + s · B' A for every module of the adapter (B' the patched lora_B of
the selected modules, in the adapter's dtype, exactly what the patched adapter would hold), with
PEFT's rules for every variant (``merge_plan.py``, ``merge.py``), into a copy of the aligned
model's shards: every other tensor, the shard layout, the index and the sidecar files stay the
aligned model's. It equals PEFT's ``merge_and_unload()`` of the patched adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from safelora_cli.inputs.adapter import Adapter
from safelora_cli.inputs.index import TensorIndex
from safelora_cli.inputs.loader import TensorReader
from safelora_cli.inputs.pairing import MODEL_CONFIG, ModulePair
from safelora_cli.inputs.smallfiles import load_json
from safelora_cli.notices import Notices
from safelora_cli.output.merge import merged_tensors
from safelora_cli.output.merge_plan import plan_merge
from safelora_cli.output.shards import ShardWriter
from safelora_cli.output.writer import OutputFolder
from safelora_cli.runs.source import AdapterModule


def write_merged(
    aligned: TensorIndex,
    aligned_root: Path,
    adapter: Adapter,
    modules: Sequence[AdapterModule],
    replaced_factors: Callable[[], Mapping[str, torch.Tensor]],
    adapter_name: str | None,
    out: OutputFolder,
    device: torch.device,
    notices: Notices,
) -> None:
    """Write the merged model of one patched adapter into ``out`` (shards only; the caller
    copies the aligned model's sidecar files).

    Args:
        aligned, aligned_root: the aligned model's index and folder (its ``config.json``).
        modules: the adapter's modules, paired against the model pair.
        replaced_factors: returns lora_B tensor name -> B' as the patched adapter stores it.
    """
    config_path = aligned_root / MODEL_CONFIG
    config = load_json(config_path, "model config") if config_path.exists() else {}
    tied = config.get("tie_word_embeddings")
    pairs = [_module_pair(module) for module in modules]
    plan = plan_merge(
        adapter, pairs, aligned, adapter_name, tied if isinstance(tied, bool) else None
    )
    replaced = replaced_factors()
    lora_b = {pair.name: replaced[pair.lora.b.name] for pair in pairs
              if pair.lora.b.name in replaced}  # fmt: skip
    for module in plan.tied:
        notices.add(
            "merged-tied",
            f"{module}: shares its weight with the input embedding (tied): the merge changed "
            "both, as PEFT's merge does; the merged model differs from the adapter there",
        )
    with TensorReader() as reader, ShardWriter(aligned, out.path) as writer:
        for info, tensor in merged_tensors(plan, reader.read, lora_b, device):
            writer.replace(info, tensor)
        writer.finalize()


def _module_pair(module: AdapterModule) -> ModulePair:
    base, aligned = module.weight.base, module.weight.aligned
    assert base is not None
    assert aligned is not None
    return ModulePair(module.lora, base, aligned, module.transpose, module.tied)

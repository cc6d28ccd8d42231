"""Merging through the pipeline: a patched adapter written as the full model it makes.

``--merge`` writes W_aligned + s · B' A for every module of the adapter (B' the patched lora_B of
the selected modules, in the adapter's dtype, exactly what the patched adapter would hold), with
PEFT's rules for every variant (``merge_plan.py``, ``merge.py``), into a copy of the aligned
model's shards: every other tensor, the shard layout, the index and the sidecar files stay the
aligned model's. It equals PEFT's ``merge_and_unload()`` of the patched adapter.
"""

from __future__ import annotations

import torch

from safelora_cli.inputs.loader import TensorReader
from safelora_cli.inputs.pairing import MODEL_CONFIG
from safelora_cli.inputs.smallfiles import load_json
from safelora_cli.notices import Notices
from safelora_cli.output.merge import merged_tensors
from safelora_cli.output.merge_plan import plan_merge
from safelora_cli.output.shards import ShardWriter
from safelora_cli.output.writer import OutputFolder
from safelora_cli.runs.job import AdapterJob, Job
from safelora_cli.runs.scoring import Scored


def write_merged(
    job: Job, scored: Scored, out: OutputFolder, device: torch.device, notices: Notices
) -> None:
    """Write the merged model of one scored adapter into ``out`` (shards only; the caller copies
    the aligned model's sidecar files)."""
    adapter = scored.job
    assert isinstance(adapter, AdapterJob)  # scored against the model pair, not a profile
    config_path = job.aligned_input.path / MODEL_CONFIG
    config = load_json(config_path, "model config") if config_path.exists() else {}
    tied = config.get("tie_word_embeddings")
    plan = plan_merge(
        adapter.adapter,
        adapter.pairs,
        job.aligned,
        job.settings.adapter_name,
        tied if isinstance(tied, bool) else None,
    )
    replaced = scored.replaced_factors()  # B' as the patched adapter stores it
    lora_b = {pair.name: replaced[pair.lora.b.name] for pair in adapter.pairs
              if pair.lora.b.name in replaced}  # fmt: skip
    for module in plan.tied:
        notices.add(
            "merged-tied",
            f"{module}: shares its weight with the input embedding (tied): the merge changed "
            "both, as PEFT's merge does; the merged model differs from the adapter there",
        )
    with TensorReader() as reader, ShardWriter(job.aligned, out.path) as writer:
        for info, tensor in merged_tensors(plan, reader.read, lora_b, device):
            writer.replace(info, tensor)
        writer.finalize()

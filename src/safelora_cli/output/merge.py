"""Merge: the full model an adapter makes, W_aligned + s · B A, as PEFT's ``merge_and_unload()``.

What PEFT (0.21, ``tuners/lora/layer.py`` ``get_delta_weight`` / ``merge``, ``utils/save_and_load``)
does for each variant, and so what this module does:

    Linear         W += s · B A                         (B: lora_B (out, r), A: lora_A (r, in))
    scaling        s = alpha / r, or alpha / sqrt(r) with use_rslora; r and alpha from the first
                   matching rank_pattern / alpha_pattern key, else r / lora_alpha
    Conv1D         W is stored (in, out) (GPT-2; fan_in_fan_out, set by PEFT per layer class):
                   W += s · (B A)ᵀ
    fused          qkv_proj, gate_up_proj, c_attn are single layers whose out is the fused size:
                   the same rule, nothing split
    lora_bias      the layer's bias += s · lora_B.bias
    embedding      W (num, dim) += s · (B A)ᵀ with A = lora_embedding_A (r, num),
                   B = lora_embedding_B (dim, r)
    saved tensors  modules_to_save copies, embedding layers saved with the adapter, biases of
                   bias="all"/"lora_only": loaded over the model's tensors, before the merge
    tied lm_head   lm_head and the input embedding are one Parameter: the merge adds lm_head's
                   update to it in place, so the input embedding changes too (and an embedding LoRA
                   changes the head), and save_pretrained writes that one tensor. Done the same
                   here: the update goes to the stored embedding (and to a stored lm_head copy
                   when config.json ties them); ``MergePlan.tied`` names such modules so the
                   caller can warn that the merged model differs from the adapter there.

Sums are in float32 and cast once to the model's dtype, overflow refused. (PEFT adds a delta it
has already cast to the model's dtype: for fp16/bf16 models the two differ by rounding only.)
The plan comes from ``merge_plan.plan_merge`` (headers only); tensors are read through the
caller's ``read`` callback, one merged tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from safelora_cli.errors import IncompatibleInputError
from safelora_cli.inputs.index import TensorInfo
from safelora_cli.inputs.loader import TORCH_DTYPES
from safelora_cli.math.delta import Factored, add_delta, cast_finite, concat
from safelora_cli.output.merge_plan import LoraTerm, MergePlan, TensorMerge

Reader = Callable[[TensorInfo], torch.Tensor]


def lora_factors(term: LoraTerm, a: torch.Tensor, b: torch.Tensor) -> Factored:
    """s · B A of ``term`` in its target's layout, as factors.

    Args:
        a, b: float32, as stored: lora_A (r, in) / lora_B (out, r), or an embedding's
            lora_embedding_A (r, num) / lora_embedding_B (dim, r).
    """
    if term.transposed:
        return Factored(a.T, b.T * term.scaling)
    return Factored(b * term.scaling, a)


def _start(merge: TensorMerge, read: Reader) -> torch.Tensor:
    """The tensor before any update: the aligned one, or the adapter's copy (all copies equal)."""
    if not merge.replacements:
        return read(merge.target)
    first, *rest = (read(info) for info in merge.replacements)
    for info, other in zip(merge.replacements[1:], rest, strict=True):
        if not torch.equal(first.float(), other.float()):
            raise IncompatibleInputError(
                f"{info.name} and {merge.replacements[0].name} both replace {merge.target.name} "
                "with different values",
                "the adapter file is inconsistent; save it again",
            )
    return first


def merged_tensor(
    merge: TensorMerge,
    read: Reader,
    lora_b: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Compute one tensor of the merged model.

    Args:
        merge: from ``plan_merge``.
        read: returns a tensor as stored (e.g. ``loader.TensorReader().read``).
        lora_b: module -> the lora_B to merge instead of the stored one (the patched B', float32
            (out, r), e.g. ``ModuleScore.projected_b`` of the selected modules).
        device: where the updates are computed (default CPU).
    Returns:
        A contiguous CPU tensor in the aligned tensor's dtype and shape.
    Raises:
        NumericalError: a value the dtype cannot hold.
    """
    device = device or torch.device("cpu")
    dtype, name = TORCH_DTYPES[merge.target.dtype], merge.target.name
    start = _start(merge, read)
    if merge.terms:
        overrides = lora_b or {}
        updates = []
        for term in merge.terms:
            b = overrides[term.module] if term.module in overrides else read(term.b)
            a = read(term.a).to(device, torch.float32)
            updates.append(lora_factors(term, a, b.to(device, torch.float32)))
        return add_delta(start, concat(updates), dtype, name)
    if merge.bias_terms:
        total = start.to(device, torch.float32)
        for bias in merge.bias_terms:
            total = total + bias.scaling * read(bias.bias).to(device, torch.float32)
        return cast_finite(total, dtype, name)
    return cast_finite(start, dtype, name)


def merged_tensors(
    plan: MergePlan,
    read: Reader,
    lora_b: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """Yield (aligned tensor, merged value) in the plan's order, one at a time, ready for
    ``shards.ShardWriter.replace``. See ``merged_tensor`` for the arguments."""
    with torch.inference_mode():
        for merge in plan.tensors:
            yield merge.target, merged_tensor(merge, read, lora_b, device)

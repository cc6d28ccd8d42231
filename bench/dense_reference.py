"""Dense Safe LoRA, the way the official code (IBM/SafeLoRA, ``model.py``) computes it.

It is the baseline safelora is measured against, and an independent check of its selection: it
imports nothing from safelora_cli. Like the official code it

1. loads three full float32 models: base, aligned, and the PEFT host model (the base weights with
   the adapter's lora_A/lora_B attached);
2. builds every projection matrix first: Ĉ = V Vᵀ / ‖V‖_F with V = W_aligned − W_base, one
   (out, out) matrix per targeted module, all kept in memory;
3. scores each module with the dense update: cos(Ĉ B A, B A) over the flattened (out, in) matrices;
4. selects the K lowest cosines (ties at the K-th value included) and sets B' = Ĉ B.

It is a little kinder than the official code: no ``copy.deepcopy`` of the PEFT model (a fourth
copy), one scoring pass instead of two in number mode, no rounding of the cosines.

Usage:
    python bench/dense_reference.py ADAPTER --base DIR --aligned DIR --output DIR [--num-layers K]

Writes ``OUTPUT/adapter_model.safetensors`` and ``OUTPUT/dense_report.json`` (cosines, selected).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def load_model_fp32(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard in ``folder``, as float32 (``from_pretrained``'s default)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v.float() for k, v in load_file(str(shard)).items()})
    return tensors


def lora_factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name (base weight name without ``.weight``) -> (A (r, in), B (out, r)), float32."""
    tensors = load_file(str(adapter / ADAPTER_FILE))
    factors = {}
    for key in tensors:
        if ".lora_A." in key:
            module = key.removeprefix(PREFIX).split(".lora_A.")[0]
            b_key = key.replace(".lora_A.", ".lora_B.")
            factors[module] = (tensors[key].float(), tensors[b_key].float())
    return factors


def projection_matrix(w_base: torch.Tensor, w_aligned: torch.Tensor) -> torch.Tensor:
    """Ĉ = V Vᵀ / ‖V‖_F, (out, out): the official ``get_aligned_matrix``."""
    v = w_aligned - w_base
    c_hat: torch.Tensor = torch.mm(v, v.t()) / torch.norm(v)
    return c_hat


def dense_cosine(c_hat: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(Ĉ B A, B A) with both (out, in) matrices built: the official ``projected_weighted``."""
    projected = torch.mm(torch.mm(c_hat, b), a)
    original = torch.mm(b, a)
    cos = torch.nn.functional.cosine_similarity(projected.reshape(1, -1), original.reshape(1, -1))
    return float(cos.item())


def run(
    adapter: Path, base: Path, aligned: Path, output: Path, num_layers: int
) -> dict[str, object]:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    base_model = load_model_fp32(base)
    aligned_model = load_model_fp32(aligned)
    host_model = load_model_fp32(base)  # the PEFT model's own copy of the base weights
    factors = lora_factors(adapter)
    timings["load_s"] = time.perf_counter() - started

    # The official code walks named_parameters(), i.e. model order; the adapter holds the modules.
    modules = [name.removesuffix(".weight") for name in host_model if name.endswith(".weight")]
    modules = [m for m in modules if m in factors]
    mark = time.perf_counter()
    projections = {m: projection_matrix(base_model[m + ".weight"], aligned_model[m + ".weight"])
                   for m in modules}  # fmt: skip
    timings["projection_matrices_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    cosines = {m: dense_cosine(projections[m], *factors[m]) for m in modules}
    timings["cosines_s"] = time.perf_counter() - mark

    threshold = sorted(cosines.values())[min(num_layers, len(cosines)) - 1]
    selected = [m for m in modules if cosines[m] <= threshold]
    mark = time.perf_counter()
    adapter_tensors = load_file(str(adapter / ADAPTER_FILE))
    for module in selected:
        key = f"{PREFIX}{module}.lora_B.weight"
        dtype = adapter_tensors[key].dtype
        adapter_tensors[key] = torch.mm(projections[module], factors[module][1]).to(dtype)
    output.mkdir(parents=True, exist_ok=True)
    with safe_open(str(adapter / ADAPTER_FILE), "pt") as handle:
        metadata = handle.metadata()
    save_file(adapter_tensors, str(output / ADAPTER_FILE), metadata=metadata)
    timings["project_and_write_s"] = time.perf_counter() - mark
    report = {
        "num_layers": num_layers,
        "threshold_used": threshold,
        "cosines": cosines,
        "selected": selected,
        "projection_matrix_floats": sum(p.numel() for p in projections.values()),
        "timings": timings,
    }
    (output / "dense_report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--aligned", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--num-layers", type=int, default=10)
    args = parser.parse_args(argv)
    with torch.inference_mode():
        report = run(args.adapter, args.base, args.aligned, args.output, args.num_layers)
    print(f"dense: {len(report['selected'])} modules projected", file=sys.stderr)  # type: ignore[arg-type]
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

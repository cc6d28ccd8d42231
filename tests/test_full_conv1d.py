"""A full fine-tune of a GPT-2 (Conv1D layers: weights stored (in, out)) end to end, against a
dense float64 reference built in the module's (out, in) orientation and written back transposed.

GPT-2's square ``attn.c_proj`` is the case a layout slip cannot be caught by shapes: V, D and
P D all fit either way round, so only the values tell. The model is a seeded transformers GPT-2
(``tests.factories.gpt2_pair``), its fine-tune ``synthetic.make_full_finetune``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safelora_cli.settings import Projection, ProjectionSpec
from safelora_cli.synthetic import FineTuneSpec, make_full_finetune
from tests.factories import gpt2_pair
from tests.full_helpers import (
    FullRun,
    Scored,
    Target,
    cosine,
    dense_paper,
    dense_subspace,
    folder_tensors,
    load_in_transformers,
    patch_full,
    same_bytes,
)
from tests.helpers import REPORT, invoke

SQUARE = "transformer.h.1.attn.c_proj.weight"  # (32, 32): hidden x hidden
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def build(root: Path) -> tuple[Path, Path, Path]:
    base, aligned = gpt2_pair(root / "pair", seed=6)
    frozen = ("transformer.h.0.mlp.c_fc",)  # one weight the fine-tune left alone
    return make_full_finetune(root / "ft", base, aligned, FineTuneSpec(frozen)), base, aligned


def module_view(stored: torch.Tensor) -> torch.Tensor:
    """A Conv1D weight (in, out) as the module's (out, in) matrix, in float64."""
    return stored.double().T


def patch_via_profile(ft: Path, base: Path, aligned: Path, out: Path, rank: int) -> FullRun:
    """``safelora profile`` of the pair (rank 8: all of V's rank 4), then ``patch FT --profile
    --aligned`` in subspace mode, every weight projected; read back from the report."""
    profile = out.parent / "pair.safetensors"
    made = invoke(["profile", "--base", str(base), "--aligned", str(aligned), "-o", str(profile),
                   "--rank", "8", "-q"])  # fmt: skip
    assert made.exit_code == 0, made.stderr
    result = invoke(["patch", str(ft), "--profile", str(profile), "--aligned", str(aligned),
                     "-o", str(out), "-q", "--select", "threshold", "--threshold", "1",
                     "--projection", "subspace", "--rank", str(rank)])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / REPORT).read_text())
    modules = report["modules"]
    return FullRun(
        pairs=[Target(m["weight"]) for m in modules],
        scores={m["weight"]: Scored(m["cosine"], m["skipped"]) for m in modules},
        selected={m["weight"] for m in modules if m["projected"]},
        report=report,
    )


@pytest.mark.parametrize(
    ("spec", "targets", "via_profile"),
    [
        pytest.param(ProjectionSpec(), (), False, id="paper-every-block-weight"),
        pytest.param(ProjectionSpec(Projection.SUBSPACE, rank=3), (), False, id="subspace"),
        pytest.param(ProjectionSpec(), ("attn.c_proj",), False, id="paper-square-c_proj-only"),
        pytest.param(ProjectionSpec(Projection.SUBSPACE, rank=3), (), True, id="via-profile"),
    ],
)
def test_a_gpt2_fine_tune_is_patched_in_its_stored_layout(
    tmp_path: Path, spec: ProjectionSpec, targets: tuple[str, ...], via_profile: bool
) -> None:
    ft, base, aligned = build(tmp_path)
    out = tmp_path / "out"
    run = (
        patch_via_profile(ft, base, aligned, out, spec.rank or 0)
        if via_profile
        else patch_full(ft, base, aligned, out, spec, "threshold", threshold=1.0, targets=targets)
    )
    t_base, t_aligned, t_ft = folder_tensors(base), folder_tensors(aligned), folder_tensors(ft)
    leaves = targets or CONV1D
    want_targets = {
        n
        for n, t in t_ft.items()
        if t.dim() == 2 and any(n.endswith(f".{x}.weight") for x in leaves)
    }
    assert {p.name for p in run.pairs} == want_targets
    assert SQUARE in want_targets
    records = {m["weight"]: m for m in run.report["modules"]}
    got = folder_tensors(out)
    for name in want_targets:
        stored = t_ft[name].shape
        assert records[name]["transposed"] is True
        assert records[name]["shape"] == [stored[1], stored[0]]  # the module's (out, in)
        v = module_view(t_aligned[name]) - module_view(t_base[name])
        d = module_view(t_ft[name]) - module_view(t_aligned[name])
        if float(d.norm()) == 0:
            assert run.scores[name].skipped is not None
            assert same_bytes(got[name], t_ft[name])
            continue
        subspace = spec.kind == Projection.SUBSPACE
        pd = dense_subspace(v, d, spec.rank or 0) if subspace else dense_paper(v, d)
        assert run.scores[name].cosine == pytest.approx(cosine(pd, d), abs=1e-5), name
        assert name in run.selected  # threshold 1: every scored weight is projected
        # written back in the stored (in, out) layout: W_aligned + (P D)ᵀ, rounded once to
        # float32, so every entry within one float32 rounding of the largest weight
        assert got[name].shape == stored
        update = got[name].double() - t_aligned[name].double()
        rounding = torch.finfo(torch.float32).eps * float(got[name].abs().max())
        assert float((update - pd.T).abs().max()) <= rounding, name
        if name == SQUARE:  # P D left untransposed fits too: only the values tell them apart
            assert float((pd - pd.T).abs().max()) > 10 * rounding
    for name, tensor in got.items():
        if name not in run.selected:
            assert same_bytes(tensor, t_ft[name]), name


@pytest.mark.slow
def test_the_patched_gpt2_loads_in_transformers_with_every_key(tmp_path: Path) -> None:
    ft, base, aligned = build(tmp_path)
    out = tmp_path / "out"
    run = patch_full(ft, base, aligned, out, select="threshold", threshold=1.0)
    state = load_in_transformers(out).state_dict()
    written = folder_tensors(out)
    assert SQUARE in run.selected
    for name in run.selected:
        assert torch.equal(state[name], written[name])

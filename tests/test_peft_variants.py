"""Every PEFT LoRA variant, made by real PEFT, patched by ``safelora patch``, loaded back by PEFT.

Each case builds a tiny transformers model (Llama from ``safelora_cli.synthetic``; GPT-2 and Phi-3
from ``tests.factories``), an adapter with PEFT's own ``get_peft_model`` (LoRA factors then given
seeded non-zero values) and ``save_pretrained``, and patches it with every module projected. Then:

(a) ``PeftModel.from_pretrained`` loads the patched folder with no missing or unexpected key;
(b) every LoRA layer of the loaded model computes base(x) + scaling · x Aᵀ B'ᵀ, with A and B' read
    from the patched file and the scaling worked out here by hand (alpha / r, alpha / sqrt(r) for
    rsLoRA, rank and alpha patterns by PEFT's first-match rule);
(c) every projected B' equals Ĉ B with Ĉ = V Vᵀ / ‖V‖_F built densely in float64 from the model
    files, the report's cosine equals the dense cos(Ĉ B A, B A), and every other tensor is copied
    byte for byte and listed in the report's ``passthrough``.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from typer.testing import Result

from safelora_cli.errors import ExitCode
from safelora_cli.inputs.adapter import PREFIX
from safelora_cli.synthetic import LlamaShape, PairSpec, make_pair
from tests.factories import (
    gpt2_pair,
    load_peft,
    model_tensors,
    peft_adapter,
    peft_model,
    phi3_pair,
    randomize_lora,
)
from tests.helpers import CONFIG, PROJECT_ALL, Q0, REPORT, WEIGHTS, Cli, rel_err

pytestmark = pytest.mark.slow

FACTOR = re.compile(r"\.(lora_A|lora_B)(\.[^.]+)?\.weight$")
KEY_WARNING = re.compile(r"(missing|unexpected).*keys?", re.IGNORECASE)
TIED = {"lm_head": ("model.embed_tokens", "transformer.wte")}
Pair = tuple[Path, Path]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    """One base/aligned pair per architecture, built once for the whole file."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_pair(root / "llama", PairSpec(seed=3)),
        "llama-tied": make_pair(
            root / "llama-tied", PairSpec(shape=LlamaShape(tie_embeddings=True), seed=4)
        ),
        "gpt2": gpt2_pair(root / "gpt2", seed=5),
        "phi3": phi3_pair(root / "phi3", seed=6),
    }


def patch(cli: Cli, adapter: Path, pair: Pair, out: Path, *extra: str) -> Result:
    base, aligned = pair
    args = ["patch", str(adapter), "--base", str(base), "--aligned", str(aligned)]
    return cli([*args, "--output", str(out), *extra])


def leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def layer(module: str) -> int:
    return int(re.findall(r"\.(\d+)\.", module)[0])


# --- the dense float64 reference ---------------------------------------------------------------


@functools.cache
def cached_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return model_tensors(folder)


def alignment(pair: Pair, module: str, transposed: bool) -> torch.Tensor:
    """V = W_aligned − W_base in float64, (out, in), straight from the model files."""
    base, aligned = cached_tensors(pair[0]), cached_tensors(pair[1])
    names = [module, *TIED.get(module, ())]
    name = next(f"{n}.weight" for n in names if f"{n}.weight" in base)
    v = aligned[name].double() - base[name].double()
    return v.T if transposed else v


def paper_reference(v: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[Any, float]:
    """(Ĉ B, cos(Ĉ B A, B A)) with the out x out Ĉ and the out x in B A built densely."""
    c_hat = v @ v.T / torch.linalg.matrix_norm(v)
    pb = c_hat @ b
    cosine = torch.nn.functional.cosine_similarity((pb @ a).flatten(), (b @ a).flatten(), dim=0)
    return pb, float(cosine)


def same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (
        x.dtype == y.dtype
        and x.shape == y.shape
        and x.view(-1).view(torch.uint8).equal(y.view(-1).view(torch.uint8))
    )


# --- the checks ------------------------------------------------------------------------------


def check_files(
    adapter: Path, out: Path, report: dict[str, Any], projected_keys: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Same keys; the projected lora_B's changed; everything else byte-identical; the report's
    passthrough is every tensor that is not a factor of one of its modules."""
    before, after = load_file(adapter / WEIGHTS), load_file(out / WEIGHTS)
    assert after.keys() == before.keys()
    assert set(report["passthrough"]) == set(before) - _factor_keys(report, before)
    for key in before:
        if key in projected_keys:
            assert not same_bytes(before[key], after[key]), key
        else:
            assert same_bytes(before[key], after[key]), key
    assert json.loads((out / CONFIG).read_text()) == json.loads((adapter / CONFIG).read_text())
    return before, after


def _factor_keys(report: dict[str, Any], tensors: dict[str, torch.Tensor]) -> set[str]:
    """The lora_A/lora_B keys of the report's modules (the chosen adapter's)."""
    name = report["settings"]["adapter_name"]
    suffix = f".{name}" if name else ""
    return {
        f"{PREFIX}{m['module']}.{kind}{suffix}.weight"
        for m in report["modules"]
        for kind in ("lora_A", "lora_B")
    } & set(tensors)


def factor(tensors: dict[str, torch.Tensor], module: str, kind: str, name: str = "") -> Any:
    suffix = f".{name}" if name else ""
    return tensors[f"{PREFIX}{module}.{kind}{suffix}.weight"]


def check_reference(
    pair: Pair, entry: dict[str, Any], before: dict[str, torch.Tensor], after: dict[str, Any]
) -> float:
    """(c): the patched B' against the dense float64 Ĉ B; returns the relative error."""
    module, name = entry["module"], ""
    a, b = factor(before, module, "lora_A", name), factor(before, module, "lora_B", name)
    v = alignment(pair, module, entry["transposed"])
    pb, cosine = paper_reference(v, b.double(), a.double())
    err = rel_err(factor(after, module, "lora_B", name), pb)
    assert err <= 1e-4, (module, err)
    assert entry["cosine"] == pytest.approx(cosine, rel=1e-4, abs=1e-7)
    return err


def lora_layers(model: Any) -> dict[str, Any]:
    return {
        name.removeprefix(PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def check_forward(
    model: Any,
    after: dict[str, torch.Tensor],
    scaling: Callable[[str], float],
    adapter: str = "default",
    key_name: str = "",
) -> None:
    """(b): each LoRA layer computes base(x) + s · x Aᵀ B'ᵀ (+ s · lora_B bias) in float64."""
    gen = torch.Generator().manual_seed(0)
    layers = {n: m for n, m in lora_layers(model).items() if adapter in m.scaling}
    assert layers
    for module, lora in layers.items():
        s = scaling(module)
        assert lora.scaling[adapter] == pytest.approx(s, rel=1e-12), module
        base = lora.get_base_layer()
        if isinstance(base, torch.nn.Embedding):
            a = after[f"{PREFIX}{module}.lora_embedding_A"].double()
            b = after[f"{PREFIX}{module}.lora_embedding_B"].double()
            ids = torch.randint(0, base.num_embeddings, (5,), generator=gen)
            want = base(ids) + s * (a.T[ids] @ b.T)
            torch.testing.assert_close(lora(ids), want, rtol=1e-10, atol=1e-12)
            continue
        a = factor(after, module, "lora_A", key_name).double()
        b = factor(after, module, "lora_B", key_name).double()
        x = torch.randn(3, a.shape[1], generator=gen, dtype=torch.float64)
        want = base(x) + s * (x @ a.T @ b.T)
        bias_key = f"{PREFIX}{module}.lora_B.bias"
        if bias_key in after:
            want = want + s * after[bias_key].double()
        torch.testing.assert_close(lora(x), want, rtol=1e-10, atol=1e-12)


def load_checked(base: Path, out: Path) -> Any:
    """(a): PEFT loads the patched folder with every key matched: no warning about keys from
    ``from_pretrained``, and PEFT's own account of the keys when the file is loaded again."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_peft(base, out)
    about_keys = [str(w.message) for w in caught if KEY_WARNING.search(str(w.message))]
    assert about_keys == []
    result = set_peft_model_state_dict(model, load_file(out / WEIGHTS))
    assert list(result.unexpected_keys) == []
    assert [k for k in result.missing_keys if re.search(r"\.default(\.|$)", k)] == []
    return model


# --- the variants ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A LoraConfig variant and what PEFT and the report must make of it."""

    family: str
    lora: dict[str, Any]
    scaling: Callable[[str], float]  # by hand, per module
    modules: int  # LoRA linear modules in the adapter
    transposed: Callable[[str], bool] = lambda module: False
    tied: frozenset[str] = frozenset()
    fused: frozenset[str] = frozenset()
    passthrough: tuple[str, ...] = ()  # key fragments that must be in report["passthrough"]
    saved: dict[str, Any] = field(default_factory=dict)  # adapter_config.json values PEFT wrote


def _patterns(module: str) -> float:
    # rank_pattern {r"layers\.1\.self_attn\.q_proj": 6, "q_proj": 2, "down_proj": 3}: PEFT takes
    # the first key that matches, so layer 1's q_proj gets 6 and layer 0's gets 2.
    # alpha_pattern {r"model\.layers\.0\.self_attn\.v_proj": 2, "v_proj": 5}
    rank = {"q_proj": 6 if layer(module) == 1 else 2, "down_proj": 3}.get(leaf(module), 4)
    alpha = {"v_proj": 2 if layer(module) == 0 else 5}.get(leaf(module), 8)
    return alpha / rank


def _rslora(module: str) -> float:
    # use_rslora, r 4, alpha 8, rank_pattern {"gate_proj": 16}, alpha_pattern {"k_proj": 6}
    rank = 16 if leaf(module) == "gate_proj" else 4
    alpha = 6 if leaf(module) == "k_proj" else 8
    return alpha / math.sqrt(rank)


CASES = {
    "list-rank-alpha-patterns": Case(
        "llama",
        {
            "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {r"layers\.1\.self_attn\.q_proj": 6, "q_proj": 2, "down_proj": 3},
            "alpha_pattern": {r"model\.layers\.0\.self_attn\.v_proj": 2, "v_proj": 5},
        },
        _patterns, 6,
    ),
    "rslora": Case(
        "llama",
        {
            "r": 4, "lora_alpha": 8, "use_rslora": True,
            "target_modules": ["q_proj", "k_proj", "gate_proj"],
            "rank_pattern": {"gate_proj": 16}, "alpha_pattern": {"k_proj": 6},
        },
        _rslora, 6,
    ),
    "regex-target": Case(
        "llama",
        {"r": 4, "lora_alpha": 4, "target_modules": r".*\.layers\.1\.mlp\.(gate|up)_proj"},
        lambda m: 1.0, 2,
    ),
    "all-linear": Case(
        "llama", {"r": 2, "lora_alpha": 16, "target_modules": "all-linear"}, lambda m: 8.0, 14
    ),
    "layers-to-transform": Case(
        "llama",
        {
            "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"],
            "layers_to_transform": [1], "layers_pattern": "layers",
        },
        lambda m: 2.0, 2,
    ),
    "lora-bias": Case(
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_bias": True},
        lambda m: 2.0, 4, passthrough=("q_proj.lora_B.bias", "v_proj.lora_B.bias"),
    ),
    "tied-lm-head-embedding-modules-to-save": Case(
        "llama-tied",
        {
            "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head", "embed_tokens"],
            "modules_to_save": ["model.norm"],
        },
        lambda m: 2.0, 3, tied=frozenset({"lm_head"}),
        passthrough=(
            "embed_tokens.lora_embedding_A", "embed_tokens.lora_embedding_B",
            "model.norm.weight", "lm_head.base_layer.weight",
        ),
    ),
    "gpt2-fan-in-fan-out-fused-biases": Case(
        "gpt2",
        {
            "r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"],
            "fan_in_fan_out": True, "bias": "all",
        },
        lambda m: 2.0, 8, transposed=lambda m: True, fused=frozenset({"c_attn"}),
        passthrough=("attn.c_attn.base_layer.bias", "mlp.c_fc.base_layer.bias", "ln_f.bias"),
        saved={"fan_in_fan_out": True},
    ),
    # PEFT sets fan_in_fan_out per layer (Conv1D or Linear) and overwrites the config's flag as it
    # goes: lm_head comes last, so the saved flag is False although c_attn / c_proj are Conv1D.
    "gpt2-conv1d-and-linear": Case(
        "gpt2",
        {"r": 4, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj", "lm_head"]},
        lambda m: 1.0, 7, transposed=lambda m: m != "lm_head", tied=frozenset({"lm_head"}),
        fused=frozenset({"c_attn"}), saved={"fan_in_fan_out": False},
    ),
    # The same with only square Conv1D layers: no shape check can tell their layout, and reading
    # the saved flag (False) would pair them untransposed and project them silently wrong.
    "gpt2-square-conv1d-and-linear": Case(
        "gpt2",
        {"r": 2, "lora_alpha": 4, "target_modules": ["attn.c_proj", "lm_head"]},
        lambda m: 2.0, 3, transposed=lambda m: m != "lm_head", tied=frozenset({"lm_head"}),
        saved={"fan_in_fan_out": False},
    ),
    "phi3-fused": Case(
        "phi3",
        {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj", "gate_up_proj", "o_proj"]},
        lambda m: 2.0, 6, fused=frozenset({"qkv_proj", "gate_up_proj"}),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_variant_is_patched_exactly_and_loads_in_peft(
    case: Case, models: dict[str, Pair], cli: Cli, tmp_path: Path
) -> None:
    pair = models[case.family]
    adapter = peft_adapter(pair[0], LoraConfig(**case.lora), tmp_path / "adapter", seed=2)
    saved = json.loads((adapter / CONFIG).read_text())
    assert {k: saved[k] for k in case.saved} == case.saved
    out = tmp_path / "out"
    result = patch(cli, adapter, pair, out, *PROJECT_ALL)
    assert result.exit_code == ExitCode.OK, result.stderr
    report = json.loads((out / REPORT).read_text())

    entries = {m["module"]: m for m in report["modules"]}
    assert len(entries) == case.modules
    assert all(m["projected"] for m in entries.values())
    for module, entry in entries.items():
        assert entry["transposed"] is case.transposed(module), module
        assert entry["tied"] is (module in case.tied), module
        assert entry["fused"] is (leaf(module) in case.fused), module
    for fragment in case.passthrough:
        assert any(fragment in key for key in report["passthrough"]), fragment

    projected = {f"{PREFIX}{m}.lora_B.weight" for m in entries}
    before, after = check_files(adapter, out, report, projected)
    for entry in entries.values():
        check_reference(pair, entry, before, after)
    check_forward(load_checked(pair[0], out), after, case.scaling)


def test_pattern_order_lost_on_save_is_refused_as_peft_refuses_it(
    models: dict[str, Pair], cli: Cli, tmp_path: Path
) -> None:
    """save_pretrained writes the config with sorted keys, so overlapping rank_pattern keys can
    match in another order than in training: layer 1's q_proj was built with rank 2 ("q_proj" came
    first) but the saved config gives it 6. PEFT cannot load that adapter; neither can safelora."""
    pair = models["llama"]
    rank_pattern = {"q_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern=rank_pattern)
    adapter = peft_adapter(pair[0], lora, tmp_path / "adapter")
    saved = json.loads((adapter / CONFIG).read_text())["rank_pattern"]
    assert list(saved) == sorted(rank_pattern)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_peft(pair[0], adapter)
    out = tmp_path / "out"
    result = patch(cli, adapter, pair, out, *PROJECT_ALL)
    assert result.exit_code == ExitCode.INCOMPATIBLE
    assert "model.layers.1.self_attn.q_proj" in result.stderr
    assert "rank 2 in the file, 6 in adapter_config.json" in result.stderr
    assert not out.exists()


# --- several adapters in one file ------------------------------------------------------------


def test_one_adapter_of_a_multi_adapter_file_is_patched(
    models: dict[str, Pair], cli: Cli, tmp_path: Path
) -> None:
    """A raw PeftModel state dict with adapters "default" and "second" (both on q_proj)."""
    pair = models["llama"]
    config = {"r": 4, "lora_alpha": 8}
    model = peft_model(pair[0], LoraConfig(**config, target_modules=["q_proj", "v_proj"]), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("second", LoraConfig(**config, target_modules=["q_proj", "down_proj"]))
    randomize_lora(model, seed=4, adapters=["second"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if FACTOR.search(k)}
    save_file(state, str(adapter / WEIGHTS), metadata={"format": "pt"})
    model.peft_config["second"].save_pretrained(str(adapter))

    out = tmp_path / "out"
    refused = patch(cli, adapter, pair, out, *PROJECT_ALL)
    assert refused.exit_code == ExitCode.INCOMPATIBLE
    assert "default, second" in refused.stderr
    assert "--adapter-name" in refused.stderr
    assert not out.exists()

    result = patch(cli, adapter, pair, out, *PROJECT_ALL, "--adapter-name", "second")
    assert result.exit_code == ExitCode.OK, result.stderr
    report = json.loads((out / REPORT).read_text())
    assert report["settings"]["adapter_name"] == "second"
    entries = {m["module"]: m for m in report["modules"]}
    assert sorted(entries) == sorted(
        f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "mlp.down_proj")
    )
    projected = {f"{PREFIX}{m}.lora_B.second.weight" for m in entries}
    before, after = check_files(adapter, out, report, projected)
    assert {k for k in before if ".default." in k} <= set(report["passthrough"])
    for module, entry in entries.items():
        a, b = (
            factor(before, module, "lora_A", "second"),
            factor(before, module, "lora_B", "second"),
        )
        pb, cosine = paper_reference(alignment(pair, module, False), b.double(), a.double())
        assert rel_err(factor(after, module, "lora_B", "second"), pb) <= 1e-4
        assert entry["cosine"] == pytest.approx(cosine, rel=1e-4)

    # the patched file is a PeftModel state dict: it loads back into one with both adapters
    loaded = model.to(torch.float64)
    missing, unexpected = loaded.load_state_dict(after, strict=False)
    assert unexpected == []
    assert not [k for k in missing if FACTOR.search(k)]
    loaded.set_adapter("second")
    check_forward(loaded, after, lambda m: 2.0, adapter="second", key_name="second")


# --- DoRA --------------------------------------------------------------------------------------


def test_real_dora_adapter_is_refused(models: dict[str, Pair], cli: Cli, tmp_path: Path) -> None:
    pair = models["llama"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    adapter = peft_adapter(pair[0], lora, tmp_path / "adapter")
    out = tmp_path / "out"
    result = patch(cli, adapter, pair, out, *PROJECT_ALL)
    assert result.exit_code == ExitCode.INCOMPATIBLE
    assert "DoRA" in result.stderr
    assert CONFIG in result.stderr
    assert "cannot keep inside the alignment subspace" in result.stderr  # the reason, as below
    assert not out.exists()


def _outside(v: torch.Tensor, delta: torch.Tensor) -> float:
    """The share of ‖ΔW‖_F outside span(V): what Safe LoRA's projection is meant to remove.

    span(V) is taken above float32 rounding (V was stored in float32 as aligned − base).
    """
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    basis = u[:, s > s[0] * 1e-3]
    assert basis.shape[1] == 4  # the synthetic pair's alignment rank
    inside = basis @ (basis.T @ delta)
    return float(torch.linalg.matrix_norm(delta - inside) / torch.linalg.matrix_norm(delta))


def _effective_delta(lora: Any) -> torch.Tensor:
    """W' − W of a PEFT LoRA/DoRA Linear layer (no bias), read off its outputs on the identity."""
    base = lora.get_base_layer()
    eye = torch.eye(base.in_features, dtype=torch.float64)
    with torch.no_grad():
        return (lora(eye) - base(eye)).T


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_projecting_b_confines_lora_but_not_dora_to_the_alignment_subspace(
    models: dict[str, Pair], use_dora: bool
) -> None:
    """Why DoRA is refused. With B' = Ĉ B, a LoRA update s B' A lies in span(V) exactly; a DoRA
    layer's update m ⊙ (W + s B' A) / ‖W + s B' A‖_row − W also rescales every row of W, which no
    choice of B can keep inside span(V), so "projected" DoRA would still carry most of its update
    outside the alignment subspace, silently."""
    pair = models["llama"]
    module = Q0
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=use_dora)
    model = peft_model(pair[0], lora, seed=5).to(torch.float64)
    layer_ = lora_layers(model)[module]
    v = alignment(pair, module, False)
    b = layer_.lora_B["default"].weight
    with torch.no_grad():  # B' = Ĉ B with the dense (out, out) Ĉ = V Vᵀ/‖V‖_F, in float64
        b.copy_((v @ v.T / torch.linalg.matrix_norm(v)) @ b.detach().clone())
    outside = _outside(v, _effective_delta(layer_))
    if use_dora:
        assert outside > 0.5
    else:
        assert outside < 1e-6

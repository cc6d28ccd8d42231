"""Merged output: W_aligned + s · B A for every adapter variant, against real PEFT.

The slow tests build tiny real models (Llama from ``safelora_cli.synthetic``, GPT-2 and Phi-3 from
``tests.factories``) and real PEFT adapters, perturb every non-LoRA tensor the adapter saved (so
that loading them over the aligned model shows), merge with ``merge.py`` + ``shards.py`` and
compare every tensor with ``PeftModel.from_pretrained(aligned, adapter).merge_and_unload()`` in
float64: tensors the plan rewrites are close to PEFT's; every other tensor is byte-identical to the
aligned model and equal to PEFT's (so the plan misses nothing PEFT changes). The merged folder then
loads in transformers with no missing or unexpected key.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from safelora_cli.errors import IncompatibleInputError, NumericalError
from safelora_cli.inputs.adapter import load_adapter
from safelora_cli.inputs.index import index_folder
from safelora_cli.inputs.pairing import pair_modules
from safelora_cli.math.projection import paper_project
from safelora_cli.output.merge import lora_factors, merged_tensor
from safelora_cli.output.merge_plan import LoraTerm, plan_merge
from safelora_cli.synthetic import LlamaShape, PairSpec, make_adapter, make_pair
from tests.full_helpers import folder_tensors, load_in_transformers, merge_to, same_bytes

WEIGHTS = "adapter_model.safetensors"
LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B)(\.[^.]+)?(\.weight)?$")
Pair = tuple[Path, Path]


# --- fast: the factor orientation and the refusals -------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
def test_a_term_is_s_b_a_in_the_targets_layout(transposed: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=gen), torch.randn(5, 3, generator=gen)
    term = LoraTerm("m", None, None, 1.5, transposed)  # type: ignore[arg-type]
    factors = lora_factors(term, a, b)
    want = 1.5 * (b.double() @ a.double())
    got = factors.left.double() @ factors.right.double()
    torch.testing.assert_close(got, want.T if transposed else want)


def synthetic(tmp_path: Path, **extra: Any) -> tuple[Pair, Path]:
    pair = make_pair(tmp_path, PairSpec(seed=1, **extra))
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    return pair, make_adapter(tmp_path / "adapter", *pair, modules, rank=2)


def add_tensors(adapter: Path, tensors: dict[str, torch.Tensor]) -> None:
    state = load_file(adapter / WEIGHTS)
    state.update(tensors)
    save_file(state, str(adapter / WEIGHTS))


def plan_for(adapter: Path, aligned: Path) -> Any:
    loaded, index = load_adapter(adapter), index_folder(aligned)
    return plan_merge(loaded, pair_modules(loaded, index, index), index)


@pytest.mark.parametrize(
    ("key", "shape", "message"),
    [
        ("model.layers.0.self_attn.q_proj.lora_B.bias", (64,), "q_proj has no bias"),
        ("model.norm.weight", (32,), r"F32 \[32\]: the aligned model\.norm\.weight is F32 \[64\]"),
        (
            "model.layers.0.unknown.weight",
            (4,),
            "the aligned model.layers.0.unknown.weight is absent",
        ),
        ("model.layers.1.post_attention_layernorm.weight", (64,), r"I8 \[64\]: the aligned"),
        ("model.embed_tokens.token_adapter.trainable_tokens_delta", (2, 64), "trainable tokens"),
        ("model.embed_tokens.lora_embedding_A", (2, 128), "lora_embedding_A and lora_embedding_B"),
    ],
    ids=["lora-bias-without-bias", "shape", "unknown", "int", "trainable-tokens", "half-embedding"],
)
def test_adapter_tensors_that_cannot_be_merged_are_refused(
    tmp_path: Path, key: str, shape: tuple[int, ...], message: str
) -> None:
    (_, aligned), adapter = synthetic(tmp_path)
    dtype = torch.int8 if "layernorm" in key else torch.float32
    add_tensors(adapter, {f"base_model.model.{key}": torch.zeros(shape, dtype=dtype)})
    with pytest.raises(IncompatibleInputError, match=message) as caught:
        plan_for(adapter, aligned)
    assert caught.value.exit_code == 4


def test_two_copies_of_one_tied_tensor_must_agree(tmp_path: Path) -> None:
    (_, aligned), adapter = synthetic(tmp_path, shape=LlamaShape(tie_embeddings=True))
    embedding = folder_tensors(aligned)["model.embed_tokens.weight"]
    add_tensors(
        adapter,
        {
            "base_model.model.model.embed_tokens.base_layer.weight": embedding,
            "base_model.model.lm_head.base_layer.weight": embedding + 1,
        },
    )
    plan = plan_for(adapter, aligned)
    [merge] = [m for m in plan.tensors if m.target.name == "model.embed_tokens.weight"]
    assert len(merge.replacements) == 2
    with pytest.raises(IncompatibleInputError, match="with different values"):
        merged_tensor(merge, lambda info: load_file(info.path)[info.name])


def test_an_fp16_overflow_is_refused(tmp_path: Path) -> None:
    (_, aligned), adapter = synthetic(tmp_path, dtype=torch.float16)
    state = load_file(adapter / WEIGHTS)
    for kind in ("A", "B"):  # s · B A = 2 · (2 · 6e4) per element: past float16's 65504
        key = f"base_model.model.model.layers.0.self_attn.q_proj.lora_{kind}.weight"
        state[key] = torch.full_like(state[key], 6e4 if kind == "B" else 1.0)
    save_file(state, str(adapter / WEIGHTS))
    with pytest.raises(NumericalError, match="q_proj.weight: the patched values are not finite"):
        merge_to(adapter, aligned, tmp_path / "out")


def test_merge_is_w_aligned_plus_s_b_a_and_one_of_several_adapters_is_taken(
    tmp_path: Path,
) -> None:
    """A file with adapters "default" and "second": merging "second" uses only its factors, at
    its scaling (make_adapter: alpha = 2 r, so s = 2), against a dense float64 reference."""
    pair = make_pair(tmp_path, PairSpec(seed=5, shards=2))
    first = make_adapter(tmp_path / "a", *pair, ["model.layers.0.self_attn.q_proj"], rank=2,
                         adapter_name="default", seed=1)  # fmt: skip
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    adapter = make_adapter(tmp_path / "b", *pair, modules, rank=2, adapter_name="second", seed=2)
    add_tensors(adapter, load_file(first / WEIGHTS))
    out = tmp_path / "out"
    plan = merge_to(adapter, pair[1], out, adapter_name="second")
    assert plan.replaced == ()
    factors, aligned, got = (
        load_file(adapter / WEIGHTS),
        folder_tensors(pair[1]),
        folder_tensors(out),
    )
    for name, tensor in got.items():
        module = name.removesuffix(".weight")
        if module not in modules:
            assert same_bytes(tensor, aligned[name]), name
            continue
        a = factors[f"base_model.model.{module}.lora_A.second.weight"].double()
        b = factors[f"base_model.model.{module}.lora_B.second.weight"].double()
        want = aligned[name].double() + 2.0 * (b @ a)
        torch.testing.assert_close(tensor.double(), want, rtol=1e-6, atol=1e-7)


# --- slow: against PEFT's merge_and_unload -----------------------------------------------


@dataclass(frozen=True)
class Case:
    family: str
    lora: dict[str, Any]
    tied: tuple[str, ...] = ()
    replaced: int = 0  # adapter tensors loaded over aligned ones
    patched: tuple[str, ...] = ()  # modules merged with B' = Ĉ B instead of B
    extra: dict[str, Any] = field(default_factory=dict)


CASES = {
    "rank-alpha-patterns-sharded": Case(
        "llama-sharded",
        {
            "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {r"layers\.1\.self_attn\.q_proj": 6, "q_proj": 2, "down_proj": 3},
            "alpha_pattern": {r"model\.layers\.0\.self_attn\.v_proj": 2, "v_proj": 5},
        },
        patched=("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"),
    ),
    "rslora": Case(
        "llama",
        {
            "r": 4, "lora_alpha": 8, "use_rslora": True,
            "target_modules": ["q_proj", "k_proj", "gate_proj"],
            "rank_pattern": {"gate_proj": 16}, "alpha_pattern": {"k_proj": 6},
        },
    ),
    "all-linear-bf16": Case(
        "llama-bf16", {"r": 2, "lora_alpha": 16, "target_modules": "all-linear"}
    ),
    "gpt2-fan-in-fan-out-fused-bias-all": Case(
        "gpt2",
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"],
         "fan_in_fan_out": True, "bias": "all"},
        replaced=13,  # every bias of the model (2 layers x 6, and ln_f)
        patched=("transformer.h.0.attn.c_attn",),
    ),
    "gpt2-lora-bias": Case(
        "gpt2", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "lora_bias": True}
    ),
    "gpt2-tied-lm-head": Case(
        "gpt2", {"r": 4, "lora_alpha": 4, "target_modules": ["c_attn", "lm_head"]},
        tied=("lm_head",), replaced=1, patched=("lm_head",),
    ),
    "phi3-fused": Case(
        "phi3", {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj", "gate_up_proj", "o_proj"]},
        patched=("model.layers.1.self_attn.qkv_proj",),
    ),
    "llama-tied-embedding-lm-head-modules-to-save": Case(
        "llama-tied",
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head", "embed_tokens"],
         "modules_to_save": ["model.norm"]},
        tied=("lm_head", "model.embed_tokens"), replaced=3,
    ),
    # a tied checkpoint that stores lm_head.weight too: both copies get the update
    "llama-tied-head-stored": Case(
        "llama-tied-both", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"]},
        tied=("lm_head",), replaced=1, patched=("lm_head",),
    ),
    "llama-embedding-modules-to-save-lm-head": Case(
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "embed_tokens"],
         "modules_to_save": ["lm_head", "model.norm"]},
        replaced=3,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    from tests.factories import gpt2_pair, phi3_pair

    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_pair(root / "llama", PairSpec(seed=3)),
        "llama-sharded": make_pair(root / "llama-sharded", PairSpec(seed=3, shards=3)),
        "llama-bf16": make_pair(root / "llama-bf16", PairSpec(seed=3, dtype=torch.bfloat16)),
        "llama-tied": make_pair(
            root / "llama-tied", PairSpec(shape=LlamaShape(tie_embeddings=True), seed=4)
        ),
        "llama-tied-both": stored_head(
            make_pair(root / "llama-tied-both", PairSpec(shape=LlamaShape(tie_embeddings=True)))
        ),
        "gpt2": gpt2_pair(root / "gpt2", seed=5),
        "phi3": phi3_pair(root / "phi3", seed=6),
    }


def stored_head(pair: Pair) -> Pair:
    """Store lm_head.weight beside the embedding it is tied to, as some checkpoints do."""
    for folder in pair:
        tensors = load_file(folder / "model.safetensors")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, str(folder / "model.safetensors"))
        assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    return pair


def perturb_saved_tensors(adapter: Path) -> list[str]:
    """Give every non-LoRA tensor of the adapter file new values (as training would); copies of
    one matrix (a tied embedding saved twice) stay copies."""
    state = load_file(adapter / WEIGHTS)
    gen = torch.Generator().manual_seed(7)
    changed = sorted(k for k in state if not LORA_KEY.search(k))
    done: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key in changed:
        old = state[key]
        same = [new for was, new in done if old.dim() == 2 and same_bytes(was, old)]
        noise = 0.05 * torch.randn(old.shape, generator=gen)
        state[key] = same[0].clone() if same else old + noise
        done.append((old, state[key]))
    save_file(state, str(adapter / WEIGHTS))
    return changed


def patch_b(adapter: Path, aligned: Path, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Write B' = Ĉ B for ``modules`` into the adapter file (as ``patch`` would) and return the
    B' to hand to the merge instead of the stored B (which is put back unchanged)."""
    if not modules:
        return {}
    loaded, index = load_adapter(adapter), index_folder(aligned)
    pairs = {p.name: p for p in pair_modules(loaded, index, index)}
    state, aligned_tensors = load_file(adapter / WEIGHTS), folder_tensors(aligned)
    base = folder_tensors(aligned.parent / "base")
    patched = {}
    for module in modules:
        pair = pairs[module]
        v = aligned_tensors[pair.aligned.name].float() - base[pair.base.name].float()
        v = v.T if pair.transpose else v
        b = state[pair.lora.b.name].float()
        patched[module] = paper_project(v, b, float(v.norm()))
    return patched


def write_patched(adapter: Path, folder: Path, patched: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    state = load_file(adapter / WEIGHTS)
    for module, b in patched.items():
        state[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(state, str(folder / WEIGHTS))
    (folder / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    return folder


def peft_merged(aligned: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from tests.factories import load_peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = load_peft(aligned, adapter, torch.float64).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_merge_equals_peft_merge_and_unload(
    case: Case, models: dict[str, Pair], tmp_path: Path
) -> None:
    from peft import LoraConfig

    from tests.factories import peft_adapter

    base, aligned = models[case.family]
    adapter = peft_adapter(base, LoraConfig(**case.lora), tmp_path / "adapter", seed=2)
    saved = perturb_saved_tensors(adapter)
    patched = patch_b(adapter, aligned, case.patched)
    reference = peft_merged(aligned, write_patched(adapter, tmp_path / "patched", patched))

    out = tmp_path / "out"
    plan = merge_to(adapter, aligned, out, lora_b=patched)
    assert plan.tied == case.tied
    assert sorted(plan.replaced) == saved
    assert len(saved) == case.replaced

    got, source = folder_tensors(out), folder_tensors(aligned)
    assert got.keys() == source.keys()
    rewritten = {m.target.name for m in plan.tensors}
    for name, tensor in got.items():
        want = reference[name]
        if name in rewritten:
            assert tensor.dtype == source[name].dtype
            eps = max(torch.finfo(tensor.dtype).eps, 1e-6)
            torch.testing.assert_close(tensor.double(), want, rtol=eps, atol=eps)
        else:
            assert same_bytes(tensor, source[name]), name
            assert torch.equal(source[name].double(), want), f"PEFT changed {name}"
    for path in index_folder(aligned).files:
        assert (out / path.name).stat().st_size == path.stat().st_size
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in aligned.iterdir())
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (aligned / "config.json").read_text()
    )
    load_in_transformers(out)


@pytest.mark.slow
def test_peft_refuses_lora_bias_without_a_bias_and_so_does_the_plan(
    models: dict[str, Pair], tmp_path: Path
) -> None:
    from peft import LoraConfig

    from tests.factories import peft_adapter

    base, aligned = models["llama"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)
    adapter = peft_adapter(base, lora, tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        peft_merged(aligned, adapter)
    with pytest.raises(IncompatibleInputError, match="q_proj has no bias"):
        plan_for(adapter, aligned)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_cli_merge_equals_peft_merge_of_the_patched_adapter(
    case: Case, models: dict[str, Pair], tmp_path: Path
) -> None:
    """`safelora patch --merge` writes what PEFT's merge_and_unload() makes of the adapter that
    `safelora patch` writes: the same selection, B', scaling and variant rules, end to end."""
    from peft import LoraConfig

    from tests.factories import peft_adapter
    from tests.helpers import invoke

    base, aligned = models[case.family]
    adapter = peft_adapter(base, LoraConfig(**case.lora), tmp_path / "adapter", seed=2)
    perturb_saved_tensors(adapter)
    args = ["patch", str(adapter), "--base", str(base), "--aligned", str(aligned),
            "--num-layers", "1", "--quiet"]  # fmt: skip
    patched, merged = tmp_path / "patched", tmp_path / "merged"
    assert invoke([*args, "-o", str(patched)]).exit_code == 0
    result = invoke([*args, "-o", str(merged), "--merge"])
    assert result.exit_code == 0, result.stderr
    reference = peft_merged(aligned, patched)
    got, source = folder_tensors(merged), folder_tensors(aligned)
    assert got.keys() == source.keys()
    for name, tensor in got.items():
        eps = max(torch.finfo(tensor.dtype).eps, 1e-6)
        torch.testing.assert_close(tensor.double(), reference[name], rtol=eps, atol=eps)
    report = json.loads((merged / "safelora_report.json").read_text())
    assert report["summary"]["projected"] >= 1
    alone = json.loads((patched / "safelora_report.json").read_text())
    assert (report["settings"].pop("merge"), alone["settings"].pop("merge")) == (True, False)
    assert (report["output_kind"], alone["output_kind"]) == ("merged", "adapter")
    same = ("modules", "settings", "inputs", "summary", "kind")
    assert {k: report[k] for k in same} == {k: alone[k] for k in same}
    tied = [w for w in report["warnings"] if w["code"] == "merged-tied"]
    assert len(tied) == len(case.tied)

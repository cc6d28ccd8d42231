"""Which weights a full fine-tune patch targets (PEFT's target_modules rule), and the checks
that run on headers before any heavy read."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safelora_cli.errors import IncompatibleInputError, UsageError
from safelora_cli.inputs.full_targets import (
    ALL_LINEAR,
    Targets,
    pair_full_weights,
    pattern_fullmatch,
    select_targets,
)
from safelora_cli.inputs.index import index_folder
from safelora_cli.synthetic import LlamaShape, PairSpec, make_full_finetune, make_pair
from tests.full_helpers import folder_tensors

SHAPES = LlamaShape().weight_shapes()
BLOCK = {n for n, s in SHAPES.items() if len(s) == 2 and ".layers." in n}


def selected(targets: Targets) -> set[str]:
    return set(select_targets(SHAPES, targets))


def test_default_targets_are_the_block_matrices_only() -> None:
    assert selected(Targets()) == BLOCK
    assert len(BLOCK) == 2 * 7  # 2 layers x 7 projections: no norm, embedding or head


def test_a_list_follows_peft_exact_or_dotted_suffix_rule() -> None:
    assert selected(Targets(names=("q_proj",))) == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    }
    assert selected(Targets(names=("layers.1.mlp.up_proj", "lm_head"))) == {
        "model.layers.1.mlp.up_proj.weight",
        "lm_head.weight",
    }
    with pytest.raises(UsageError, match="proj: names no 2-D weight") as caught:
        selected(Targets(names=("proj",)))  # a substring is not a suffix
    assert caught.value.exit_code == 2


def test_a_regex_must_match_the_whole_module_name() -> None:
    assert selected(Targets(pattern=r".*\.layers\.1\.mlp\.(gate|up)_proj")) == {
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    }
    with pytest.raises(UsageError, match="no weight of the fine-tune is selected"):
        selected(Targets(pattern=r"layers\.1"))  # found inside, but not a full match
    assert pattern_fullmatch(r"q_proj|v_proj", "v_proj")
    assert not pattern_fullmatch(r"q_proj|v_proj", "model.layers.0.self_attn.v_proj")


def test_all_linear_excludes_embeddings_and_the_head_and_names_reach_them() -> None:
    assert selected(Targets(all_linear=True)) == BLOCK
    named = selected(Targets(names=("embed_tokens", "lm_head")))
    assert named == {"model.embed_tokens.weight", "lm_head.weight"}
    assert "model.embed_tokens.weight" in selected(Targets(pattern=".*"))


def test_the_tied_head_is_named_by_its_embedding() -> None:
    tied = LlamaShape(tie_embeddings=True).weight_shapes()
    with pytest.raises(UsageError, match="lm_head: names no 2-D weight") as caught:
        select_targets(tied, Targets(names=("lm_head",)))
    assert "ties lm_head to its input embedding" in (caught.value.hint or "")


@pytest.mark.parametrize(
    ("values", "want"),
    [
        (["q_proj,v_proj"], Targets(names=("q_proj", "v_proj"))),
        (["q_proj", " v_proj "], Targets(names=("q_proj", "v_proj"))),
        (["All-Linear"], Targets(all_linear=True)),
        ([r".*\.(q|v)_proj"], Targets(pattern=r".*\.(q|v)_proj")),
        (["model.layers.0.self_attn.q_proj"], Targets(names=("model.layers.0.self_attn.q_proj",))),
    ],
)
def test_parse_reads_a_list_a_regex_or_all_linear(values: list[str], want: Targets) -> None:
    parsed = Targets.parse(values)
    assert parsed == want
    assert parsed.describe() == (
        ALL_LINEAR if want.all_linear else want.pattern or list(want.names)
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([" , "], "empty"),
        (["q_proj", r"(k|v)_proj"], "must be the only"),
        (["(unclosed"], "not a usable regular expression"),
        (["a*" * 1100], "longer than 2000 characters"),
    ],
)
def test_parse_refuses_what_it_cannot_read(values: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Targets.parse(values)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_the_rules_agree_with_peft_on_real_models(tmp_path: Path, family: str) -> None:
    """Our list / regex / all-linear selection equals the modules PEFT wraps on the same model."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from tests.factories import gpt2_pair, load_base, phi3_pair

    base = {
        "llama": lambda: make_pair(tmp_path, PairSpec(seed=1))[0],
        "gpt2": lambda: gpt2_pair(tmp_path, seed=1)[0],
        "phi3": lambda: phi3_pair(tmp_path, seed=1)[0],
    }[family]()
    shapes = {n: i.shape for n, i in index_folder(base).tensors.items()}
    lists = {"llama": ["q_proj", "layers.1.mlp.up_proj"], "gpt2": ["c_attn", "mlp.c_proj"],
             "phi3": ["qkv_proj", "down_proj"]}[family]  # fmt: skip
    for target_modules, targets in [
        (ALL_LINEAR, Targets(all_linear=True)),
        (lists, Targets(names=tuple(lists))),
        (r".*\.1\..*(proj|c_attn)", Targets(pattern=r".*\.1\..*(proj|c_attn)")),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(load_base(base), LoraConfig(target_modules=target_modules))
        wrapped = {
            f"{name.removeprefix('base_model.model.')}.weight"
            for name, module in model.named_modules()
            if isinstance(module, LoraLayer)
        }
        assert set(select_targets(shapes, targets)) == wrapped, target_modules


# --- pairing the fine-tune with the aligned and base models --------------------------------


def rewrite(folder: Path, change: dict[str, torch.Tensor | None]) -> None:
    """Replace (or drop, with None) tensors of a single-file model folder."""
    tensors = folder_tensors(folder)
    for name, value in change.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.fixture
def trio(tmp_path: Path) -> tuple[Path, Path, Path]:
    base, aligned = make_pair(tmp_path, PairSpec(seed=2))
    return make_full_finetune(tmp_path / "ft", base, aligned), base, aligned


def pair(trio: tuple[Path, Path, Path], targets: Targets | None = None) -> list[str]:
    ft, base, aligned = (index_folder(p) for p in trio)
    return [p.name for p in pair_full_weights(ft, aligned, base, targets or Targets())]


def test_pairs_come_in_the_fine_tunes_file_order(trio: tuple[Path, Path, Path]) -> None:
    names = pair(trio)
    index = index_folder(trio[0])
    assert names == sorted(names, key=lambda n: index.tensors[n].offset)
    assert set(names) == BLOCK


def test_every_mismatch_with_the_aligned_model_is_reported_at_once(
    trio: tuple[Path, Path, Path],
) -> None:
    ft, _, _ = trio
    rewrite(
        ft,
        {
            "model.layers.0.self_attn.q_proj.weight": None,
            "model.layers.1.extra.weight": torch.zeros(4, 4),
            "model.layers.1.mlp.up_proj.weight": torch.zeros(8, 64),
            "model.norm.weight": torch.ones(32),
        },
    )
    with pytest.raises(IncompatibleInputError) as caught:
        pair(trio)
    message = caught.value.message
    assert caught.value.exit_code == 4
    assert (
        "1 tensors of the fine-tune are not in the aligned model (model.layers.1.extra" in message
    )
    assert (
        "1 tensors of the aligned model are not in the fine-tune (model.layers.0.self_attn.q_proj"
        in message
    )
    assert "2 tensors differ in shape" in message
    assert "model.layers.1.mlp.up_proj.weight: [8, 64] in the fine-tune, [160, 64]" in message
    assert "model.norm.weight: [32] in the fine-tune, [64]" in message


def test_a_quantized_or_missing_base_weight_is_refused(trio: tuple[Path, Path, Path]) -> None:
    ft, base, aligned = trio
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    quantized = torch.zeros(64, 64, dtype=torch.int8)
    rewrite(ft, {q_proj: quantized})
    rewrite(aligned, {q_proj: quantized})
    rewrite(base, {"model.layers.1.mlp.down_proj.weight": None})
    with pytest.raises(IncompatibleInputError) as caught:
        pair(trio)
    message = caught.value.message
    assert "3 targeted weight problems" in message
    for folder in (ft, aligned):
        assert f"{q_proj} in {folder / 'model.safetensors'}: dtype I8 is not float" in message
    assert (
        "model.layers.1.mlp.down_proj.weight: [64, 160] in the fine-tune, absent in the base"
        in message
    )
    # untargeted, the quantized weight is copied as it is, not refused
    assert q_proj not in pair(trio, Targets(names=("v_proj",)))


def test_conv1d_weights_of_gpt2_are_paired_transposed(tmp_path: Path) -> None:
    """GPT-2 stores c_attn / c_proj / c_fc as (in, out); its wte is an embedding."""
    tensors = {
        "transformer.wte.weight": torch.zeros(64, 32),
        "transformer.h.0.attn.c_attn.weight": torch.zeros(32, 96),
        "transformer.h.0.attn.c_attn.bias": torch.zeros(96),
        "transformer.h.0.mlp.c_fc.weight": torch.zeros(32, 128),
        "transformer.h.0.mlp.c_proj.weight": torch.zeros(128, 32),
    }
    indexes = []
    for role in ("ft", "aligned", "base"):
        (tmp_path / role).mkdir()
        save_file(tensors, str(tmp_path / role / "model.safetensors"))
        indexes.append(index_folder(tmp_path / role))
    pairs = {p.module: p.transpose for p in pair_full_weights(*indexes, model_type="gpt2")}
    assert pairs == {
        "transformer.h.0.attn.c_attn": True,
        "transformer.h.0.mlp.c_fc": True,
        "transformer.h.0.mlp.c_proj": True,
    }
    other = pair_full_weights(*indexes, model_type="llama")
    assert not any(p.transpose for p in other)

"""Adapter folders and how they pair with the model pair: incomplete folders, broken configs, key
layouts, unpaired or misranked factors, wrong model pairs, shapes, DoRA, passthrough tensors,
config variants and tied embeddings.

Each case edits a seeded ``make_trio()`` trio and runs ``safelora patch`` in-process. What is
refused is one clear line (``expect_error``); what is accepted is checked in the output and the
report (``expect_ok``), and the projection is compared with a plain adapter's where the variant
must not change it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from safelora_cli.errors import ExitCode
from safelora_cli.inputs.adapter import PREFIX
from safelora_cli.inputs.pairing import MODEL_CONFIG
from safelora_cli.synthetic import LlamaShape, PairSpec, make_adapter, make_pair
from tests.conftest import Trio, TrioFactory
from tests.helpers import (
    CONFIG,
    K0,
    MODEL,
    PROJECT_ALL,
    Q0,
    V1,
    WEIGHTS,
    Cli,
    edit_config,
    edit_tensors,
    expect_error,
    expect_ok,
    lora_key,
    read_raw,
)

USAGE, INCOMPATIBLE = ExitCode.USAGE, ExitCode.INCOMPATIBLE


def run_patch(cli: Cli, trio: Trio, output: Path, *extra: str) -> Any:
    return cli(trio.patch_args(output, "--quiet", *extra))


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[key]

    return edit


def add_lm_head_lora(trio: Trio, rank: int = 4) -> None:
    """Give the trio's adapter a LoRA on lm_head (vocab x hidden)."""

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        gen = torch.Generator().manual_seed(3)
        vocab, hidden = trio.shape.vocab, trio.shape.hidden
        tensors[lora_key("lm_head", "lora_A")] = torch.randn(rank, hidden, generator=gen)
        tensors[lora_key("lm_head", "lora_B")] = torch.randn(vocab, rank, generator=gen)

    edit_tensors(trio.adapter / WEIGHTS, edit)


# --- the adapter folder -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("missing", "phrases"),
    [
        pytest.param(CONFIG, (f"no {CONFIG}", "save_pretrained"), id="config"),
        pytest.param(WEIGHTS, (f"no {WEIGHTS}", "save_pretrained"), id="weights"),
    ],
)
def test_adapter_folder_missing_a_file_is_refused(
    trio: Trio, cli: Cli, tmp_path: Path, missing: str, phrases: tuple[str, ...]
) -> None:
    (trio.adapter / missing).unlink()
    out = tmp_path / "out"
    line = expect_error(run_patch(cli, trio, out), INCOMPATIBLE, *phrases, output=out)
    assert "adapter" in line


def test_adapter_path_that_is_a_file_is_a_usage_error(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = trio.patch_args(out, "--quiet")
    args[1] = str(trio.adapter / WEIGHTS)
    expect_error(cli(args), USAGE, "ADAPTER", "is a file", output=out)


# --- unpaired factors, rank mismatch ----------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "phrases"),
    [
        pytest.param(
            _drop(lora_key(V1, "lora_B")), (V1, "has lora_A but no lora_B"), id="A-without-B"
        ),
        pytest.param(
            _drop(lora_key(V1, "lora_A")), (V1, "has lora_B but no lora_A"), id="B-without-A"
        ),
        pytest.param(
            lambda t: t.update({lora_key(V1, "lora_B"): t[lora_key(V1, "lora_B")][:, :3].clone()}),
            (V1, "disagree on the rank"),
            id="A-B-rank-differ",
        ),
    ],
)
def test_unpaired_or_misranked_factors_are_refused_naming_the_module(
    trio: Trio,
    cli: Cli,
    tmp_path: Path,
    edit: Callable[[dict[str, torch.Tensor]], None],
    phrases: tuple[str, ...],
) -> None:
    edit_tensors(trio.adapter / WEIGHTS, edit)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), INCOMPATIBLE, WEIGHTS, *phrases, output=out)


def test_rank_not_matching_config_r_is_refused(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    edit_config(trio.adapter, r=8)
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out), INCOMPATIBLE, "rank 4 in the file, 8 in adapter_config.json",
        output=out,
    )  # fmt: skip


# --- key variants, several adapters -----------------------------------------------------------


@pytest.mark.parametrize(
    ("key_prefix", "adapter_name"),
    [("", ""), ("base_model.model.", "default"), ("", "default")],
    ids=["no-prefix", "default-name", "no-prefix-default-name"],
)
def test_key_variants_are_accepted_and_kept(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, key_prefix: str, adapter_name: str
) -> None:
    trio = make_trio(key_prefix=key_prefix, adapter_name=adapter_name)
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out), out)
    assert sorted(m["module"] for m in report["modules"]) == sorted(trio.modules)
    assert report["summary"]["projected"] == 10
    assert report["passthrough"] == []
    original = load_file(str(trio.adapter / WEIGHTS))
    assert load_file(str(out / WEIGHTS)).keys() == original.keys()  # keys kept as they were


def _add_second_adapter(trio: Trio) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.startswith(PREFIX + "model.layers.0.")]:
            other = key.replace(".default.", ".other.")
            tensors[other] = tensors[key].clone()

    edit_tensors(trio.adapter / WEIGHTS, edit)


def test_several_adapters_in_one_file_need_adapter_name(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    trio = make_trio(adapter_name="default")
    _add_second_adapter(trio)
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out), INCOMPATIBLE, WEIGHTS, "several adapters", "default, other",
        "--adapter-name", output=out,
    )  # fmt: skip

    report = expect_ok(run_patch(cli, trio, out, "--adapter-name", "default"), out)
    assert sorted(m["module"] for m in report["modules"]) == sorted(trio.modules)
    assert report["passthrough"]
    assert all(".other." in k for k in report["passthrough"])
    before, after = load_file(str(trio.adapter / WEIGHTS)), load_file(str(out / WEIGHTS))
    for key in report["passthrough"]:
        assert torch.equal(before[key], after[key])


def test_adapter_name_not_in_the_file_is_refused(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    trio = make_trio(adapter_name="default")
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out, "--adapter-name", "nope"), INCOMPATIBLE, "--adapter-name nope",
        "default", output=out,
    )  # fmt: skip


# --- wrong model pair -------------------------------------------------------------------------


def test_modules_missing_from_both_models_are_listed_with_a_count(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    def rename(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            tensors[key.replace("layers.", "layers.1")] = tensors.pop(key)

    edit_tensors(trio.adapter / WEIGHTS, rename)
    out = tmp_path / "out"
    line = expect_error(
        run_patch(cli, trio, out), INCOMPATIBLE,
        "14 adapter module(s) have no weight in the base model",
        "14 adapter module(s) have no weight in the aligned model",
        "model.layers.10.mlp.down_proj.weight", ", ...", "--base and --aligned",
        output=out,
    )  # fmt: skip
    assert line.count("model.layers.1") <= 2 * 5 + 2  # the first few, not all 14


def test_module_missing_from_the_aligned_model_only_names_that_model(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    edit_tensors(trio.aligned / MODEL, _drop(f"{Q0}.weight"))
    out = tmp_path / "out"
    line = expect_error(
        run_patch(cli, trio, out), INCOMPATIBLE,
        f"1 adapter module(s) have no weight in the aligned model ({Q0}.weight)", output=out,
    )  # fmt: skip
    assert "base model" not in line


# --- shapes -----------------------------------------------------------------------------------


def test_base_and_aligned_shapes_that_differ_are_refused(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    edit_tensors(trio.aligned / MODEL, lambda t: t.update({f"{Q0}.weight": torch.randn(72, 64)}))
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out), INCOMPATIBLE, Q0, "base [64, 64]", "aligned [72, 64]",
        "differ in shape", output=out,
    )  # fmt: skip


def test_resized_vocabulary_is_refused_never_truncated(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    trio = make_trio()
    add_lm_head_lora(trio)
    edit_tensors(trio.aligned / MODEL, lambda t: t.update({"lm_head.weight": torch.randn(130, 64)}))
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), INCOMPATIBLE, "lm_head", "differ in shape", output=out)


def test_factors_not_matching_the_base_weight_are_refused(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    key = lora_key(K0, "lora_A")
    edit_tensors(trio.adapter / WEIGHTS, lambda t: t.update({key: torch.randn(4, 48)}))
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out), INCOMPATIBLE, K0, "lora_B @ lora_A is [32, 48]",
        "base weight is [32, 64]", output=out,
    )  # fmt: skip


def test_fan_in_fan_out_with_an_untransposed_base_is_refused(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    edit_config(trio.adapter, fan_in_fan_out=True)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), INCOMPATIBLE, K0, "fan_in_fan_out", output=out)


def test_fan_in_fan_out_with_a_transposed_base_gives_the_same_scores(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    """GPT-2 style (in, out) weights with fan_in_fan_out give the same scores as (out, in)."""
    plain, transposed = make_trio(), make_trio()
    for folder in (transposed.base, transposed.aligned):
        edit_tensors(
            folder / MODEL,
            lambda t: t.update({k: v.T.contiguous() for k, v in t.items() if v.dim() == 2}),
        )
    edit_config(transposed.adapter, fan_in_fan_out=True)
    a, b = tmp_path / "a", tmp_path / "b"
    report_a = expect_ok(run_patch(cli, plain, a), a)
    report_b = expect_ok(run_patch(cli, transposed, b), b)
    assert all(m["transposed"] for m in report_b["modules"])
    cos_a = [m["cosine"] for m in report_a["modules"]]
    cos_b = [m["cosine"] for m in report_b["modules"]]
    assert cos_a == pytest.approx(cos_b, rel=1e-5)


# --- DoRA -------------------------------------------------------------------------------------


def test_dora_adapter_is_refused(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    edit_config(trio.adapter, use_dora=True)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), INCOMPATIBLE, CONFIG, "DoRA", "use_dora", output=out)


def test_dora_magnitude_vectors_without_use_dora_are_refused(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    """DoRA weights with a config that says use_dora: false must not be projected as plain LoRA."""
    key = f"{PREFIX}{Q0}.lora_magnitude_vector.weight"
    edit_tensors(trio.adapter / WEIGHTS, lambda t: t.update({key: torch.ones(64)}))
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out), INCOMPATIBLE, WEIGHTS, "lora_magnitude_vector", output=out
    )


# --- non-LoRA tensors -------------------------------------------------------------------------

PASSTHROUGH = {
    f"{PREFIX}lm_head.modules_to_save.default.weight": torch.randn(128, 64),
    f"{PREFIX}model.embed_tokens.lora_embedding_A": torch.randn(4, 128),
    f"{PREFIX}model.embed_tokens.lora_embedding_B": torch.randn(64, 4),
    f"{PREFIX}{Q0}.lora_B.bias": torch.randn(64),
    f"{PREFIX}model.embed_tokens.token_adapter.trainable_tokens_delta": torch.randn(3, 64),
    f"{PREFIX}model.norm.weight": torch.randn(64).to(torch.bfloat16),
}


def test_non_lora_tensors_are_copied_through_and_listed(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    edit_tensors(trio.adapter / WEIGHTS, lambda t: t.update(PASSTHROUGH))
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out, *PROJECT_ALL), out)
    assert report["passthrough"] == sorted(PASSTHROUGH)
    assert report["summary"]["projected"] == len(trio.modules)
    assert sorted(m["module"] for m in report["modules"]) == sorted(trio.modules)
    after = load_file(str(out / WEIGHTS))
    for key, tensor in PASSTHROUGH.items():
        assert after[key].dtype == tensor.dtype
        assert torch.equal(after[key], tensor)


def test_passthrough_in_exotic_dtypes_is_kept_byte_for_byte(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    """fp8, packed fp4 and int8 tensors nobody projects: copied through, header and bytes."""
    exotic = {
        f"{PREFIX}model.embed_tokens.fp4": torch.arange(8, dtype=torch.uint8)
        .view(torch.float4_e2m1fn_x2)
        .reshape(4, 2),
        f"{PREFIX}model.embed_tokens.fp8": torch.ones(3).to(torch.float8_e4m3fn),
        f"{PREFIX}model.embed_tokens.int8": torch.arange(5, dtype=torch.int8),
    }
    edit_tensors(trio.adapter / WEIGHTS, lambda t: t.update(exotic))
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out), out)
    assert report["passthrough"] == sorted(exotic)
    before, after = read_raw(trio.adapter / WEIGHTS), read_raw(out / WEIGHTS)
    for key in exotic:
        assert (after.entries[key]["dtype"], after.entries[key]["shape"]) == (
            before.entries[key]["dtype"],
            before.entries[key]["shape"],
        )
        assert after.data[key] == before.data[key]


# --- config variants --------------------------------------------------------------------------

CONFIG_VARIANTS = {
    "regex-targets": {"target_modules": r".*\.(q_proj|k_proj|v_proj|o_proj|\w+_proj)$"},
    "all-linear": {"target_modules": "all-linear"},
    "layers-to-transform": {"layers_to_transform": [0, 1], "layers_pattern": "layers"},
    "rslora": {"use_rslora": True},
    "alpha-pattern": {"alpha_pattern": {"q_proj": 64, r"model\.layers\.1\..*": 3.5}},
    "unknown-keys": {"my_tool": {"nested": [1, 2, {"x": None}]}, "lora_bias": False, "é": "ü"},
}


@pytest.mark.parametrize("changes", CONFIG_VARIANTS.values(), ids=CONFIG_VARIANTS.keys())
def test_config_variants_are_accepted_and_the_config_kept(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, changes: dict[str, Any]
) -> None:
    """The projection does not depend on the scaling: same scores, config kept byte for byte."""
    plain, variant = make_trio(), make_trio()
    config_path = variant.adapter / CONFIG
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config, indent=3, ensure_ascii=False) + "\n\n")
    a, b = tmp_path / "plain", tmp_path / "variant"
    report_a = expect_ok(run_patch(cli, plain, a), a)
    report_b = expect_ok(run_patch(cli, variant, b), b)
    assert (b / CONFIG).read_bytes() == config_path.read_bytes()
    assert [m["cosine"] for m in report_a["modules"]] == [m["cosine"] for m in report_b["modules"]]
    assert [m["projected"] for m in report_a["modules"]] == [
        m["projected"] for m in report_b["modules"]
    ]


def _rerank(modules: list[str], rank: int) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        gen = torch.Generator().manual_seed(7)
        for module in modules:
            a, b = tensors[lora_key(module, "lora_A")], tensors[lora_key(module, "lora_B")]
            tensors[lora_key(module, "lora_A")] = torch.randn(rank, a.shape[1], generator=gen)
            tensors[lora_key(module, "lora_B")] = torch.randn(b.shape[0], rank, generator=gen)

    return edit


@pytest.mark.parametrize(
    "pattern",
    ["q_proj", Q0, r".*\.q_proj", "self_attn.q_proj"],
)
def test_rank_pattern_is_honoured(trio: Trio, cli: Cli, tmp_path: Path, pattern: str) -> None:
    q_modules = [m for m in trio.modules if m.endswith("q_proj")]
    if pattern == Q0:
        q_modules = [Q0]
    edit_tensors(trio.adapter / WEIGHTS, _rerank(q_modules, 8))
    edit_config(trio.adapter, rank_pattern={pattern: 8})
    before = (trio.adapter / CONFIG).read_bytes()
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out), out)
    ranks = {m["module"]: m["rank"] for m in report["modules"]}
    assert {m for m, r in ranks.items() if r == 8} == set(q_modules)
    assert (out / CONFIG).read_bytes() == before


@pytest.mark.parametrize(
    ("rank_pattern", "phrases"),
    [
        pytest.param({"q_proj": 8}, (Q0, "rank 4 in the file, 8"), id="pattern-says-8"),
        pytest.param({"k_proj": 16, "q_proj": 4}, (K0, "rank 4 in the file, 16"), id="other"),
    ],
)
def test_rank_pattern_not_matching_the_file_is_refused(
    trio: Trio, cli: Cli, tmp_path: Path, rank_pattern: dict[str, int], phrases: tuple[str, ...]
) -> None:
    edit_config(trio.adapter, rank_pattern=rank_pattern)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), INCOMPATIBLE, "rank_pattern", *phrases, output=out)


# --- tied embeddings --------------------------------------------------------------------------


def test_lm_head_of_a_tied_model_pairs_with_the_embedding(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    trio = make_trio(shape=LlamaShape(tie_embeddings=True))
    add_lm_head_lora(trio)
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out), out)
    [entry] = [m for m in report["modules"] if m["module"] == "lm_head"]
    assert entry["tied"] is True
    assert entry["weight"] == "model.embed_tokens.weight"
    assert entry["cosine"] is not None
    assert not any(m["tied"] for m in report["modules"] if m["module"] != "lm_head")


def test_lm_head_of_an_untied_model_never_pairs_with_the_embedding(
    tmp_path: Path, cli: Cli
) -> None:
    """Only a tied model's lm_head is its input embedding: with tie_word_embeddings false in
    config.json and no lm_head.weight, the model is the wrong one, and pairing says so."""
    pair = make_pair(tmp_path / "pair", PairSpec(shape=LlamaShape(tie_embeddings=False), seed=9))
    modules = ["lm_head", Q0]
    adapter = make_adapter(tmp_path / "adapter", *pair, modules)
    for folder in pair:
        assert json.loads((folder / MODEL_CONFIG).read_text())["tie_word_embeddings"] is False
        tensors = load_file(folder / MODEL)
        del tensors["lm_head.weight"]
        save_file(tensors, str(folder / MODEL))
    out = tmp_path / "out"
    args = ["patch", str(adapter), "--base", str(pair[0]), "--aligned", str(pair[1])]
    expect_error(
        cli([*args, "--output", str(out), *PROJECT_ALL]), INCOMPATIBLE,
        "no weight in the base model (lm_head.weight)",
        "no weight in the aligned model (lm_head.weight)", output=out,
    )  # fmt: skip


# --- adapter_config.json broken ---------------------------------------------------------------


def _config_text(text: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(text)


def _config_change(**changes: Any) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    return mutate


def _huge_config(path: Path) -> None:
    with path.open("ab") as fh:
        fh.truncate(60 * 1024 * 1024)


CONFIG_FAULTS = [
    pytest.param(_config_text(b"[1, 2]"), ("not a JSON object",), id="list"),
    pytest.param(_config_text(b"null"), ("not a JSON object",), id="null"),
    pytest.param(_config_text(b'{"r": 4,'), ("not valid JSON",), id="not-json"),
    pytest.param(_config_text(b""), ("not valid JSON",), id="empty"),
    pytest.param(_config_text(b'{"r": "\xff"}'), ("not valid JSON",), id="not-utf8"),
    pytest.param(_config_text(b'{"r": 4, "r": 8}'), ("'r' twice",), id="duplicate-key"),
    pytest.param(_huge_config, ("bytes, more than",), id="huge"),
    pytest.param(_config_change(r="4"), ("'r'",), id="r-string"),
    pytest.param(_config_change(r=0), ("'r'",), id="r-zero"),
    pytest.param(_config_change(r=True), ("'r'",), id="r-bool"),
    pytest.param(_config_change(r=4.0), ("'r'",), id="r-float"),
    pytest.param(_config_change(peft_type="PREFIX_TUNING"), ("peft_type",), id="peft-type"),
    pytest.param(_config_change(use_dora="no"), ("'use_dora'",), id="use-dora-string"),
    pytest.param(_config_change(fan_in_fan_out=1), ("'fan_in_fan_out'",), id="fifo-int"),
    pytest.param(_config_change(use_rslora=None), ("'use_rslora'",), id="rslora-null"),
    pytest.param(_config_change(rank_pattern=[8]), ("'rank_pattern'",), id="rank-pattern-list"),
    pytest.param(
        _config_change(rank_pattern={"q_proj": "eight"}), ("'rank_pattern'",), id="rank-value"
    ),
    pytest.param(_config_change(rank_pattern={"q_proj": 0}), ("'rank_pattern'",), id="rank-0"),
    pytest.param(
        _config_change(rank_pattern={"q_proj(": 4}), ("'rank_pattern'", "q_proj("), id="rank-regex"
    ),
    pytest.param(_config_change(alpha_pattern="x"), ("'alpha_pattern'",), id="alpha-pattern-str"),
    pytest.param(
        _config_change(alpha_pattern={"q_proj": "big"}), ("'alpha_pattern'",), id="alpha-value"
    ),
    pytest.param(_config_change(lora_alpha="16"), ("'lora_alpha'",), id="lora-alpha-string"),
    pytest.param(
        _config_text(b'{"r": 4, "lora_alpha": NaN}'), ("lora_alpha is nan",), id="lora-alpha-nan"
    ),
    pytest.param(_config_change(target_modules=7), ("'target_modules'",), id="targets-int"),
    pytest.param(
        _config_change(target_modules=["q_proj", 3]), ("'target_modules'",), id="targets-mixed"
    ),
]


@pytest.mark.parametrize(("mutate", "phrases"), CONFIG_FAULTS)
def test_broken_adapter_config_is_refused_naming_the_key(
    trio: Trio, cli: Cli, tmp_path: Path, mutate: Callable[[Path], None], phrases: tuple[str, ...]
) -> None:
    mutate(trio.adapter / CONFIG)
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out), INCOMPATIBLE, CONFIG, *phrases, output=out)

"""Tied embeddings end to end: a LoRA on the ``lm_head`` of a model that ties it to its input
embedding, through the model pair and through a profile (the same cosines within the profile's
bounds, the same selection, the same patched lora_B); base and aligned models that disagree on
tying; and a config that says tied while ``lm_head.weight`` is stored (``heads.model_head``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from safelora_cli.errors import ExitCode
from safelora_cli.inputs.heads import HEAD, TIED_HEAD_STORED, model_head, pair_heads
from safelora_cli.inputs.index import index_folder
from safelora_cli.synthetic import LlamaShape, PairSpec, make_adapter, make_pair
from tests.helpers import MODEL, REPORT, WEIGHTS, edit_tensors, expect_error, invoke, lora_key

EMBED = "model.embed_tokens.weight"
WTE = "transformer.wte.weight"
SHAPE = LlamaShape(tie_embeddings=True)
# lm_head first: it leans least towards span(V), so it has the lowest cosine and is projected
MODULES = ["lm_head", *(f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj",
           "v_proj"))]  # fmt: skip
TARGETS = ("--targets", "q_proj,v_proj,lm_head")
K = ("-k", "1")


def tied_pair(root: Path, seed: int = 3) -> tuple[Path, Path]:
    return make_pair(root, PairSpec(shape=SHAPE, seed=seed))


def gpt2_tied_pair(root: Path) -> tuple[Path, Path]:
    from tests.factories import gpt2_pair

    return gpt2_pair(root, seed=4)


def edit_model(folder: Path, tie: bool | None = None, head: torch.Tensor | None = None) -> None:
    """Set config.json's tie_word_embeddings (None: leave it) and store ``head`` as lm_head."""
    if tie is not None:
        config = json.loads((folder / "config.json").read_text())
        config["tie_word_embeddings"] = tie
        (folder / "config.json").write_text(json.dumps(config))
    if head is not None:
        edit_tensors(folder / MODEL, lambda tensors: tensors.__setitem__(HEAD, head))


def embedding(folder: Path, name: str = EMBED) -> torch.Tensor:
    return load_file(folder / MODEL)[name]


def run(args: list[str]) -> Any:
    result = invoke(args)
    assert result.exit_code == ExitCode.OK, (result.stderr, result.exception)
    return result


def patch(adapter: Path, out: Path, source: list[str], *extra: str) -> dict[str, Any]:
    run(["patch", str(adapter), *source, "-o", str(out), "-q", *extra])
    report: dict[str, Any] = json.loads((out / REPORT).read_text())
    return report


def profile(base: Path, aligned: Path, out: Path, *extra: str) -> tuple[dict[str, Any], Any]:
    args = ["profile", "--base", str(base), "--aligned", str(aligned), "--output", str(out),
            "--json", *extra]  # fmt: skip
    result = run(args)
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary, result


def by_module(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["module"]: m for m in report["modules"]}


# --- through the pair and through a profile --------------------------------------------------

FAMILIES: dict[str, tuple[Callable[[Path], tuple[Path, Path]], list[str], str, tuple[str, ...]]]
FAMILIES = {
    "llama-tied": (tied_pair, MODULES, EMBED, TARGETS),
    "gpt2": (gpt2_tied_pair, ["lm_head"], WTE, ("--targets", "lm_head")),
}
MODES = {"paper": (), "subspace": ("--projection", "subspace", "--rank", "3")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_tied_lm_head_through_a_profile_is_the_pair_run(
    tmp_path: Path, family: str, mode: str
) -> None:
    build, modules, embed, targets = FAMILIES[family]
    base, aligned = build(tmp_path / "pair")
    adapter = make_adapter(tmp_path / "adapter", base, aligned, modules, seed=7)
    file = tmp_path / "tied.safetensors"
    summary, _ = profile(base, aligned, file, *targets, "--rank", "8")
    # the tied head's entry is its embedding, under the name pairing gives it, recorded as tied
    assert summary["tied"] == {HEAD: embed}
    assert embed in {w["weight"] for w in summary["weights"]}
    assert HEAD not in {w["weight"] for w in summary["weights"]}

    args = (*MODES[mode], "-k", str(min(2, len(modules))))
    on_pair = patch(adapter, tmp_path / "on-pair", ["--base", str(base), "--aligned",
                                                    str(aligned)], *args)  # fmt: skip
    via = patch(adapter, tmp_path / "via", ["--profile", str(file)], *args)
    want, got = by_module(on_pair), by_module(via)
    assert got.keys() == want.keys() == set(modules)
    for name, module in got.items():
        bound = (module["cosine_bound"] or 0.0) + 1e-5  # subspace: exact within the rank
        assert module["cosine"] == pytest.approx(want[name]["cosine"], abs=bound), name
        assert module["projected"] == want[name]["projected"], name
        assert (module["weight"], module["tied"]) == (want[name]["weight"], want[name]["tied"])
    assert (got["lm_head"]["weight"], got["lm_head"]["tied"]) == (embed, True)
    assert got["lm_head"]["projected"]  # so the lora_B compared below is a patched one
    assert via["summary"]["projected"] == on_pair["summary"]["projected"]
    b = lora_key("lm_head", "lora_B")
    patched, reference = (
        load_file(tmp_path / "via" / WEIGHTS),
        load_file(tmp_path / "on-pair" / WEIGHTS),
    )
    original = load_file(adapter / WEIGHTS)[b]
    assert not torch.allclose(reference[b], original)
    torch.testing.assert_close(patched[b], reference[b], rtol=1e-4, atol=1e-6)


def test_a_low_rank_profile_bounds_the_tied_head_like_any_weight(tmp_path: Path) -> None:
    base, aligned = tied_pair(tmp_path / "pair")
    adapter = make_adapter(tmp_path / "adapter", base, aligned, MODULES, seed=7)
    file = tmp_path / "low.safetensors"
    profile(base, aligned, file, *TARGETS, "--rank", "2")  # V has rank 4: a real error
    pair = ["--base", str(base), "--aligned", str(aligned)]
    exact = json.loads(run(["score", str(adapter), *pair, "--json", *K]).stdout)
    via = json.loads(run(["score", str(adapter), "--profile", str(file), "--json", *K]).stdout)
    want = by_module(exact)
    head = by_module(via)["lm_head"]
    assert head["cosine_bound"] > 0
    assert abs(head["cosine"] - want["lm_head"]["cosine"]) <= head["cosine_bound"]
    assert abs(head["cosine"] - want["lm_head"]["cosine"]) > 1e-6  # the bound is exercised


def test_a_profile_without_the_tied_head_says_how_to_build_one(tmp_path: Path) -> None:
    base, aligned = tied_pair(tmp_path / "pair")
    adapter = make_adapter(tmp_path / "adapter", base, aligned, MODULES, seed=7)
    file = tmp_path / "blocks.safetensors"
    summary, _ = profile(base, aligned, file)  # the default: the blocks' weights only
    assert summary["tied"] == {HEAD: EMBED}  # the pair's fact, whatever was profiled
    result = invoke(["score", str(adapter), "--profile", str(file), *K])
    line = expect_error(result, ExitCode.INCOMPATIBLE, f"{HEAD} (tied to {EMBED})", "--targets",
                        output=tmp_path / "none")  # fmt: skip
    assert "another model pair" not in line


def test_the_embedding_profiled_by_its_own_name_serves_the_tied_head(tmp_path: Path) -> None:
    base, aligned = tied_pair(tmp_path / "pair")
    adapter = make_adapter(tmp_path / "adapter", base, aligned, ["lm_head"], seed=7)
    file = tmp_path / "embed.safetensors"
    summary, _ = profile(base, aligned, file, "--targets", "embed_tokens,lm_head", "--rank", "8")
    assert [w["weight"] for w in summary["weights"]] == [EMBED]  # one entry for the one matrix
    pair = ["--base", str(base), "--aligned", str(aligned)]
    exact = json.loads(run(["score", str(adapter), *pair, "--json", *K]).stdout)
    via = json.loads(run(["score", str(adapter), "--profile", str(file), "--json", *K]).stdout)
    assert via["modules"][0]["cosine"] == pytest.approx(exact["modules"][0]["cosine"], abs=1e-5)


def test_an_untied_model_records_no_tie_and_profiles_lm_head_itself(tmp_path: Path) -> None:
    base, aligned = make_pair(tmp_path / "pair", PairSpec(shape=LlamaShape(), seed=3))
    summary, _ = profile(base, aligned, tmp_path / "p.safetensors", "--targets", "lm_head")
    assert summary["tied"] == {}
    assert [w["weight"] for w in summary["weights"]] == [HEAD]


# --- base and aligned that disagree on tying --------------------------------------------------


def untie(folder: Path, seed: int = 11) -> None:
    """Make a tied model untied: config.json says so and lm_head.weight is stored."""
    gen = torch.Generator().manual_seed(seed)
    edit_model(folder, tie=False, head=torch.randn(SHAPE.vocab, SHAPE.hidden, generator=gen))


@pytest.mark.parametrize("untied", ["base", "aligned"])
def test_base_and_aligned_that_disagree_on_tying_do_not_pair(tmp_path: Path, untied: str) -> None:
    base, aligned = tied_pair(tmp_path / "pair")
    adapter = make_adapter(tmp_path / "adapter", base, aligned, MODULES, seed=7)
    untie(base if untied == "base" else aligned)
    out = tmp_path / "out"
    args = ["patch", str(adapter), "--base", str(base), "--aligned", str(aligned), "-o", str(out),
            *K]  # fmt: skip
    line = expect_error(invoke(args), ExitCode.INCOMPATIBLE, "disagree on tied embeddings",
                        f"stores {HEAD}", f"ties lm_head to {EMBED}", output=out)  # fmt: skip
    assert f"the {untied} model stores {HEAD}" in line
    # the other modules alone pair: the refusal is about the head
    others = tmp_path / "others"
    make_adapter(others, base, aligned, MODULES[1:], seed=7)
    patch(others, tmp_path / "ok", ["--base", str(base), "--aligned", str(aligned)], *K)


def test_a_profile_of_a_pair_that_disagrees_on_tying_refuses_the_head(tmp_path: Path) -> None:
    base, aligned = tied_pair(tmp_path / "pair")
    untie(base)
    file = tmp_path / "p.safetensors"
    args = ["profile", "--base", str(base), "--aligned", str(aligned), "--output", str(file)]
    result = invoke([*args, *TARGETS])
    expect_error(result, ExitCode.INCOMPATIBLE, "--targets lm_head", "disagree on tied embeddings",
                 f"stores {HEAD}", f"ties lm_head to {EMBED}", output=file)  # fmt: skip
    # without the head, the blocks are profiled, and no tie is recorded for a later lm_head
    summary, _ = profile(base, aligned, file)
    assert summary["tied"] == {}


# --- a config that says tied while lm_head.weight is stored -----------------------------------


def test_a_stored_copy_of_a_tied_head_is_treated_as_tied_in_report_and_warning(
    tmp_path: Path,
) -> None:
    base, aligned = tied_pair(tmp_path / "pair")
    adapter = make_adapter(tmp_path / "adapter", base, aligned, MODULES, seed=7)
    pair = ["--base", str(base), "--aligned", str(aligned)]
    plain = patch(adapter, tmp_path / "plain", pair, *K)
    for folder in (base, aligned):  # as some checkpoints do: the tied matrix saved twice
        edit_model(folder, head=embedding(folder).clone())
    out = tmp_path / "out"
    result = run(["patch", str(adapter), *pair, "-o", str(out), *K])
    report = json.loads((out / REPORT).read_text())
    head = by_module(report)["lm_head"]
    assert (head["weight"], head["tied"]) == (EMBED, True)
    assert head["cosine"] == pytest.approx(by_module(plain)["lm_head"]["cosine"], abs=1e-6)
    [warning] = [w for w in report["warnings"] if w["code"] == TIED_HEAD_STORED]
    assert "treated as tied" in warning["message"]
    assert "treated as tied" in result.stderr
    # merged: the merge changes the one matrix, and says so, as the report says it is tied
    merged = tmp_path / "merged"
    run(["patch", str(adapter), *pair, "-o", str(merged), "--merge", *K])
    report = json.loads((merged / REPORT).read_text())
    codes = {w["code"] for w in report["warnings"]}
    assert {TIED_HEAD_STORED, "merged-tied"} <= codes
    assert by_module(report)["lm_head"]["tied"] is True
    tensors = load_file(merged / MODEL)
    assert torch.equal(tensors[HEAD], tensors[EMBED])  # still copies of one matrix


def test_a_stored_head_of_another_shape_contradicts_a_tied_config(tmp_path: Path) -> None:
    base, aligned = tied_pair(tmp_path / "pair")
    adapter = make_adapter(tmp_path / "adapter", base, aligned, MODULES, seed=7)
    edit_model(aligned, head=torch.zeros(SHAPE.vocab + 2, SHAPE.hidden))
    out = tmp_path / "out"
    args = ["patch", str(adapter), "--base", str(base), "--aligned", str(aligned), "-o", str(out),
            *K]  # fmt: skip
    expect_error(invoke(args), ExitCode.INCOMPATIBLE, "contradicts the weights", HEAD, EMBED,
                 f"[{SHAPE.vocab + 2}, {SHAPE.hidden}]", output=out)  # fmt: skip


# --- the rule, case by case -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tie", "stored", "want"),
    [
        pytest.param(True, None, (EMBED, True, False, False), id="tied"),
        pytest.param(None, None, (EMBED, True, False, False), id="no-flag-no-head"),
        pytest.param(True, (128, 64), (EMBED, True, True, False), id="tied-with-copy"),
        pytest.param(True, (130, 64), (EMBED, True, True, True), id="tied-copy-of-another-shape"),
        pytest.param(None, (128, 64), (HEAD, False, False, False), id="no-flag-head-stored"),
        pytest.param(False, (128, 64), (HEAD, False, False, False), id="untied"),
        pytest.param(False, None, (None, False, False, False), id="untied-head-missing"),
    ],
)
def test_the_head_of_a_model(
    tmp_path: Path,
    tie: bool | None,
    stored: tuple[int, int] | None,
    want: tuple[str | None, bool, bool, bool],
) -> None:
    base, _ = tied_pair(tmp_path / "pair")
    config = json.loads((base / "config.json").read_text())
    del config["tie_word_embeddings"]
    (base / "config.json").write_text(json.dumps(config))
    edit_model(base, tie=tie, head=torch.zeros(stored) if stored else None)
    head = model_head(index_folder(base))
    assert (head.weight, head.tied, head.copy, head.problem is not None) == want


def test_pair_heads_name_the_tie_only_when_both_agree(tmp_path: Path) -> None:
    base, aligned = tied_pair(tmp_path / "pair")
    assert pair_heads(index_folder(base), index_folder(aligned)).tied_to == EMBED
    untie(aligned)
    heads = pair_heads(index_folder(base), index_folder(aligned))
    assert heads.tied_to is None
    assert heads.problem() is not None


def test_a_tied_config_with_no_known_embedding_keeps_its_stored_head(tmp_path: Path) -> None:
    """Tied in config.json, but no embedding safelora knows the name of: lm_head.weight is the
    head, untied, in the report and in the merge alike (no tie claimed anywhere)."""
    base, aligned = make_pair(tmp_path / "pair", PairSpec(shape=LlamaShape(), seed=3))
    for folder in (base, aligned):
        edit_model(folder, tie=True)
        edit_tensors(folder / MODEL, lambda t: t.__setitem__("embed_in.weight", t.pop(EMBED)))
    adapter = make_adapter(tmp_path / "adapter", base, aligned, ["lm_head"], seed=7)
    pair = ["--base", str(base), "--aligned", str(aligned)]
    out = tmp_path / "merged"
    run(["patch", str(adapter), *pair, "-o", str(out), "--merge", *K])
    report = json.loads((out / REPORT).read_text())
    assert (report["modules"][0]["weight"], report["modules"][0]["tied"]) == (HEAD, False)
    assert not {"merged-tied", TIED_HEAD_STORED} & {w["code"] for w in report["warnings"]}
    tensors, before = load_file(out / MODEL), load_file(aligned / MODEL)
    assert not torch.equal(tensors[HEAD], before[HEAD])
    assert torch.equal(tensors["embed_in.weight"], before["embed_in.weight"])

"""Full fine-tunes and merged models through the command line: what is written, what is refused,
and that nothing partial is ever left."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safelora_cli.errors import ExitCode
from safelora_cli.output.shards import ShardWriter
from safelora_cli.synthetic import (
    FineTuneSpec,
    LlamaShape,
    PairSpec,
    all_modules,
    make_adapter,
    make_full_finetune,
    make_pair,
)
from tests.full_helpers import folder_tensors
from tests.helpers import CARD, REPORT, assert_error, invoke, leftovers

FROZEN = ("model.layers.0.self_attn.k_proj",)


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    base, aligned = make_pair(tmp_path, PairSpec(dtype=torch.bfloat16, shards=2, seed=3))
    ft = make_full_finetune(tmp_path / "ft", base, aligned, FineTuneSpec(FROZEN, shards=2))
    return {"base": base, "aligned": aligned, "ft": ft, "root": tmp_path}


def model_args(models: dict[str, Path]) -> list[str]:
    return ["--base", str(models["base"]), "--aligned", str(models["aligned"])]


def test_patch_writes_a_model_folder_with_a_card_and_a_full_report(
    models: dict[str, Path],
) -> None:
    out = models["root"] / "out"
    result = invoke(["patch", str(models["ft"]), *model_args(models), "-o", str(out), "-k", "3"])
    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stdout == f"{out}\n"
    assert "(full)" in result.stderr  # the heat map's title names the kind
    report = json.loads((out / REPORT).read_text())
    assert report["kind"] == "full"
    assert report["inputs"]["model"]["path"] == models["ft"].name  # published: no local path
    assert report["output_kind"] == "full"
    assert report["summary"]["projected"] == 3
    skipped = {m["module"]: m["skipped"] for m in report["modules"] if m["skipped"]}
    assert skipped == {FROZEN[0]: "weight unchanged by the fine-tune"}
    assert "library_name: transformers" in (out / CARD).read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in models["ft"].iterdir()] + [CARD, REPORT]
    )
    got, ft = folder_tensors(out), folder_tensors(models["ft"])
    changed = {name for name in got if not torch.equal(got[name], ft[name])}
    assert changed == {m["weight"] for m in report["modules"] if m["projected"]}


def test_score_of_a_fine_tune_writes_nothing_and_gates(models: dict[str, Path]) -> None:
    before = sorted(p.name for p in models["root"].iterdir())
    args = ["score", str(models["ft"]), *model_args(models), "-k", "2", "--json"]
    result = invoke(args)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert json.loads(result.stdout)["summary"]["projected"] == 2
    gate = invoke([*args, "--fail-if-projected", "1"])
    assert gate.exit_code == ExitCode.GATE_FAILED
    assert sorted(p.name for p in models["root"].iterdir()) == before


def test_targets_choose_the_weights(models: dict[str, Path]) -> None:
    args = ["score", str(models["ft"]), *model_args(models), "--json", "-k", "1"]
    report = json.loads(invoke([*args, "--targets", "q_proj,v_proj"]).stdout)
    assert {m["module"].rsplit(".", 1)[1] for m in report["modules"]} == {"q_proj", "v_proj"}
    assert report["settings"]["targets"] == ["q_proj,v_proj"]
    head = json.loads(invoke([*args, "--targets", "lm_head"]).stdout)
    assert [m["module"] for m in head["modules"]] == ["lm_head"]


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["--merge"], "--merge applies to adapters"),
        (["--adapter-name", "x"], "--adapter-name applies to adapters"),
        (["--targets", "no_such_module"], "names no 2-D weight"),
    ],
    ids=["merge", "adapter-name", "unknown-target"],
)
def test_options_that_mean_nothing_for_a_fine_tune_are_usage_errors(
    models: dict[str, Path], extra: list[str], phrase: str
) -> None:
    out = models["root"] / "out"
    result = invoke(["patch", str(models["ft"]), *model_args(models), "-o", str(out), *extra])
    assert_error(result, ExitCode.USAGE, phrase)
    assert not out.exists()


def test_a_fine_tune_is_patched_alone_and_targets_are_for_fine_tunes(
    models: dict[str, Path],
) -> None:
    adapter = make_adapter(
        models["root"] / "adapter", models["base"], models["aligned"], all_modules(LlamaShape())
    )
    batch = invoke(["score", str(models["ft"]), str(adapter), *model_args(models)])
    assert_error(batch, ExitCode.USAGE, "patched alone")
    targeted = invoke(["score", str(adapter), *model_args(models), "--targets", "q_proj"])
    assert_error(targeted, ExitCode.USAGE, "--targets applies to full fine-tunes")


def test_a_fine_tune_of_another_model_is_refused_with_every_problem(tmp_path: Path) -> None:
    base, aligned = make_pair(tmp_path, PairSpec(seed=3))
    other = LlamaShape(intermediate=96)
    _, other_aligned = make_pair(tmp_path / "other", PairSpec(shape=other, seed=4))
    ft = make_full_finetune(tmp_path / "ft", base, aligned, FineTuneSpec())
    args = ["score", str(ft), "--base", str(base), "--aligned", str(other_aligned)]
    line = assert_error(invoke(args), ExitCode.INCOMPATIBLE, "differ in shape")
    assert "6 tensors differ in shape" in line  # gate, up and down of both layers, at once


def test_pickle_only_fine_tune_is_refused_with_a_hint(models: dict[str, Path]) -> None:
    for shard in models["ft"].glob("*.safetensors"):
        shard.unlink()
    (models["ft"] / "model.safetensors.index.json").unlink()
    (models["ft"] / "pytorch_model.bin").write_bytes(b"pickle")
    result = invoke(["score", str(models["ft"]), *model_args(models)])
    assert_error(result, ExitCode.INCOMPATIBLE, "pickle", "safetensors")


def test_nan_in_the_fine_tune_is_a_numerical_error(models: dict[str, Path]) -> None:
    shard = sorted(models["ft"].glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(n for n in tensors if ".layers." in n and n.endswith("q_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    result = invoke(["score", str(models["ft"]), *model_args(models)])
    assert_error(result, ExitCode.NUMERICAL, name.removesuffix(".weight"))


@pytest.mark.parametrize("fault", ["disk-full", "interrupt"])
def test_a_failure_while_writing_shards_leaves_nothing(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    real = ShardWriter.replace
    calls: list[int] = []

    def failing(self: ShardWriter, info: object, tensor: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == 2:  # the first weight is written, then the disk fills
            if fault == "interrupt":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, info, tensor)  # type: ignore[arg-type]

    monkeypatch.setattr(ShardWriter, "replace", failing)
    out = models["root"] / "out"
    result = invoke(["patch", str(models["ft"]), *model_args(models), "-o", str(out), "-k", "3"])
    code = ExitCode.INTERRUPTED if fault == "interrupt" else ExitCode.FILESYSTEM
    assert_error(result, code)
    assert not out.exists()
    assert leftovers(models["root"]) == []


def test_inspect_lists_what_the_fine_tune_changed(models: dict[str, Path]) -> None:
    result = invoke(["inspect", str(models["ft"]), "--aligned", str(models["aligned"]), "--json"])
    assert result.exit_code == ExitCode.OK, result.stderr
    info = json.loads(result.stdout)
    entries = {t["tensor"]: t for t in info["tensors"]}
    ft, aligned = folder_tensors(models["ft"]), folder_tensors(models["aligned"])
    for name, tensor in ft.items():
        d = tensor.double() - aligned[name].double()
        want = float(d.norm()) / float(aligned[name].double().norm())
        assert entries[name]["changed"] == bool(d.norm() > 0), name
        assert entries[name]["relative"] == pytest.approx(want, rel=1e-5), name
    assert entries[f"{FROZEN[0]}.weight"]["changed"] is False
    assert entries[f"{FROZEN[0]}.weight"]["targeted"] is True
    assert entries["model.norm.weight"]["targeted"] is False
    shown = invoke(["inspect", str(models["ft"]), "--aligned", str(models["aligned"])])
    assert "tensors changed by the fine-tune" in shown.stderr
    alone = invoke(["inspect", str(models["ft"])])
    assert_error(alone, ExitCode.USAGE, "--aligned")


def test_merge_of_a_batch_writes_a_full_model_per_adapter(tmp_path: Path) -> None:
    base, aligned = make_pair(tmp_path, PairSpec(shards=2, seed=6))
    modules = all_modules(LlamaShape(), ("q_proj", "v_proj"))
    first = make_adapter(tmp_path / "one", base, aligned, modules, seed=1)
    second = make_adapter(tmp_path / "two", base, aligned, modules, seed=2)
    out = tmp_path / "merged"
    args = ["patch", str(first), str(second), "--base", str(base), "--aligned", str(aligned),
            "-o", str(out), "--merge", "-k", "1", "-q"]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == ExitCode.OK, result.stderr
    for name in ("one", "two"):
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [p.name for p in aligned.iterdir()] + [CARD, REPORT]
        )
        report = json.loads((folder / REPORT).read_text())
        assert report["inputs"]["adapter"]["path"] == name  # published: the folder's name
        assert (report["kind"], report["output_kind"], report["settings"]["merge"]) == (
            "adapter", "merged", True,
        )  # fmt: skip
        assert "library_name: transformers" in (folder / CARD).read_text()
    one, two = folder_tensors(out / "one"), folder_tensors(out / "two")
    assert any(not torch.equal(one[n], two[n]) for n in one)  # each its own adapter


def test_an_adapter_given_where_a_model_is_due_is_named(models: dict[str, Path]) -> None:
    adapter = make_adapter(
        models["root"] / "adapter", models["base"], models["aligned"], all_modules(LlamaShape())
    )
    result = invoke(["score", str(adapter), "--base", str(adapter), "--aligned",
                     str(models["aligned"])])  # fmt: skip
    assert_error(result, ExitCode.INCOMPATIBLE, "is a LoRA adapter's folder")
    full = invoke(["score", str(models["ft"]), "--base", str(models["base"]), "--aligned",
                   str(adapter)])  # fmt: skip
    assert_error(full, ExitCode.INCOMPATIBLE, "is a LoRA adapter's folder")


def test_show_renders_a_full_fine_tunes_report(models: dict[str, Path]) -> None:
    out = models["root"] / "out"
    assert (
        invoke(["patch", str(models["ft"]), *model_args(models), "-o", str(out), "-q"]).exit_code
        == 0
    )
    shown = invoke(["show", str(out / REPORT)])
    assert shown.exit_code == ExitCode.OK, shown.stderr
    assert "(full)" in shown.stderr
    assert "‖D‖ before" in shown.stderr


def test_a_fine_tune_through_a_profile(models: dict[str, Path]) -> None:
    """V from the profile, D from --aligned: cosines within their bounds of the model pair's,
    and the written weights W_aligned + Û diag(ŝ²) Ûᵀ D / ν, checked densely in float64."""
    from safelora_cli.sources.profile import load_entry, read_profile

    profile = models["root"] / "p.safetensors"
    built = invoke(["profile", *model_args(models), "-o", str(profile), "--rank", "2", "-q"])
    assert built.exit_code == ExitCode.OK, built.stderr
    exact = json.loads(
        invoke(["score", str(models["ft"]), *model_args(models), "--json", "-q"]).stdout
    )
    via_args = ["--profile", str(profile), "--aligned", str(models["aligned"])]
    via = json.loads(invoke(["score", str(models["ft"]), *via_args, "--json", "-q"]).stdout)
    assert via["kind"] == "full"
    assert via["inputs"]["profile"]["rank_rule"]["rank"] == 2
    cosines = {m["module"]: m["cosine"] for m in exact["modules"]}
    for module in via["modules"]:
        if module["cosine"] is not None:
            assert abs(module["cosine"] - cosines[module["module"]]) <= module["cosine_bound"]
    # an fp32 fine-tune of the bf16 pair: the written values are checked to float32 precision
    ft32 = make_full_finetune(models["root"] / "ft32", models["base"], models["aligned"],
                              FineTuneSpec(FROZEN, dtype=torch.float32))  # fmt: skip
    out = models["root"] / "out"
    result = invoke(["patch", str(ft32), *via_args, "-o", str(out), "-k", "2", "-q"])
    assert result.exit_code == ExitCode.OK, result.stderr
    report = json.loads((out / REPORT).read_text())
    info = read_profile(profile)
    got, aligned, ft = (folder_tensors(p) for p in (out, models["aligned"], ft32))
    for module in report["modules"]:
        name = module["weight"]
        if not module["projected"]:
            assert torch.equal(got[name], ft[name])
            continue
        entry = load_entry(info, name)
        assert entry.u is not None and entry.s is not None  # noqa: PT018
        u, s = entry.u.double(), entry.s.double()
        d = ft[name].double() - aligned[name].double()
        want = aligned[name].double() + u @ ((s**2)[:, None] * (u.T @ d)) / entry.v_norm
        update = want - aligned[name].double()
        assert (got[name].double() - want).norm() <= 1e-5 * update.norm() + 1e-7 * want.norm()
        assert update.norm() > 0


def test_a_fine_tune_through_a_profile_needs_aligned_and_not_base(
    models: dict[str, Path],
) -> None:
    profile = models["root"] / "p.safetensors"
    assert invoke(["profile", *model_args(models), "-o", str(profile), "-q"]).exit_code == 0
    alone = invoke(["score", str(models["ft"]), "--profile", str(profile)])
    assert_error(alone, ExitCode.USAGE, "also needs --aligned")
    with_base = invoke(["score", str(models["ft"]), "--profile", str(profile), "--base",
                        str(models["base"])])  # fmt: skip
    assert_error(with_base, ExitCode.USAGE, "--profile and --base")
    adapter = make_adapter(
        models["root"] / "adapter", models["base"], models["aligned"], all_modules(LlamaShape())
    )
    adapter_aligned = invoke(["score", str(adapter), "--profile", str(profile), "--aligned",
                              str(models["aligned"])])  # fmt: skip
    assert_error(adapter_aligned, ExitCode.USAGE, "--profile and --aligned")

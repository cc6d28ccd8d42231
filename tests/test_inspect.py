"""``safelora inspect``: modules, ranks, PEFT's scaling, dtypes, passthrough tensors, pairing;
``safelora presets`` and every command's help.

Scaling is checked twice: against numbers worked out by hand, and against PEFT itself (a tiny
transformers Llama wrapped with ``get_peft_model``, saved, then inspected).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from safelora_cli.cli import app
from safelora_cli.errors import ExitCode, IncompatibleInputError, UsageError
from safelora_cli.inputs.adapter import expected_alpha
from safelora_cli.runs.inspection import inspect_adapter
from safelora_cli.synthetic import LlamaShape, PairSpec, adapter_config, make_pair, save_model
from tests.conftest import Trio, TrioFactory
from tests.helpers import CONFIG, PREFIX, Q0, WEIGHTS, Cli, assert_error, invoke

V0 = "model.layers.0.self_attn.v_proj"
Q1, DOWN0 = "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"


def write_adapter(
    folder: Path,
    factors: dict[str, tuple[int, int, int]],
    config: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """An adapter with ``module -> (out, in, rank)`` factors, the given config and extra tensors."""
    gen = torch.Generator().manual_seed(3)
    tensors = dict(extra or {})
    for module, (out, inp, rank) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(rank, inp, generator=gen).to(dtype)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(out, rank, generator=gen).to(dtype)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


def factors_for(shape: LlamaShape, ranks: dict[str, int]) -> dict[str, tuple[int, int, int]]:
    return {m: (*shape.proj_shape(m.rsplit(".", 1)[-1]), r) for m, r in ranks.items()}


def by_module(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["module"]: m for m in info["modules"]}


# --- the library ---------------------------------------------------------------------------------


def test_inspect_lists_modules_in_natural_order(make_trio: TrioFactory) -> None:
    trio = make_trio(shape=LlamaShape(layers=11), projs=("q_proj",))
    info = inspect_adapter(trio.adapter)
    assert [m["module"] for m in info["modules"]] == trio.modules  # layers.2 before layers.10


def test_inspect_lists_modules_ranks_scaling_dtypes(trio: Trio) -> None:
    info = inspect_adapter(trio.adapter)
    assert sorted(m["module"] for m in info["modules"]) == sorted(trio.modules)
    for module in info["modules"]:
        out, inp = trio.shape.proj_shape(module["module"].rsplit(".", 1)[-1])
        assert module["shape"] == [out, inp]
        assert (module["rank"], module["alpha"], module["scaling"]) == (4, 8.0, 2.0)
        assert module["lora_A"]["shape"] == [4, inp]
        assert module["lora_B"]["shape"] == [out, 4]
        assert "paired" not in module
    summary = info["summary"]
    assert summary["modules"] == len(trio.modules)
    assert summary["ranks"] == {"4": len(trio.modules)}
    assert summary["dtypes"] == {"F32": 2 * len(trio.modules)}
    shapes = [m["shape"] for m in info["modules"]]
    assert summary["lora_parameters"] == sum(4 * (out + inp) for out, inp in shapes)
    assert (summary["paired"], summary["unpaired"], summary["passthrough"]) == (None, None, 0)
    assert info["config"]["r"] == 4
    assert info["inputs"]["adapter"]["path"] == str(trio.adapter)
    assert info["inputs"]["base"] is None


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_rank_and_alpha_patterns_apply_per_module(tmp_path: Path, rslora: bool) -> None:
    shape = LlamaShape()
    ranks = {Q0: 4, V0: 2, Q1: 6, DOWN0: 4}
    config = adapter_config(
        ranks, 4, 8,
        rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
        alpha_pattern={"down_proj": 3},
        use_rslora=rslora,
    )  # fmt: skip
    adapter = write_adapter(tmp_path / "a", factors_for(shape, ranks), config)
    modules = by_module(inspect_adapter(adapter))
    divide = math.sqrt if rslora else float
    expected = {Q0: (4, 8.0), V0: (2, 8.0), Q1: (6, 8.0), DOWN0: (4, 3.0)}
    for module, (rank, alpha) in expected.items():
        assert modules[module]["rank"] == rank
        assert modules[module]["alpha"] == alpha
        assert modules[module]["scaling"] == pytest.approx(alpha / divide(rank))
    assert inspect_adapter(adapter)["summary"]["ranks"] == {"2": 1, "4": 2, "6": 1}


def test_alpha_pattern_follows_the_rank_pattern_rule() -> None:
    patterns = {"q_proj": 1, r"layers\.1\..*v_proj": 2, "mlp.up_proj": 3}
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": patterns, "alpha_pattern": patterns}
    from safelora_cli.inputs.adapter import expected_rank

    for module in (Q0, Q1, V0, "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.up_proj",
                   "model.layers.0.mlp.xup_proj", "model.layers.0.self_attn.q_proj_x"):  # fmt: skip
        rank = expected_rank(config, module)
        alpha = expected_alpha(config, module)
        assert (rank == 8) == (alpha == 16)
        if rank != 8:
            assert alpha == rank


def test_passthrough_tensors_and_mixed_dtypes(tmp_path: Path) -> None:
    shape = LlamaShape()
    saved = torch.zeros(shape.vocab, shape.hidden, dtype=torch.float16)
    extra = {f"{PREFIX}lm_head.modules_to_save.default.weight": saved}
    adapter = write_adapter(
        tmp_path / "a", factors_for(shape, {Q0: 4}), adapter_config([Q0], 4, 8),
        dtype=torch.bfloat16, extra=extra,
    )  # fmt: skip
    info = inspect_adapter(adapter)
    assert info["passthrough"] == [
        {"name": f"{PREFIX}lm_head.modules_to_save.default.weight", "dtype": "F16",
         "shape": [shape.vocab, shape.hidden]}
    ]  # fmt: skip
    assert info["summary"]["dtypes"] == {"BF16": 2, "F16": 1}
    assert info["modules"][0]["lora_A"]["dtype"] == "BF16"


def test_bad_alpha_is_an_incompatible_input(tmp_path: Path) -> None:
    shape = LlamaShape()
    config = adapter_config([Q0], 4, 8, alpha_pattern={"q_proj": "big"})
    adapter = write_adapter(tmp_path / "a", factors_for(shape, {Q0: 4}), config)
    with pytest.raises(IncompatibleInputError, match="lora_alpha for .*q_proj.* is 'big'") as err:
        inspect_adapter(adapter)
    assert str(adapter / CONFIG) in err.value.message


def test_every_module_pairs_with_its_own_base(trio: Trio) -> None:
    info = inspect_adapter(trio.adapter, base=trio.base)
    for module in info["modules"]:
        assert module["paired"] is True
        assert module["weight"] == f"{module['module']}.weight"
        assert (module["tied"], module["problem"]) == (False, None)
    assert (info["summary"]["paired"], info["summary"]["unpaired"]) == (len(trio.modules), 0)
    assert info["inputs"]["base"]["path"] == str(trio.base)


def test_wrong_base_reports_each_problem(trio: Trio, tmp_path: Path) -> None:
    small = LlamaShape(hidden=32, intermediate=80, layers=1)
    other, _ = make_pair(tmp_path / "small", PairSpec(shape=small))
    info = inspect_adapter(trio.adapter, base=other)
    modules = by_module(info)
    assert modules[Q0]["paired"] is False
    assert modules[Q0]["problem"] == "lora_B @ lora_A is [64, 64] but the base weight is [32, 32]"
    assert modules[Q1]["problem"] == f"no {Q1}.weight in the base model"
    assert info["summary"]["paired"] == 0


def test_aligned_model_is_checked_too(trio: Trio, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(trio.aligned / "model.safetensors"))
    del weights[f"{V0}.weight"]
    partial = save_model(tmp_path / "partial", weights)
    modules = by_module(inspect_adapter(trio.adapter, base=trio.base, aligned=partial))
    assert modules[V0]["problem"] == f"no {V0}.weight in the aligned model"
    assert modules[Q0]["paired"] is True


def test_lm_head_pairs_with_a_tied_embedding(make_trio: TrioFactory, tmp_path: Path) -> None:
    trio = make_trio(shape=LlamaShape(tie_embeddings=True), projs=("q_proj",))
    shape = trio.shape
    adapter = write_adapter(
        tmp_path / "head", {"lm_head": (shape.vocab, shape.hidden, 2)},
        adapter_config(["lm_head"], 2, 4),
    )  # fmt: skip
    [module] = inspect_adapter(adapter, base=trio.base)["modules"]
    assert (module["paired"], module["tied"]) == (True, True)
    assert module["weight"] == "model.embed_tokens.weight"


# --- against PEFT itself -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_scaling_matches_peft(trio: Trio, tmp_path: Path, rslora: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(trio.base, dtype=torch.float32)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
        rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
        alpha_pattern={"down_proj": 3, "layers.0.self_attn.v_proj": 5},
    )  # fmt: skip
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(tmp_path / "peft")
    peft_scaling = {
        name.removeprefix(PREFIX): (layer.r["default"], layer.scaling["default"])
        for name, layer in peft_model.named_modules()
        if isinstance(layer, LoraLayer)
    }
    modules = by_module(inspect_adapter(tmp_path / "peft", base=trio.base))
    assert modules.keys() == peft_scaling.keys()
    for name, (rank, scale) in peft_scaling.items():
        assert modules[name]["rank"] == rank
        assert modules[name]["scaling"] == pytest.approx(scale, rel=1e-12)
        assert modules[name]["paired"] is True
    assert {m["scaling"] for m in modules.values()} != {2.0}  # the patterns did something


# --- the command ---------------------------------------------------------------------------------


def test_inspect_table_goes_to_stderr(trio: Trio, cli: Cli) -> None:
    result = cli(["inspect", str(trio.adapter), "--base", str(trio.base)])
    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stdout == ""
    for module in trio.modules:
        assert module in result.stderr
    n = len(trio.modules)
    assert f"{n} of {n} pair with the base" in " ".join(result.stderr.split())


def test_inspect_json_is_the_library_result(trio: Trio, cli: Cli) -> None:
    result = cli(["inspect", str(trio.adapter), "--base", str(trio.base), "--json"])
    assert result.exit_code == ExitCode.OK, result.stderr
    assert json.loads(result.stdout) == inspect_adapter(trio.adapter, base=trio.base)
    assert result.stderr == ""


def test_inspect_shows_passthrough_tensors(tmp_path: Path, cli: Cli) -> None:
    shape = LlamaShape()
    extra = {f"{PREFIX}lm_head.modules_to_save.default.weight": torch.zeros(shape.vocab, 4)}
    adapter = write_adapter(
        tmp_path / "a", factors_for(shape, {Q0: 4}), adapter_config([Q0], 4, 8), extra=extra
    )
    result = cli(["inspect", str(adapter)])
    assert result.exit_code == ExitCode.OK, result.stderr
    assert "passthrough tensors" in result.stderr
    assert "lm_head.modules_to_save.default.weight" in result.stderr


def test_unpaired_modules_are_an_error_after_the_listing(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    other, _ = make_pair(tmp_path / "small", PairSpec(shape=LlamaShape(hidden=32, layers=1)))
    result = cli(["inspect", str(trio.adapter), "--base", str(other), "--json"])
    assert result.exit_code == ExitCode.INCOMPATIBLE
    assert json.loads(result.stdout)["summary"]["paired"] == 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {trio.adapter}: {len(trio.modules)} of {len(trio.modules)}")
    first = json.loads(result.stdout)["modules"][0]
    assert first["module"] == DOWN0  # natural order: mlp before self_attn
    assert f"first: {DOWN0}: {first['problem']} (hint: " in lines[0]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ADAPTER", "--aligned", "ALIGNED"], ExitCode.USAGE, "--aligned needs --base"),
        (["MISSING"], ExitCode.USAGE, "no such folder"),
        (["EMPTY"], ExitCode.INCOMPATIBLE, "no adapter_config.json"),
        (["ADAPTER", "--base", "MISSING"], ExitCode.USAGE, "--base"),
        (["ADAPTER", "--base", "EMPTY"], ExitCode.INCOMPATIBLE, "no *.safetensors weights"),
    ],
    ids=["aligned-without-base", "no-adapter", "not-an-adapter", "no-base", "base-without-weights"],
)
def test_inspect_errors(
    trio: Trio, cli: Cli, tmp_path: Path, args: list[str], code: ExitCode, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    swap = {
        "ADAPTER": str(trio.adapter), "ALIGNED": str(trio.aligned),
        "MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty"),
    }  # fmt: skip
    result = cli(["inspect", *[swap.get(a, a) for a in args]])
    assert_error(result, code, message)
    assert result.stdout == ""


def test_error_classes_keep_their_exit_codes() -> None:
    assert UsageError.exit_code == ExitCode.USAGE
    assert IncompatibleInputError.exit_code == ExitCode.INCOMPATIBLE


@pytest.mark.parametrize("args", [["presets"], ["inspect", "ADAPTER"]], ids=["presets", "inspect"])
def test_informational_commands_do_not_import_torch(trio: Trio, args: list[str]) -> None:
    argv = [str(trio.adapter) if a == "ADAPTER" else a for a in args]
    code = (
        "import sys\n"
        "from safelora_cli.cli import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


# --- every command -------------------------------------------------------------------------------


def command_names() -> list[str]:
    return [c.name or c.callback.__name__ for c in app.registered_commands if c.callback]


def test_the_issue_commands_are_registered() -> None:
    assert {"patch", "score", "presets", "inspect"} <= set(command_names())


@pytest.mark.parametrize("name", command_names())
def test_every_command_has_help_and_examples(cli: Cli, name: str) -> None:
    [command] = [c for c in app.registered_commands if (c.name or c.callback.__name__) == name]
    assert command.callback is not None
    assert (command.callback.__doc__ or "").strip()
    assert command.epilog is not None
    assert "Examples:" in command.epilog
    assert f"safelora {name}" in command.epilog
    result = cli([name, "--help"])
    assert result.exit_code == ExitCode.OK
    first_line = command.callback.__doc__.strip().splitlines()[0]
    assert " ".join(first_line.split()[:4]) in " ".join(result.stdout.split())
    assert "Examples:" in result.stdout


def test_a_non_finite_alpha_never_reaches_stdout_as_bare_infinity(trio: Trio) -> None:
    """``lora_alpha: Infinity`` (accepted by Python's JSON reader) is exit 4 with one line, not a
    listing that would print ``Infinity``, which is not JSON."""
    config = trio.adapter / CONFIG
    values = json.loads(config.read_text())
    values["lora_alpha"] = "@@"
    config.write_text(json.dumps(values).replace('"@@"', "Infinity"))
    result = invoke(["inspect", str(trio.adapter), "--json"])
    assert_error(result, ExitCode.INCOMPATIBLE, "lora_alpha")
    assert result.stdout == ""

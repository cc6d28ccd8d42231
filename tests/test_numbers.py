"""Numbers: layers identical in base and aligned, zero LoRA deltas, NaN/Inf in what is read, half
precision inputs, overflow of the projected factor, and the selection flags' ranges.

Each case edits a seeded ``make_trio()`` trio and runs ``safelora patch`` in-process: skipped
modules are reported with their reason and left byte for byte, bad numbers are one clear line
naming the tensor and the file, and half precision gives the fp32 result rounded once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from safelora_cli.errors import ExitCode
from safelora_cli.math.reasons import ZERO_DELTA, ZERO_V
from tests.conftest import Trio, TrioFactory
from tests.helpers import (
    DOWN1,
    K0,
    MODEL,
    PROJECT_ALL,
    Q0,
    V1,
    WEIGHTS,
    Cli,
    edit_tensors,
    expect_error,
    expect_ok,
    lora_key,
)


def run_patch(cli: Cli, trio: Trio, output: Path, *extra: str) -> Any:
    return cli(trio.patch_args(output, "--quiet", *extra))


# --- skipped modules --------------------------------------------------------------------------


def test_layer_identical_in_base_and_aligned_is_skipped_with_its_reason(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> None:
    trio = make_trio(identical=(Q0, DOWN1))
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out, *PROJECT_ALL), out)
    skipped = {m["module"]: m for m in report["modules"] if m["skipped"]}
    assert set(skipped) == {Q0, DOWN1}
    for entry in skipped.values():
        assert entry["skipped"] == ZERO_V
        assert (entry["cosine"], entry["projected"], entry["v_norm"]) == (None, False, 0.0)
    assert report["summary"]["skipped"] == 2
    assert report["summary"]["projected"] == len(trio.modules) - 2
    before, after = load_file(str(trio.adapter / WEIGHTS)), load_file(str(out / WEIGHTS))
    for module in (Q0, DOWN1):
        assert torch.equal(before[lora_key(module, "lora_B")], after[lora_key(module, "lora_B")])


@pytest.mark.parametrize("factor", ["lora_B", "lora_A"])
def test_zero_lora_delta_is_skipped_as_a_no_op(
    trio: Trio, cli: Cli, tmp_path: Path, factor: str
) -> None:
    key = lora_key(K0, factor)
    edit_tensors(trio.adapter / WEIGHTS, lambda t: t.update({key: torch.zeros_like(t[key])}))
    out = tmp_path / "out"
    report = expect_ok(run_patch(cli, trio, out, *PROJECT_ALL), out)
    [entry] = [m for m in report["modules"] if m["skipped"]]
    assert entry["module"] == K0
    assert entry["skipped"] == ZERO_DELTA
    assert (entry["cosine"], entry["projected"]) == (None, False)
    before, after = load_file(str(trio.adapter / WEIGHTS)), load_file(str(out / WEIGHTS))
    assert torch.equal(before[lora_key(K0, "lora_B")], after[lora_key(K0, "lora_B")])


# --- NaN and Inf ------------------------------------------------------------------------------


def _poison(value: float, key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensor = tensors[key]
        tensor.view(-1)[tensor.numel() // 2] = value

    return edit


@pytest.mark.parametrize(
    ("which", "key", "value"),
    [
        pytest.param("base", f"{Q0}.weight", float("nan"), id="nan-base"),
        pytest.param("aligned", f"{DOWN1}.weight", float("inf"), id="inf-aligned"),
        pytest.param("adapter", lora_key(V1, "lora_A"), float("nan"), id="nan-lora-A"),
        pytest.param("adapter", lora_key(V1, "lora_B"), float("-inf"), id="inf-lora-B"),
    ],
)
def test_nan_or_inf_in_a_tensor_that_is_read_is_refused_naming_it(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, which: str, key: str, value: float
) -> None:
    trio = make_trio(dtype=torch.bfloat16)
    path = {"base": trio.base / MODEL, "aligned": trio.aligned / MODEL}.get(
        which, trio.adapter / WEIGHTS
    )
    edit_tensors(path, _poison(value, key))
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out), ExitCode.NUMERICAL, f"{path.parent.name}/{path.name}", key,
        "NaN or Inf", output=out,
    )  # fmt: skip


def test_nan_in_a_tensor_that_is_not_read_is_fine(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    edit_tensors(trio.base / MODEL, _poison(float("nan"), "model.embed_tokens.weight"))
    out = tmp_path / "out"
    expect_ok(run_patch(cli, trio, out), out)


# --- half precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs_are_patched_in_fp32_and_kept_in_their_dtype(
    make_trio: TrioFactory, cli: Cli, tmp_path: Path, dtype: torch.dtype
) -> None:
    half, full = make_trio(dtype=dtype), make_trio(dtype=dtype, adapter_dtype=torch.float32)
    out, ref = tmp_path / "half", tmp_path / "full"
    report = expect_ok(run_patch(cli, half, out), out)
    expect_ok(run_patch(cli, full, ref), ref)
    before, after = load_file(str(half.adapter / WEIGHTS)), load_file(str(out / WEIGHTS))
    assert {t.dtype for t in after.values()} == {dtype}
    projected = {m["module"] for m in report["modules"] if m["projected"]}
    assert len(projected) == 10
    for module in half.modules:
        assert torch.equal(before[lora_key(module, "lora_A")], after[lora_key(module, "lora_A")])
        same = torch.equal(before[lora_key(module, "lora_B")], after[lora_key(module, "lora_B")])
        assert same == (module not in projected)
    # the math ran in fp32: the result is the fp32 adapter's, rounded once to the half dtype
    reference = load_file(str(ref / WEIGHTS))
    for module in projected:
        key = lora_key(module, "lora_B")
        torch.testing.assert_close(
            after[key].float(), reference[key], rtol=2e-2, atol=2e-3, check_dtype=False
        )


def test_projected_factor_overflowing_fp16_is_refused_never_written_as_inf(
    trio: Trio, cli: Cli, tmp_path: Path
) -> None:
    """Ĉ B = V (Vᵀ B)/‖V‖ can exceed fp16's range: refused, never written as inf."""
    big = 60000.0
    edit_tensors(trio.base / MODEL, lambda t: t.update({f"{Q0}.weight": torch.zeros(64, 64)}))
    edit_tensors(
        trio.aligned / MODEL, lambda t: t.update({f"{Q0}.weight": torch.full((64, 64), big)})
    )
    edit_tensors(
        trio.adapter / WEIGHTS,
        lambda t: t.update({k: (v + 8 if ".lora_B" in k else v).half() for k, v in t.items()}),
    )
    out = tmp_path / "out"
    expect_error(
        run_patch(cli, trio, out, *PROJECT_ALL), ExitCode.NUMERICAL, lora_key(Q0, "lora_B"),
        "not finite in float16", output=out,
    )  # fmt: skip


# --- selection flags --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        pytest.param(["--num-layers", "15"], "--num-layers 15", id="k-above-modules"),
        pytest.param(["--num-layers", "0"], "--num-layers 0", id="k-zero"),
        pytest.param(["--num-layers", "-3"], "--num-layers -3", id="k-negative"),
        pytest.param(["--select", "threshold", "--threshold", "1.5"], "--threshold", id="t-big"),
        pytest.param(["--select", "threshold", "--threshold", "-1.01"], "--threshold", id="t-low"),
        pytest.param(["--select", "threshold", "--threshold", "nan"], "--threshold", id="t-nan"),
        pytest.param(["--select", "lowest"], "--select", id="select-mode"),
        pytest.param(["--projection", "orthogonal"], "--projection", id="projection"),
        pytest.param(["--projection", "subspace"], "--rank", id="subspace-no-rank"),
        pytest.param(["--projection", "subspace", "--rank", "0"], "--rank", id="rank-zero"),
        pytest.param(["--projection", "subspace", "--energy", "1.5"], "--energy", id="energy"),
        pytest.param(["--device", "tpu"], "--device", id="device"),
        pytest.param(["--device", "cuda:7"], "--device", id="device-missing"),
    ],
)
def test_selection_flag_out_of_range_is_a_usage_error_naming_it(
    trio: Trio, cli: Cli, tmp_path: Path, flags: list[str], named: str
) -> None:
    out = tmp_path / "out"
    expect_error(run_patch(cli, trio, out, *flags), ExitCode.USAGE, named, output=out)

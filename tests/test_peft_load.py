"""The patched folder is a working PEFT adapter: it loads with every key matched, PEFT holds the
patched values, and the model computes W x + scaling · B' A x with them.

The base model is a tiny transformers LlamaForCausalLM built from the synthetic base folder (its
config.json and model.safetensors), so nothing is downloaded.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from safelora_cli.errors import ExitCode
from tests.conftest import Trio, TrioFactory
from tests.helpers import CONFIG, PREFIX, REPORT, WEIGHTS, Cli

pytestmark = pytest.mark.slow  # imports transformers and peft: about 10 s in all

NUM_LAYERS = 5


@dataclass(frozen=True)
class Patched:
    trio: Trio
    out: Path
    projected: list[str]
    scaling: float


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32-adapter", "bf16-adapter"])
def patched(
    request: pytest.FixtureRequest, make_trio: TrioFactory, cli: Cli, tmp_path: Path
) -> Patched:
    """An fp32 base/aligned pair, an adapter in the given dtype, patched with K = NUM_LAYERS."""
    trio = make_trio(adapter_dtype=request.param, seed=11)
    out = tmp_path / "patched"
    result = cli(trio.patch_args(out, "--num-layers", str(NUM_LAYERS), "--quiet"))
    assert result.exit_code == ExitCode.OK, result.stderr
    report = json.loads((out / REPORT).read_text())
    projected = [m["module"] for m in report["modules"] if m["projected"]]
    assert len(projected) >= NUM_LAYERS
    config = json.loads((out / CONFIG).read_text())
    return Patched(trio, out, projected, config["lora_alpha"] / config["r"])


def base_model(trio: Trio) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(trio.base, dtype=torch.float32)
    return model.eval()


def load_peft(patched: Patched) -> PeftModel:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base_model(patched.trio), patched.out)
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert missing == []
    return model.eval()


def test_patched_adapter_loads_with_every_key_matched(patched: Patched) -> None:
    model = load_peft(patched)
    file_keys = set(load_file(patched.out / WEIGHTS))

    # load the same folder again as a second adapter, to see PEFT's own account of the keys
    result = model.load_adapter(patched.out, adapter_name="check")
    assert list(result.missing_keys) == []
    assert list(result.unexpected_keys) == []

    lora_params = {
        name.replace(".default.", ".")
        for name, _ in model.named_parameters()
        if ".lora_" in name and ".default." in name
    }
    assert lora_params == file_keys
    assert len(file_keys) == 2 * len(patched.trio.modules)


def test_peft_holds_the_patched_lora_b(patched: Patched) -> None:
    model = load_peft(patched)
    params = dict(model.named_parameters())
    stored = load_file(patched.out / WEIGHTS)
    original = load_file(patched.trio.adapter / WEIGHTS)
    for key, value in stored.items():
        param = params[key.replace(".weight", ".default.weight")]
        # PEFT upcasts a low-precision adapter to the model's fp32, exactly
        assert torch.equal(param.detach(), value.float()), key
    for module in patched.projected:
        key = f"{PREFIX}{module}.lora_B.weight"
        assert not torch.equal(stored[key], original[key]), f"{module} was not patched"


def test_forward_equals_base_with_hand_merged_patched_update(patched: Patched) -> None:
    model = load_peft(patched)
    stored = {k: v.double() for k, v in load_file(patched.out / WEIGHTS).items()}
    original = {k: v.double() for k, v in load_file(patched.trio.adapter / WEIGHTS).items()}

    def merged(lora: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The base model with W + scaling · B A written into every adapted weight."""
        base = base_model(patched.trio)
        with torch.no_grad():
            for module in patched.trio.modules:
                weight = base.get_submodule(module).weight
                b, a = (
                    lora[f"{PREFIX}{module}.lora_B.weight"],
                    lora[f"{PREFIX}{module}.lora_A.weight"],
                )
                weight.copy_((weight.double() + patched.scaling * b @ a).float())
        return base

    ids = torch.randint(
        0, patched.trio.shape.vocab, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = merged(stored)(input_ids=ids).logits
        unpatched = merged(original)(input_ids=ids).logits

    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # and the patch is visible at the output: the unpatched adapter gives other logits
    assert float((unpatched - want).abs().max()) > 100 * 1e-5


def test_lora_layer_computes_w_x_plus_scaled_projected_update(patched: Patched) -> None:
    model = load_peft(patched)
    stored = load_file(patched.out / WEIGHTS)
    module = patched.projected[0]
    layer = model.base_model.model.get_submodule(module)
    assert layer.scaling["default"] == pytest.approx(patched.scaling)
    w = layer.base_layer.weight.detach().double()
    b = stored[f"{PREFIX}{module}.lora_B.weight"].double()
    a = stored[f"{PREFIX}{module}.lora_A.weight"].double()
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        got = layer(x).double()
    want = x.double() @ w.T + patched.scaling * (x.double() @ a.T) @ b.T

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

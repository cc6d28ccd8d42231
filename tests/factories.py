"""Seeded factories for real-transformers base/aligned pairs and real-PEFT adapters.

``safelora_cli.synthetic`` builds Llama-shaped pairs from raw tensors; this module adds the other
architectures the PEFT variant tests need (GPT-2, whose Conv1D layers store weights (in, out), and
Phi-3, whose ``qkv_proj`` / ``gate_up_proj`` are fused), built by transformers itself, and adapters
made by PEFT's own ``get_peft_model`` + ``save_pretrained``. Nothing is downloaded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from safelora_cli.synthetic import save_model
from tests.helpers import MODEL


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def save_hf_pair(
    model: PreTrainedModel,
    root: Path,
    seed: int = 0,
    alignment_rank: int = 4,
    alignment_scale: float = 0.02,
) -> tuple[Path, Path]:
    """Save ``model`` as ``root/base`` and base + a seeded low-rank update as ``root/aligned``.

    Every matrix gets its own rank-``alignment_rank`` update (in its stored layout: rank is the
    same either way); vectors (norms, biases) are left identical. Tied weights (``lm_head`` of a
    ``tie_word_embeddings`` model) are not written, as transformers' own ``save_pretrained`` does.
    """
    gen = _generator(seed)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    base: dict[str, torch.Tensor] = {}
    aligned: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        w = tensor.detach().float().clone().contiguous()
        base[name] = w
        if w.dim() != 2:
            aligned[name] = w.clone()
            continue
        rows, cols = w.shape
        k = alignment_rank
        delta = torch.randn(rows, k, generator=gen) @ torch.randn(k, cols, generator=gen)
        aligned[name] = (w + delta * (alignment_scale / math.sqrt(k * cols))).contiguous()
    config = model.config.to_dict()
    config["torch_dtype"] = "float32"
    return save_model(root / "base", base, config), save_model(root / "aligned", aligned, config)


def _seeded_model(config: PretrainedConfig, cls: type[PreTrainedModel], seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).eval()


def gpt2_config(hidden: int = 32, layers: int = 2, heads: int = 2, vocab: int = 64) -> GPT2Config:
    """A tiny GPT-2 (Conv1D layers, weights stored (in, out); lm_head tied to wte)."""
    return GPT2Config(
        n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=32,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip


def gpt2_pair(root: Path, seed: int = 0, **shape: int) -> tuple[Path, Path]:
    """A seeded tiny GPT-2 base/aligned pair under ``root`` (safetensors + config.json)."""
    return save_hf_pair(_seeded_model(gpt2_config(**shape), GPT2LMHeadModel, seed), root, seed)


def phi3_pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A seeded tiny Phi-3 pair: fused ``qkv_proj`` and ``gate_up_proj`` linear layers."""
    config = Phi3Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, max_position_embeddings=32, pad_token_id=0,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return save_hf_pair(_seeded_model(config, Phi3ForCausalLM, seed), root, seed)


def load_base(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The transformers model saved in ``folder`` (any architecture its config.json names)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def randomize_lora(
    model: torch.nn.Module, seed: int, adapters: Iterable[str] | None = None
) -> None:
    """Give every LoRA factor seeded random values, as training would (PEFT starts B at zero).

    DoRA magnitudes get the base rows' norms times (1 + 10% noise): a trained magnitude.
    """
    gen = _generator(seed)
    names = None if adapters is None else set(adapters)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                for name, factor in getattr(module, attr).items():
                    if names is not None and name not in names:
                        continue
                    param = factor if isinstance(factor, torch.nn.Parameter) else factor.weight
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
                    if attr == "lora_B" and factor.bias is not None:
                        factor.bias.copy_(torch.randn(factor.bias.shape, generator=gen) * 0.1)
            for name, dora in module.lora_magnitude_vector.items():
                if names is None or name in names:
                    noise = 1 + 0.1 * torch.randn(dora.weight.shape, generator=gen)
                    dora.weight.copy_(dora.weight * noise)


def peft_model(base: Path, config: LoraConfig, seed: int = 1) -> Any:
    """``get_peft_model`` on the model in ``base``, with seeded non-zero LoRA factors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_base(base), config)
    randomize_lora(model, seed)
    return model.eval()


def peft_adapter(base: Path, config: LoraConfig, folder: Path, seed: int = 1) -> Path:
    """A real PEFT adapter for the model in ``base``, saved by ``save_pretrained`` in ``folder``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model(base, config, seed).save_pretrained(folder)
    return folder


def load_peft(base: Path, adapter: Path, dtype: torch.dtype = torch.float64) -> Any:
    """``PeftModel.from_pretrained`` on the model in ``base``, in ``dtype``, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base), adapter)
    return model.to(dtype).eval()


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file model folder."""
    return load_file(folder / MODEL)

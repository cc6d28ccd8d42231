"""Synthetic, seeded Llama-shaped models and LoRA adapters, for the demo, the tests and the bench.

Nothing is downloaded: a base model is random, its aligned sibling is the base plus a low-rank
"alignment" update (a few layers left identical on request), and the adapter's lora_B mixes a
component inside span(V) with noise, so cosines spread over (0, 1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_PROJ = ATTN + MLP


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of a Llama-architecture model (defaults: tiny, for tests)."""

    hidden: int = 64
    intermediate: int = 160
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 128
    tie_embeddings: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def proj_shape(self, proj: str) -> tuple[int, int]:
        """(out, in) of a projection."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {
            "q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }[proj]  # fmt: skip

    def module_name(self, layer: int, proj: str) -> str:
        block = "self_attn" if proj in ATTN else "mlp"
        return f"model.layers.{layer}.{block}.{proj}"

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab, self.hidden)
        }
        for layer in range(self.layers):
            for proj in ALL_PROJ:
                shapes[f"{self.module_name(layer, proj)}.weight"] = self.proj_shape(proj)
            shapes[f"model.layers.{layer}.input_layernorm.weight"] = (self.hidden,)
            shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (self.hidden,)
        shapes["model.norm.weight"] = (self.hidden,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes

    def hf_config(self, dtype: torch.dtype) -> dict[str, object]:
        """A transformers LlamaConfig as a dict (config.json)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "hidden_act": "silu",
        }


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def save_model(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, object] | None = None,
    shards: int = 1,
) -> Path:
    """Write tensors as ``model.safetensors`` or as ``shards`` shards with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = math.ceil(len(names) / shards)
        weight_map = {}
        for k in range(shards):
            shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[k * per : (k + 1) * per]}
            save_file(part, str(folder / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@dataclass(frozen=True)
class PairSpec:
    """How to build a base/aligned pair."""

    shape: LlamaShape = field(default_factory=LlamaShape)
    dtype: torch.dtype = torch.float32
    shards: int = 1
    seed: int = 0
    alignment_rank: int = 4
    alignment_scale: float = 0.02
    identical: tuple[str, ...] = ()  # modules whose aligned weight equals the base


def make_pair(root: Path, spec: PairSpec = PairSpec()) -> tuple[Path, Path]:
    """Build ``root/base`` and ``root/aligned``; returns their folders."""
    gen = _generator(spec.seed)
    base: dict[str, torch.Tensor] = {}
    aligned: dict[str, torch.Tensor] = {}
    for name, shape in spec.shape.weight_shapes().items():
        if len(shape) == 1:
            w = torch.ones(shape)
            base[name], aligned[name] = w.to(spec.dtype), w.to(spec.dtype)
            continue
        w = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        out, inp = shape
        k = spec.alignment_rank
        delta = torch.randn(out, k, generator=gen) @ torch.randn(k, inp, generator=gen)
        delta = delta * (spec.alignment_scale / math.sqrt(k * inp))
        if name.removesuffix(".weight") in spec.identical:
            delta.zero_()
        base[name] = w.to(spec.dtype)
        aligned[name] = (w + delta).to(spec.dtype)
    config = spec.shape.hf_config(spec.dtype)
    return (
        save_model(root / "base", base, config, spec.shards),
        save_model(root / "aligned", aligned, config, spec.shards),
    )


def adapter_config(
    modules: Iterable[str], rank: int, alpha: int, **extra: object
) -> dict[str, object]:
    """A PEFT LoraConfig as saved by ``save_pretrained``."""
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config: dict[str, object] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    config.update(extra)
    return config


def make_adapter(
    folder: Path,
    base: Path,
    aligned: Path,
    modules: Iterable[str],
    rank: int = 4,
    dtype: torch.dtype = torch.float32,
    seed: int = 1,
    key_prefix: str = "base_model.model.",
    adapter_name: str = "",
) -> Path:
    """Write a PEFT adapter whose lora_B leans towards span(V) by a different amount per module.

    Args:
        base, aligned: the pair the adapter belongs to (read to build span(V)).
        modules: base weight names without ".weight" (``lm_head`` of a tied model: its V is
            the input embedding's).
        key_prefix / adapter_name: key layout ("base_model.model." and "" as PEFT saves it).
    """
    from safetensors import safe_open

    from safelora_cli.inputs.heads import HEAD, pair_heads
    from safelora_cli.inputs.index import index_folder

    gen = _generator(seed)
    b_index, a_index = index_folder(base), index_folder(aligned)
    tensors: dict[str, torch.Tensor] = {}
    modules = list(modules)
    tied = pair_heads(b_index, a_index).tied_to
    for k, module in enumerate(modules):
        weight = tied if f"{module}.weight" == HEAD and tied is not None else f"{module}.weight"
        info_b, info_a = b_index.tensors[weight], a_index.tensors[weight]
        with safe_open(str(info_b.path), "pt") as fb, safe_open(str(info_a.path), "pt") as fa:
            v = fa.get_tensor(info_a.name).double() - fb.get_tensor(info_b.name).double()
        out, inp = v.shape
        lean = (k + 1) / (len(modules) + 1)
        inside = v @ torch.randn(inp, rank, generator=gen, dtype=torch.float64)
        inside = inside / max(float(inside.norm()), 1e-30)
        noise = torch.randn(out, rank, generator=gen, dtype=torch.float64)
        b = lean * inside + (1 - lean) * noise / float(noise.norm())
        a = torch.randn(rank, inp, generator=gen, dtype=torch.float64) / math.sqrt(inp)
        suffix = f".{adapter_name}" if adapter_name else ""
        tensors[f"{key_prefix}{module}.lora_A{suffix}.weight"] = a.to(dtype)
        tensors[f"{key_prefix}{module}.lora_B{suffix}.weight"] = b.to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = adapter_config(modules, rank, 2 * rank)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def all_modules(shape: LlamaShape, projs: Iterable[str] = ALL_PROJ) -> list[str]:
    """Every (layer, projection) module name of ``shape``."""
    return [shape.module_name(layer, p) for layer in range(shape.layers) for p in projs]


@dataclass(frozen=True)
class FineTuneSpec:
    """How to build a full fine-tune of an aligned model (``make_full_finetune``)."""

    frozen: tuple[str, ...] = ()  # weights (names without ".weight") left identical to aligned
    scale: float = 0.01  # ‖D‖_F of each changed matrix, relative to ‖W_aligned‖_F
    shards: int = 1
    dtype: torch.dtype | None = None  # None: the aligned model's
    seed: int = 2
    touch_others: bool = True  # also change norms and embeddings (not targeted by default)


def _load_model(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def make_full_finetune(
    folder: Path, base: Path, aligned: Path, spec: FineTuneSpec = FineTuneSpec()
) -> Path:
    """Write a full fine-tune of ``aligned``: D = W_ft − W_aligned leans towards span(V) by a
    different amount per matrix (so cosines spread), some weights frozen (byte-identical).

    Every 2-D weight not in ``spec.frozen`` changes; with ``touch_others`` so do the 1-D norms
    (which no projection targets). Written as ``model.safetensors`` or ``spec.shards`` shards
    with an index, with config.json (from the aligned model), generation_config.json and
    tokenizer files beside it.
    """
    gen = _generator(spec.seed)
    w_base, w_aligned = _load_model(base), _load_model(aligned)
    matrices = [n for n, w in w_aligned.items() if w.dim() == 2]
    tensors: dict[str, torch.Tensor] = {}
    for name, w in w_aligned.items():
        dtype = spec.dtype or w.dtype
        module = name.removesuffix(".weight")
        if module in spec.frozen or (w.dim() != 2 and not spec.touch_others):
            tensors[name] = w.to(dtype)
            continue
        w64 = w.double()
        noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        delta = noise / float(noise.norm())
        v = w64 - w_base[name].double()
        if w.dim() == 2 and float(v.norm()) > 0:
            lean = (matrices.index(name) + 1) / (len(matrices) + 1)
            delta = lean * v / float(v.norm()) + (1 - lean) * delta
        tensors[name] = (w64 + delta * (spec.scale * float(w64.norm()) / float(delta.norm()))).to(
            dtype
        )
    config = json.loads((aligned / "config.json").read_text())
    if spec.dtype is not None:
        config["torch_dtype"] = str(spec.dtype).removeprefix("torch.")
    save_model(folder, tensors, config, spec.shards)
    sidecars = {
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 8},
        "tokenizer_config.json": {"model_max_length": 256, "tokenizer_class": "LlamaTokenizer"},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
    }
    for name, value in sidecars.items():
        (folder / name).write_text(json.dumps(value, indent=2))
    return folder

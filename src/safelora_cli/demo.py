"""``make demo``: build a small seeded base/aligned/adapter trio and patch it with the real CLI.

Usage: python -m safelora_cli.demo [FOLDER]   (default ./demo)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from safelora_cli.synthetic import LlamaShape, PairSpec, all_modules, make_adapter, make_pair


def build(root: Path) -> tuple[Path, Path, Path]:
    """Build root/base, root/aligned (bf16, 3 shards with an index) and root/adapter."""
    shape = LlamaShape(hidden=128, intermediate=344, layers=4, heads=8, kv_heads=4, vocab=512)
    spec = PairSpec(shape=shape, dtype=torch.bfloat16, shards=3, seed=0,
                    identical=("model.layers.3.self_attn.k_proj",))  # fmt: skip
    base, aligned = make_pair(root, spec)
    modules = all_modules(shape, ("q_proj", "k_proj", "v_proj", "o_proj"))
    adapter = make_adapter(root / "adapter", base, aligned, modules, rank=8, dtype=torch.bfloat16)
    return base, aligned, adapter


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "demo")
    if root.exists():
        shutil.rmtree(root)
    base, aligned, adapter = build(root)
    print(f"built {base}, {aligned} and {adapter}", file=sys.stderr)
    from safelora_cli.cli import app

    args = ["patch", str(adapter), "--base", str(base), "--aligned", str(aligned),
            "--output", str(root / "adapter-safe"), "--num-layers", "4"]  # fmt: skip
    print("$ safelora " + " ".join(args), file=sys.stderr)
    app(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

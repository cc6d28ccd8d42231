"""Fine-tune a LoRA with Safe LoRA watching every checkpoint (``SafeLoraCallback``).

At each checkpoint the callback scores the adapter through an alignment profile, writes
``safelora_report.json`` into the checkpoint folder and logs ``safelora/min_cosine``,
``safelora/mean_cosine`` and ``safelora/would_project`` with the loss (to W&B, TensorBoard or
MLflow with ``--report-to``); training stops when more than ``--stop-if-projected`` modules would be
projected, and the patched adapter of the final model is written to ``--patch-at-end``.

    pip install 'safelora[transformers]'

    # anywhere, in seconds: a tiny random Llama pair and its profile, built in ./tiny
    python examples/train_with_callback.py --tiny ./tiny

    # a real model: the aligned model you fine-tune, its profile (safelora profile), your text
    python examples/train_with_callback.py --model meta-llama/Llama-2-7b-chat-hf \\
        --profile llama-2-7b-chat.safetensors --data train.txt --output-dir ./run \\
        --max-steps 1000 --save-steps 100 --threshold 0.35 --stop-if-projected 8

Exit code: 0, or 1 when the gate stopped training.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)

from safelora_cli import Settings
from safelora_cli.integrations.transformers import SafeLoraCallback


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--tiny",
        type=Path,
        metavar="DIR",
        help="build a tiny random Llama pair and its profile in DIR; train it",
    )
    source.add_argument("--model", help="the aligned model to fine-tune (hub id or folder)")
    parser.add_argument("--profile", type=Path, help="its alignment profile")
    parser.add_argument("--base", help="or the model pair: the base model ...")
    parser.add_argument("--aligned", help="... and the aligned one (default: --model)")
    parser.add_argument("--data", type=Path, help="training text, one example per line")
    parser.add_argument("--output-dir", type=Path, help="checkpoints (default: DIR/run)")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0, help="the LoRA's init, data order, dropout")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.35,
        help="a module would be projected when its cosine is at most this",
    )
    parser.add_argument(
        "--stop-if-projected",
        type=int,
        metavar="N",
        help="stop training when more than N modules would be projected",
    )
    parser.add_argument(
        "--patch-at-end",
        type=Path,
        metavar="DIR",
        help="write the patched final adapter here (default: OUTPUT_DIR/final-safe)",
    )
    parser.add_argument("--report-to", default="none", help="none, wandb, tensorboard, mlflow")
    args = parser.parse_args(argv)
    if args.model and args.profile is None and args.base is None:
        parser.error("--model needs --profile FILE, or --base REF (with --aligned)")
    if args.model and args.data is None:
        parser.error("--model needs --data FILE")
    return args


def tiny_setup(folder: Path) -> tuple[str, Path]:
    """A tiny seeded Llama pair (random weights, aligned = base + a low-rank update) and its
    profile, made with the CLI as you would for a real pair; returns (aligned model, profile)."""
    from safelora_cli.synthetic import LlamaShape, PairSpec, make_pair

    shape = LlamaShape(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64)
    base, aligned = make_pair(folder, PairSpec(shape=shape, alignment_scale=0.5))
    profile = folder / "profile.safetensors"
    if not profile.exists():
        subprocess.run(
            [sys.executable, "-m", "safelora_cli", "profile", "--base", str(base),
             "--aligned", str(aligned), "--output", str(profile), "--rank", "4", "--quiet"],
            check=True,
        )  # fmt: skip
    return str(aligned), profile


def random_tokens(vocab: int, n: int = 32, length: int = 16) -> list[dict[str, torch.Tensor]]:
    """Token ids to train the tiny model on (it has no tokenizer)."""
    ids = torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def text_dataset(tokenizer: Any, path: Path, max_length: int = 512) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [tokenizer(line, truncation=True, max_length=max_length) for line in lines]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny is not None:
        model_ref, profile = tiny_setup(args.tiny)
        output_dir = args.output_dir or args.tiny / "run"
    else:
        model_ref, profile = args.model, args.profile
        output_dir = args.output_dir or Path("run")
    set_seed(args.seed)  # the LoRA's random init: the Trainer seeds only after it is made
    aligned_model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
    model = get_peft_model(aligned_model, lora)

    collator = None
    if args.tiny is not None:
        data = random_tokens(model.config.vocab_size)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_ref)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        data = text_dataset(tokenizer, args.data)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    callback = SafeLoraCallback(
        profile=profile if args.base is None else None,
        base=args.base,
        aligned=(args.aligned or model_ref) if args.base is not None else None,
        settings=Settings(select="threshold", threshold=args.threshold),
        stop_if_projected=args.stop_if_projected,
        patch_at_end=args.patch_at_end or output_dir / "final-safe",
    )
    training = TrainingArguments(
        output_dir=str(output_dir), max_steps=args.max_steps, save_steps=args.save_steps,
        logging_steps=1, learning_rate=args.learning_rate, per_device_train_batch_size=4,
        report_to=args.report_to, seed=args.seed, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=training, train_dataset=data, data_collator=collator,
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()

    for scored in callback.scores:
        metrics = ", ".join(
            f"{k.removeprefix('safelora/')} {v:.4g}" for k, v in scored.metrics.items()
        )
        print(f"step {scored.step}: {metrics} ({scored.folder})")
    if callback.patched is not None:
        print(f"patched final adapter: {callback.patched.output}")
    stopped = trainer.state.global_step < args.max_steps
    if stopped:
        print(f"stopped at step {trainer.state.global_step}: too many modules would be projected")
    return 1 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())

"""``SafeLoraCallback`` in a real ``transformers.Trainer``: a tiny seeded Llama with a PEFT LoRA on
q_proj/v_proj, trained 4 steps on CPU with a checkpoint every 2, scored through a profile and
through the model pair; reports in the checkpoints, metrics in the Trainer's log, the gate that
stops training, and the patched adapter of the final model, loaded back in PEFT.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from safelora_cli.errors import FilesystemError, UsageError
from safelora_cli.integrations.transformers import METRICS, SafeLoraCallback, checkpoint_metrics
from safelora_cli.output.published import published_report
from safelora_cli.settings import Settings
from tests.factories import load_base, randomize_lora, save_hf_pair
from tests.helpers import REPORT, WEIGHTS, invoke, read_tensors

pytestmark = pytest.mark.slow
STEPS, SAVE_EVERY = 4, 2
LORA_MODULES = 4  # 2 layers x (q_proj, v_proj)
PROJECT_ALL = Settings(select="threshold", threshold=1.0)  # every scored module is selected


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama")
    base, aligned = save_hf_pair(tiny_llama(), root, alignment_scale=0.5)
    return base, aligned


@pytest.fixture(scope="module")
def profile(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "tiny.safetensors"
    base, aligned = pair
    args = ["profile", "--base", str(base), "--aligned", str(aligned), "--output", str(path)]
    result = invoke([*args, "--rank", "4", "--quiet"])
    assert result.exit_code == 0, result.stderr
    return path


def dataset(n: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (n, length), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


class Recorder(TrainerCallback):
    """A reporter standing in for W&B/TensorBoard: what each ``on_log`` was given."""

    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        self.logged.append(dict(logs or {}))


def train(
    aligned: Path, out: Path, callback: SafeLoraCallback, recorder: Recorder | None = None
) -> Trainer:
    """Fine-tune a LoRA on the aligned model (as Safe LoRA assumes) with the callback."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            load_base(aligned),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        )
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, save_steps=SAVE_EVERY, logging_steps=1,
        per_device_train_batch_size=4, learning_rate=5e-2, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    callbacks = [recorder, callback] if recorder is not None else [callback]
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def safelora_logs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if any(k.startswith("safelora/") for k in e)]


def test_profile_scores_every_checkpoint_logs_and_patches_at_end(
    pair: tuple[Path, Path], profile: Path, tmp_path: Path
) -> None:
    _, aligned = pair
    final = tmp_path / "final-safe"
    callback = SafeLoraCallback(profile=profile, settings=Settings(num_layers=2),
                                patch_at_end=final)  # fmt: skip
    recorder = Recorder()
    trainer = train(aligned, tmp_path / "run", callback, recorder)

    steps = [SAVE_EVERY, 2 * SAVE_EVERY]
    assert [s.step for s in callback.scores] == steps
    for score in callback.scores:
        assert score.folder == tmp_path / "run" / f"checkpoint-{score.step}"
        written = (score.folder / REPORT).read_text()
        report = json.loads(written)
        assert report == published_report(score.report)  # no local path: checkpoints are pushed
        assert str(tmp_path) not in written
        assert report["inputs"]["profile"]  # scored through the profile, not a pair
        assert report["warnings"] == []
        assert report["summary"]["modules"] == LORA_MODULES
        assert report["summary"]["projected"] == 2
        cosines = [m["cosine"] for m in report["modules"]]
        assert all(c is not None for c in cosines)
        assert score.metrics == {
            "safelora/min_cosine": min(cosines),
            "safelora/mean_cosine": pytest.approx(sum(cosines) / len(cosines)),
            "safelora/would_project": 2,
        }
    # the two checkpoints hold different adapters: the drift is a curve, not a constant
    assert callback.scores[0].metrics != callback.scores[1].metrics

    history = safelora_logs(trainer.state.log_history)
    assert [e["step"] for e in history] == steps
    assert [{k: e[k] for k in METRICS} for e in history] == [s.metrics for s in callback.scores]
    # every other callback (the reporters) got the metrics through the Trainer's log
    assert [{k: e[k] for k in METRICS} for e in safelora_logs(recorder.logged)] == [
        s.metrics for s in callback.scores
    ]

    assert callback.patched is not None
    assert callback.patched.output == final
    patched = json.loads((final / REPORT).read_text())
    projected = {m["module"] for m in patched["modules"] if m["projected"]}
    assert len(projected) == 2
    trained = {
        name.replace(".default", ""): p.detach()
        for name, p in trainer.model.named_parameters()
        if "lora_" in name
    }
    written = read_tensors(final)
    assert set(written) == set(trained)
    for name, tensor in written.items():
        module = name.removeprefix("base_model.model.").split(".lora_")[0]
        changed = not torch.equal(tensor, trained[name])
        assert changed == (module in projected and ".lora_B" in name), name

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(load_base(aligned), final)
    params = {n.replace(".default", ""): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert all(torch.equal(params[name], tensor) for name, tensor in written.items())


def test_pair_scores_each_checkpoint_and_stops_training_when_over_the_gate(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    base, aligned = pair
    callback = SafeLoraCallback(base=base, aligned=aligned, settings=PROJECT_ALL,
                                stop_if_projected=LORA_MODULES - 1)  # fmt: skip
    trainer = train(aligned, tmp_path / "run", callback)

    assert trainer.state.global_step == SAVE_EVERY  # stopped at the first checkpoint
    assert [s.step for s in callback.scores] == [SAVE_EVERY]
    report = json.loads((tmp_path / "run" / f"checkpoint-{SAVE_EVERY}" / REPORT).read_text())
    assert report["inputs"]["base"]
    assert report["inputs"]["aligned"]
    assert report["summary"]["projected"] == LORA_MODULES
    assert not (tmp_path / "run" / f"checkpoint-{2 * SAVE_EVERY}").exists()
    [logged] = safelora_logs(trainer.state.log_history)
    assert logged["safelora/would_project"] == LORA_MODULES


def test_pair_within_the_gate_trains_to_the_end(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, aligned = pair
    callback = SafeLoraCallback(base=base, aligned=aligned, settings=PROJECT_ALL,
                                stop_if_projected=LORA_MODULES)  # fmt: skip
    trainer = train(aligned, tmp_path / "run", callback)
    assert trainer.state.global_step == STEPS
    assert [s.step for s in callback.scores] == [SAVE_EVERY, STEPS]
    for step in (SAVE_EVERY, STEPS):
        assert (tmp_path / "run" / f"checkpoint-{step}" / REPORT).is_file()


def test_patch_at_end_that_cannot_be_written_is_refused_before_the_first_step(
    profile: Path, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    final = tmp_path / "taken"
    final.mkdir()
    (final / "notes.txt").write_text("someone else's")
    callback = SafeLoraCallback(profile=profile, settings=PROJECT_ALL, patch_at_end=final)
    with pytest.raises(FilesystemError, match="exists and is not empty"):
        train(pair[1], tmp_path / "run", callback)
    assert callback.scores == []
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    assert (final / "notes.txt").read_text() == "someone else's"


def test_a_model_that_is_not_peft_is_refused_at_train_begin(profile: Path, tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    callback = SafeLoraCallback(profile=profile)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=dataset(), callbacks=[callback])
    with pytest.raises(UsageError, match="not a PEFT model"):
        trainer.train()


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({}, "needs profile"),
        ({"base": "b"}, "needs profile"),
        ({"profile": "p", "aligned": "a"}, "both given"),
        ({"profile": "p", "stop_if_projected": -1}, "negative"),
    ],
)
def test_callback_arguments_are_checked(kwargs: dict[str, Any], phrase: str) -> None:
    with pytest.raises(UsageError, match=phrase):
        SafeLoraCallback(**kwargs)


def test_a_number_mode_gate_warns_that_it_compares_a_constant() -> None:
    with pytest.warns(UserWarning, match="select='threshold'"):
        SafeLoraCallback(profile="p", stop_if_projected=3)


def test_metrics_leave_out_cosines_when_every_module_was_skipped() -> None:
    report = {
        "modules": [{"cosine": None}, {"cosine": None}],
        "summary": {"projected": 0},
    }
    assert checkpoint_metrics(report) == {"safelora/would_project": 0}


def test_importing_the_package_never_imports_transformers() -> None:
    code = (
        "import sys, safelora_cli, safelora_cli.api, safelora_cli.cli; "
        "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_checkpoint_folders_hold_what_the_callback_scored(
    pair: tuple[Path, Path], profile: Path, tmp_path: Path
) -> None:
    """The adapter scored is the checkpoint's own file (not a copy of the live model)."""
    callback = SafeLoraCallback(profile=profile, settings=PROJECT_ALL)
    train(pair[1], tmp_path / "run", callback)
    for score in callback.scores:
        assert (score.folder / WEIGHTS).is_file()
        assert score.report["inputs"]["adapter"]["path"].endswith(f"checkpoint-{score.step}")


def test_without_a_trainer_the_metrics_go_to_log_history(
    pair: tuple[Path, Path], profile: Path, tmp_path: Path
) -> None:
    """A loop that calls the callbacks itself (no Trainer up the stack): the checkpoint is still
    scored, and the metrics land in ``state.log_history``."""
    _, aligned = pair
    checkpoint = tmp_path / "checkpoint-3"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_base(aligned), LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_lora(model, seed=5)
    model.save_pretrained(checkpoint)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, control = TrainerState(global_step=3), TrainerControl()
    callback = SafeLoraCallback(profile=profile, settings=PROJECT_ALL, stop_if_projected=1)

    callback.on_train_begin(args, state, control, model=model)
    callback.on_save(args, state, control, model=model)

    [scored] = callback.scores
    assert state.log_history == [{**scored.metrics, "step": 3}]
    assert scored.metrics["safelora/would_project"] == 2  # q_proj of 2 layers
    assert json.loads((checkpoint / REPORT).read_text()) == published_report(scored.report)
    assert control.should_training_stop  # 2 > 1

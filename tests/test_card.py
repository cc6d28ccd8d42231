"""The model card: Hub front matter over the input card's metadata, what safelora did, and the
input card's text byte for byte; untrusted input cards end in a valid card and a warning."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from typer.testing import Result

from safelora_cli.output.card import (
    MAX_CARD_BYTES,
    MAX_EXPANDED,
    MAX_FRONT_MATTER,
    build_card,
    read_card,
)
from safelora_cli.output.card_section import BEGIN, END, strip_sections
from tests.conftest import Trio
from tests.reports import make_report, model_input

Cli = Callable[..., Result]
ARGV = ["safelora", "patch", "runs/my-lora", "--base", "meta-llama/Llama-2-7b-hf",
        "--aligned", "meta-llama/Llama-2-7b-chat-hf", "--output", "runs/my-lora-safe"]  # fmt: skip
PEFT_CARD = """---
base_model: /tmp/train/Llama-2-7b-chat-hf
library_name: peft
license: llama2
tags:
- base_model:adapter:/tmp/train/Llama-2-7b-chat-hf
- lora
- transformers
pipeline_tag: text-generation
model-index:
- name: my-lora
  results:
  - task: {type: text-generation}
    dataset: {name: Harmless, type: harmless, custom_field: kept}
    metrics: [{type: refusal, value: 0.93}]
---

# Model Card for my-lora

Fine-tuned on *benign* data.\r\nA line with CRLF, a tab\tand “unicode”.
"""


def front_matter(text: str) -> dict[str, Any]:
    """The metadata as the Hub reads it: its own regex, then a safe YAML load."""
    match = REGEX_YAML_BLOCK.search(text)
    assert match is not None
    data = yaml.safe_load(match.group(2))
    assert isinstance(data, dict)
    return data


def body_of(card: str) -> str:
    """The card's text after safelora's section (where the input card's text goes)."""
    return card.split("<!-- safelora: end -->", 1)[1]


def test_front_matter_has_the_hub_keys_and_keeps_the_input_metadata() -> None:
    card = build_card(PEFT_CARD.encode(), make_report(), "adapter", ARGV)
    data = front_matter(card.text)
    assert data["base_model"] == "meta-llama/Llama-2-7b-chat-hf"  # the aligned model
    assert data["library_name"] == "peft"
    # PEFT's adapter tag follows base_model: the trainer's local path is gone
    assert data["tags"] == ["base_model:adapter:meta-llama/Llama-2-7b-chat-hf", "lora",
                            "transformers", "safelora"]  # fmt: skip
    assert "/tmp/" not in card.text
    original = front_matter(PEFT_CARD)
    assert data["model-index"] == original["model-index"]  # unknown fields and all
    assert list(data)[:4] == ["base_model", "library_name", "license", "tags"]  # order kept
    assert data["pipeline_tag"] == "text-generation"
    assert data == card.metadata
    assert ModelCard(card.text).data.library_name == "peft"  # huggingface_hub reads it back
    assert card.warnings == (
        "the input card's base_model /tmp/train/Llama-2-7b-chat-hf was replaced by the aligned "
        "model meta-llama/Llama-2-7b-chat-hf",
    )


def test_input_card_text_is_kept_byte_for_byte() -> None:
    original = PEFT_CARD.encode()
    card = build_card(b"\xef\xbb\xbf" + original, make_report(), "adapter", ARGV)  # with a BOM
    text_after_front_matter = original[REGEX_YAML_BLOCK.search(PEFT_CARD).end() :]  # type: ignore[union-attr]
    assert card.text.encode().endswith(b"\n" + text_after_front_matter)
    assert body_of(card.text).encode() == b"\n\n" + text_after_front_matter
    crlf = PEFT_CARD.replace("\n", "\r\n").replace("\r\r", "\r").encode()  # a Windows card
    card = build_card(crlf, make_report(), "adapter", ARGV)
    assert card.text.encode().endswith(crlf[REGEX_YAML_BLOCK.search(crlf.decode()).end() :])  # type: ignore[union-attr]
    assert card.text.count("\r\n") == card.text.count("\n")  # one line ending throughout
    assert front_matter(card.text)["license"] == "llama2"
    plain = b"No front matter here.\n\n---\n\nA rule, then more text without a final newline"
    card = build_card(plain, make_report(), "adapter", ARGV)
    assert body_of(card.text).encode() == b"\n\n" + plain


def test_what_was_done_names_method_settings_modules_command_and_versions() -> None:
    report = make_report(layers=2, num_layers=3)
    card = build_card(None, report, "adapter", ARGV)
    section = card.text.split("<!-- safelora: begin -->")[1].split("<!-- safelora: end -->")[0]
    assert "Safe LoRA" in section
    assert "arxiv.org/abs/2405.16833" in section
    assert "paper: Ĉ = V Vᵀ / ‖V‖_F" in section
    assert "number: the 3 lowest cosines" in section
    assert "3 of 14 modules projected, 0 skipped" in section
    for module in report["modules"]:
        listed = re.search(rf"^{re.escape(module['module'])}\s+\S+$", section, re.MULTILINE)
        assert (listed is not None) == module["projected"], module["module"]
    # local paths by folder name (runs/my-lora is the adapter's ref), hub ids as given
    assert ("safelora patch my-lora --base meta-llama/Llama-2-7b-hf --aligned "
            "meta-llama/Llama-2-7b-chat-hf --output my-lora-safe") in section  # fmt: skip
    assert "safelora 0.1.0" in section
    assert "commit `" + "a" * 40 + "`" in section  # the aligned model's snapshot
    assert "commit `" + "b" * 40 + "`" in section
    assert "/cache/" not in section  # refs as typed, never resolved local paths
    assert card.text.endswith("<!-- safelora: end -->\n")  # no input card: nothing after
    assert "\n---\n# my\\-lora\\-safe\n\n<!-- safelora: begin -->" in card.text  # a title


@pytest.mark.parametrize(
    ("kind", "library"), [("full", "transformers"), ("merged", "transformers")]
)
def test_full_and_merged_models_are_transformers_models(kind: str, library: str) -> None:
    original = PEFT_CARD.replace("pipeline_tag", "base_model_relation: adapter\npipeline_tag")
    card = build_card(original, make_report(), kind, ARGV)
    data = front_matter(card.text)
    assert data["library_name"] == library
    assert data["base_model_relation"] == "finetune"  # no longer an adapter of base_model
    assert data["tags"] == ["transformers", "safelora"]  # PEFT's adapter-only tags are gone
    with pytest.raises(ValueError, match="kind"):
        build_card(None, make_report(), "lora", ARGV)


def test_base_model_from_a_cached_snapshot_or_left_out_for_a_local_folder() -> None:
    report = make_report()
    snapshot = "/home/u/.cache/huggingface/hub/models--org--chat/snapshots/" + "c" * 40
    report["inputs"]["aligned"] = model_input("chat-local") | {"path": snapshot}
    assert front_matter(build_card(None, report, "adapter", ARGV).text)["base_model"] == "org/chat"
    report["inputs"]["aligned"] = model_input("./models/chat")
    card = build_card(PEFT_CARD, report, "adapter", ARGV)
    assert "base_model" not in front_matter(card.text)  # a local path is not a hub id
    assert any("is not a hub id: left out" in w for w in card.warnings)
    card = build_card("---\nbase_model: org/chat\n---\ntext\n", report, "adapter", ARGV)
    assert front_matter(card.text)["base_model"] == "org/chat"  # the input card's hub id stays
    assert card.warnings == ()


BROKEN_FRONT_MATTER = {
    "not YAML": "---\nlicense: [mit\n---\n# Card\n",
    "a list": "---\n- a\n- b\n---\n# Card\n",
    "a scalar": "---\njust text\n---\n# Card\n",
    "too deep": "---\na: " + "[" * 20_000 + "]" * 20_000 + "\n---\n# Card\n",
    "a bad date": "---\ndate: 2024-13-45\n---\n# Card\n",
    "a huge integer": "---\nn: " + "9" * 10_000 + "\n---\n# Card\n",
    "python tags": "---\nx: !!python/object/apply:os.system ['echo owned']\n---\n# Card\n",
    "too large": "---\nnote: '" + "x" * MAX_FRONT_MATTER + "'\n---\n# Card\n",
}


@pytest.mark.parametrize("original", BROKEN_FRONT_MATTER.values(), ids=BROKEN_FRONT_MATTER)
def test_broken_front_matter_is_kept_as_text_under_fresh_metadata(original: str) -> None:
    card = build_card(original.encode(), make_report(), "adapter", ARGV)
    data = front_matter(card.text)
    assert data == {"base_model": "meta-llama/Llama-2-7b-chat-hf", "library_name": "peft",
                    "tags": ["safelora"]}  # fmt: skip
    assert body_of(card.text) == "\n\n" + original  # the whole input, as it was
    assert len(card.warnings) == 1
    assert "kept as text, the card's metadata written fresh" in card.warnings[0]


def test_odd_but_valid_metadata_survives_the_round_trip() -> None:
    original = (
        "---\nbomb: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: [*b, *b, *b, *b, *b, *b, *b, *b]\nloop: &l [*l]\nset: !!set {p, q}\n"
        "when: &d 2024-01-01\nagain: *d\n1: numeric key\ntags: {not: a list}\n"
        'quote: "a\\n---\\nb"\n---\nbody\n'
    )
    card = build_card(original, make_report(), "adapter", ARGV)
    data = front_matter(card.text)
    block = REGEX_YAML_BLOCK.search(card.text).group(2)  # type: ignore[union-attr]
    assert not re.search(r"(^|[\s\[{,])[&*]\w", block)  # no anchor, no alias: each value in full
    assert data["c"] == [[["x"] * 10] * 8] * 8  # a small alias tree is expanded
    assert data["again"] == data["when"]
    assert data["set"] == {"p", "q"}
    assert "loop" not in data  # a value that contains itself cannot be written out
    assert data["quote"] == "a\n---\nb"  # a "---" inside a value does not end the block
    assert data["tags"] == ["safelora"]
    assert card.warnings == (
        "the front matter key loop of the input's README.md refers to itself (a YAML alias "
        "loop): left out of the model card",
        "the input card's tags are not a list of strings: replaced by [safelora]",
    )
    assert body_of(card.text) == "\n\nbody\n"


def test_an_alias_bomb_is_left_out_quickly_and_the_rest_is_kept() -> None:
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    original = "---\nlicense: mit\n" + "\n".join(levels) + "\n---\n# Card\n"  # 9^10 leaves
    card = build_card(original, make_report(), "adapter", ARGV)
    data = front_matter(card.text)
    assert data["license"] == "mit"
    assert len(card.text) < 2 * MAX_EXPANDED  # expanded within the cap, never beyond
    assert "a9" not in data
    assert not re.search(r"(^|[\s\[{,])[&*]a\d", card.text)
    dropped = [w for w in card.warnings if "expands past 256 KiB (YAML anchors and aliases)" in w]
    assert dropped  # each key that does not fit is named in a warning
    assert all(w.endswith("left out of the model card") for w in dropped)
    assert ModelCard(card.text).data.license == "mit"


def test_undecodable_and_oversized_cards() -> None:
    latin1 = "---\nlicense: mit\n---\nCafé crème\n".encode("latin-1")
    card = build_card(latin1, make_report(), "adapter", ARGV)
    assert front_matter(card.text)["license"] == "mit"
    assert body_of(card.text) == "\n\nCaf\ufffd cr\ufffdme\n"
    assert "not valid UTF-8" in card.warnings[0]
    utf16 = "---\nlicense: mit\n---\nCafé\n".encode("utf-16")
    card = build_card(utf16, make_report(), "adapter", ARGV)
    assert body_of(card.text) == "\n\nCafé\n"
    assert card.warnings == ("the input's README.md is UTF-16: converted to UTF-8",)
    huge = b"---\nlicense: mit\n---\n" + b"x" * MAX_CARD_BYTES
    card = build_card(huge, make_report(), "adapter", ARGV)
    assert "license" not in front_matter(card.text)
    assert len(card.text) < 10_000
    assert "larger than 8 MiB" in card.warnings[0]


def test_hostile_values_cannot_break_out_of_the_markdown() -> None:
    report = make_report(names=["model.layers.0.q\x1b]0;owned\x07", "model.layers.1.`x`<img>"],
                         num_layers=2)  # fmt: skip
    report["inputs"]["adapter"]["ref"] = "runs/a ``` b\nINJECTED"
    report["inputs"]["adapter"]["path"] = "/tmp/runs/a ``` b\nINJECTED"
    argv = ["safelora", "patch", "a\nb", "--output", "````"]
    card = build_card(None, report, "adapter", argv)
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", card.text)
    assert "\nINJECTED" not in card.text
    assert "`````sh\nsafelora patch 'a\\x0ab' --output '````'\n`````" in card.text
    assert "````a ``` b\\x0aINJECTED````" in card.text  # a code span longer than its runs


def test_card_of_a_real_run(trio: Trio, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli(trio.patch_args(out, "--num-layers", "3", "--quiet"))
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "safelora_report.json").read_text())
    card = build_card(None, report, "adapter", trio.patch_args(out))
    data = front_matter(card.text)
    assert "base_model" not in data  # local folders: no hub id to name
    assert data["library_name"] == "peft"
    projected = [m["module"] for m in report["modules"] if m["projected"]]
    assert len(projected) == 3
    assert all(f"\n{name} " in card.text for name in projected)


# --- one safelora section per card --------------------------------------------------------------


@pytest.mark.parametrize(
    "original",
    [None, PEFT_CARD, PEFT_CARD.replace("\n", "\r\n").replace("\r\r", "\r"), "plain text\n"],
    ids=["none", "peft", "crlf", "no-front-matter"],
)
def test_a_card_written_over_its_own_card_is_the_same_card(original: str | None) -> None:
    report = make_report()
    card = build_card(original, report, "adapter", ARGV)
    again = build_card(card.text, report, "adapter", ARGV)
    assert again.text == card.text  # the earlier section (and title) replaced, nothing stacked
    assert again.text.count(BEGIN) == again.text.count(END) == 1


def test_re_patching_replaces_the_section_and_keeps_the_input_text() -> None:
    first = build_card(PEFT_CARD, make_report(num_layers=2), "adapter", ARGV)
    second = build_card(first.text, make_report(num_layers=5), "merged", ARGV)
    assert second.text.count(BEGIN) == second.text.count(END) == 1
    assert "number: the 5 lowest cosines" in second.text
    assert "number: the 2 lowest cosines" not in second.text  # the stale section is gone
    assert body_of(second.text) == body_of(first.text)  # the input card's text, byte for byte
    section = first.text[first.text.index(BEGIN) : first.text.index(END) + len(END)]
    stacked = first.text.replace(section, f"{section}\n\n# old-title\n\n{section}")
    third = build_card(stacked, make_report(), "adapter", ARGV)  # what older versions wrote
    assert third.text.count(BEGIN) == 1
    assert "old-title" not in third.text
    assert body_of(third.text) == body_of(first.text)


def test_a_module_named_like_a_marker_cannot_end_the_section_early() -> None:
    names = ["model.layers.0.<!-- safelora: end -->", "model.layers.1.<!-- safelora: begin -->"]
    report = make_report(names=names, num_layers=2)
    card = build_card(PEFT_CARD, report, "adapter", ARGV)
    assert card.text.count(END) == card.text.count(BEGIN) == 1
    assert build_card(card.text, report, "adapter", ARGV).text == card.text


def test_removing_sections_is_linear_in_the_card() -> None:
    unclosed = "x" + BEGIN * 200_000  # a quadratic scan would not finish
    assert strip_sections(unclosed) == unclosed
    assert strip_sections(("t" + BEGIN + "y" + END) * 50_000) == "t" * 50_000
    assert strip_sections("text only\n") == "text only\n"


# --- reading the input card ---------------------------------------------------------------------


def test_read_card_reads_a_regular_file_and_caps_its_size(tmp_path: Path) -> None:
    assert read_card(tmp_path, tmp_path.resolve()) == (None, [])
    (tmp_path / "README.md").write_bytes(b"x" * (MAX_CARD_BYTES + 100))
    data, warnings = read_card(tmp_path, tmp_path.resolve())
    assert data is not None
    assert len(data) == MAX_CARD_BYTES + 1  # enough for build_card to see it is too large
    assert warnings == []


def test_read_card_refuses_links_out_of_the_folder_and_special_files(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "README.md").symlink_to(secret)
    inside = adapter.resolve()
    data, warnings = read_card(adapter, inside)
    assert data is None
    assert "leads outside its folder" in warnings[0]
    (adapter / "README.md").unlink()
    (adapter / "README.md").symlink_to(adapter / "README.md")
    assert "symbolic links" in read_card(adapter, inside)[1][0]  # a loop
    (adapter / "README.md").unlink()
    os.mkfifo(adapter / "README.md")  # would block a plain open() for ever
    data, warnings = read_card(adapter, inside)
    assert data is None
    assert "not a regular file" in warnings[0]


def test_read_card_follows_a_hub_snapshot_link_into_its_own_blobs(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--lora"
    blob = repo / "blobs" / ("d" * 64)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"# cached card\n")
    snapshot = repo / "snapshots" / ("e" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").symlink_to(Path("../../blobs") / blob.name)
    assert read_card(snapshot, repo.resolve()) == (b"# cached card\n", [])
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    shutil.move(blob, other / blob.name)
    (snapshot / "README.md").unlink()
    (snapshot / "README.md").symlink_to(other / blob.name)  # another repo's blob: refused
    assert read_card(snapshot, repo.resolve())[0] is None


@pytest.mark.slow
def test_peft_loads_a_patched_adapter_whose_readme_is_the_card(cli: Cli, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file

    from safelora_cli.synthetic import PairSpec, make_pair
    from tests.factories import load_peft, peft_adapter

    base, aligned = make_pair(tmp_path / "pair", PairSpec(seed=7))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = peft_adapter(aligned, config, tmp_path / "adapter")
    peft_card = (adapter / "README.md").read_bytes()  # PEFT's own card, from save_pretrained
    out = tmp_path / "out"
    args = ["patch", str(adapter), "--base", str(base), "--aligned", str(aligned)]
    result = cli([*args, "--output", str(out), "--num-layers", "2", "--quiet"])
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "safelora_report.json").read_text())
    original, warnings = read_card(adapter, adapter.resolve())
    assert original == peft_card
    assert warnings == []
    written = (out / "README.md").read_bytes()  # safelora's card, with PEFT's text under it
    # the command line as it was run, local paths by folder name
    command = ["safelora", "patch", "adapter", "--base", "base", "--aligned", "aligned",
               "--output", "out", "--num-layers", "2", "--quiet"]  # fmt: skip
    assert shlex.join(command) in written.decode()
    assert str(tmp_path) not in written.decode()
    assert report["summary"]["projected"] >= 2

    loaded = ModelCard.load(out / "README.md")
    assert loaded.data.library_name == "peft"
    assert "safelora" in loaded.data.tags
    peft_text = peft_card.decode()[REGEX_YAML_BLOCK.search(peft_card.decode()).end() :]  # type: ignore[union-attr]
    assert (out / "README.md").read_bytes().endswith(peft_text.encode())
    model = load_peft(aligned, out, dtype=torch.float32)
    saved = load_file(out / "adapter_model.safetensors")
    state = model.state_dict()
    for key, tensor in saved.items():
        peft_key = key.replace(".weight", ".default.weight")
        assert state[peft_key].equal(tensor), key  # PEFT holds the patched factors

"""Model card: the output folder's README.md, for the Hugging Face Hub and for colleagues.

The card has Hugging Face front matter (``base_model``: the aligned model; ``library_name``:
``peft`` for an adapter, ``transformers`` for a full or merged model; the ``safelora`` tag) over
the input card's metadata, then a short section saying what safelora did, then the input card's
text, unchanged. The input card is untrusted: whatever it holds (not UTF-8, front matter that is
not YAML or not a mapping, a YAML bomb, megabytes of text) ends in a valid card and a warning
string for the caller, never an exception or a hang.

``build_card`` is a pure function of plain data (the card's bytes or text, the report dict, the
command line). ``read_card`` reads an input folder's README.md under the same rules as the other
files copied from it: regular files only, never through a symlink that leads out of the folder
(or, for a hub snapshot, out of its cached repository), and at most ``MAX_CARD_BYTES``.
"""

from __future__ import annotations

import codecs
import os
import re
import shlex
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from safelora_cli import __version__
from safelora_cli.provenance import is_hub_id, ref_from_input
from safelora_cli.untrusted import printable

CARD_NAME = "README.md"
MAX_CARD_BYTES = 8 * 2**20  # a larger card is not carried over (Hub READMEs are kilobytes)
MAX_FRONT_MATTER = 256 * 2**10  # YAML larger than this is kept as text, not parsed
MAX_LISTED = 64  # projected modules listed by name in the card
KINDS = {"adapter": "peft", "full": "transformers", "merged": "transformers"}
TAG = "safelora"
BEGIN, END = "<!-- safelora: begin -->", "<!-- safelora: end -->"

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclass(frozen=True)
class Card:
    """The card to write, the metadata in its front matter, and what the caller should warn about.

    Write ``text`` as UTF-8 bytes, without newline translation (``path.write_bytes(
    card.text.encode())``): the input card's text is then kept byte for byte.
    """

    text: str
    metadata: dict[str, Any]
    warnings: tuple[str, ...]


def build_card(
    original: str | bytes | None,
    report: Mapping[str, Any],
    kind: str,
    command: Sequence[str] | str,
) -> Card:
    """The output's README.md: front matter, what safelora did, then the input card's text.

    Args:
        original: the input card (``read_card``'s bytes, or text), or None when there is none.
        report: the run's report (README.md, "Report").
        kind: "adapter", "full" (a patched full fine-tune) or "merged" (an adapter merged into
            the aligned model).
        command: the command line, as argv or one string.
    Returns:
        The card. Its warnings say what could not be carried over from the input card.
    Example:
        >>> card = build_card(None, report, "adapter", ["safelora", "patch", "my-lora", ...])
        >>> Path("out/README.md").write_bytes(card.text.encode())
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {sorted(KINDS)}")
    warnings: list[str] = []
    text = _decode(original, warnings)
    metadata, body = _split(text, warnings)
    metadata = _metadata(metadata, report, kind, warnings)
    newline = "\r\n" if "\r\n" in body else "\n"  # the input card's line ending
    front = yaml.dump(
        metadata, Dumper=_Dumper, sort_keys=False, allow_unicode=True, line_break=newline
    )
    section = newline.join(["---", *_section(report, kind, command), ""])
    separator = newline if body else ""
    return Card(f"---{newline}{front}{section}{separator}{body}", metadata, tuple(warnings))


def read_card(folder: Path) -> tuple[bytes | None, list[str]]:
    """The README.md of an input folder, or None; and warnings for a card that was not read.

    Reads only a regular file that lives inside ``folder`` (or, for a hub snapshot, inside its
    cached repository, whose files are symlinks to blobs), and at most ``MAX_CARD_BYTES + 1``
    bytes: ``build_card`` recognises a larger card from the length and leaves it out.
    """
    path = folder / CARD_NAME
    if not path.is_symlink() and not path.exists():
        return None, []
    where = printable(path, limit=200)
    target = path.resolve()
    roots = [folder.resolve(), *_cache_repo(folder.resolve())]
    if not any(target.is_relative_to(root) for root in roots):
        return None, [f"{where} leads outside its folder (a symlink): not used in the model card"]
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                return None, [f"{where} is not a regular file: not used in the model card"]
            return file.read(MAX_CARD_BYTES + 1), []
    except OSError as exc:
        return None, [f"{where} cannot be read ({exc.strerror}): not used in the model card"]


def _cache_repo(folder: Path) -> list[Path]:
    # .../models--org--name/snapshots/<commit>: its files link to ../../blobs/<hash>
    for parent in folder.parents:
        if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
            return [parent.parent]
    return []


def _decode(original: str | bytes | None, warnings: list[str]) -> str:
    if original is None:
        return ""
    if len(original) > MAX_CARD_BYTES:
        warnings.append(
            f"the input's {CARD_NAME} is larger than {MAX_CARD_BYTES // 2**20} MiB: "
            "left out of the model card"
        )
        return ""
    if isinstance(original, str):
        return original.removeprefix("\ufeff")
    if original.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        warnings.append(f"the input's {CARD_NAME} is UTF-16: converted to UTF-8")
        return original.decode("utf-16", errors="replace").removeprefix("\ufeff")
    try:
        return original.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        warnings.append(
            f"the input's {CARD_NAME} is not valid UTF-8 (first bad byte at offset {exc.start}): "
            "undecodable bytes were replaced by U+FFFD"
        )
        return original.decode("utf-8-sig", errors="replace")


def _split(text: str, warnings: list[str]) -> tuple[dict[str, Any], str]:
    """The card's metadata and its text, as the Hub splits them (its own regex)."""
    match = REGEX_YAML_BLOCK.search(text)
    if match is None:
        return {}, text
    block = match.group(2)
    problem = None
    if len(block) > MAX_FRONT_MATTER:
        problem = f"is larger than {MAX_FRONT_MATTER // 2**10} KiB"
    else:
        try:
            data = yaml.load(block, Loader=_Loader)  # noqa: S506 (a safe loader)
        except (yaml.YAMLError, RecursionError, ValueError, TypeError, OverflowError) as exc:
            # untrusted YAML: a syntax error, nesting past the parser's limit, a date or an
            # integer out of range all mean "not metadata we can use"
            problem = f"is not valid YAML ({printable(exc, limit=120)})"
        else:
            if data is None:
                return {}, text[match.end() :]
            if isinstance(data, dict):
                return data, text[match.end() :]
            problem = f"is a {type(data).__name__}, not a mapping"
    warnings.append(
        f"the front matter of the input's {CARD_NAME} {problem}: kept as text, "
        "the card's metadata written fresh"
    )
    return {}, text


def _metadata(
    original: dict[str, Any], report: Mapping[str, Any], kind: str, warnings: list[str]
) -> dict[str, Any]:
    """The input card's metadata, in its order, with safelora's keys set."""
    base_model = _base_model(original.get("base_model"), report, warnings)
    ours = ModelCardData(
        base_model=base_model, library_name=KINDS[kind], tags=_tags(original.get("tags"), warnings)
    ).to_dict()  # type: ignore[no-untyped-call]
    merged = dict(original)  # its keys keep their places; new ones go last
    if "base_model" not in ours:
        merged.pop("base_model", None)
    merged.update(ours)
    if "base_model_relation" in original:
        # an adapter's relation ("adapter") would be wrong for the merged model
        merged["base_model_relation"] = "adapter" if kind == "adapter" else "finetune"
    return merged


def _tags(value: Any, warnings: list[str]) -> list[str]:
    if value is None:
        tags: list[Any] = []
    elif isinstance(value, str):
        tags = [value]
    elif isinstance(value, list) and all(isinstance(t, (str, int, float)) for t in value):
        tags = [str(t) for t in value]
    else:
        warnings.append(f"the input card's tags are not a list of strings: replaced by [{TAG}]")
        tags = []
    return [*tags, TAG] if TAG not in tags else tags


def _base_model(value: Any, report: Mapping[str, Any], warnings: list[str]) -> Any:
    """The aligned model's hub id; else what of the input card's base_model is a hub id."""
    aligned = _aligned(report)
    hub_id = ref_from_input(aligned).hub_id if aligned is not None else None
    if hub_id is not None:
        if value is not None and str(value).casefold() != hub_id.casefold():
            warnings.append(
                f"the input card's base_model {printable(value, 120)} was replaced by the "
                f"aligned model {printable(hub_id, 120)}"
            )
        return hub_id
    given = value if isinstance(value, list) else [] if value is None else [value]
    kept = [v for v in given if isinstance(v, str) and is_hub_id(v)]
    if len(kept) < len(given):
        warnings.append(
            f"the input card's base_model {printable(value, 120)} is not a hub id: left out "
            "(the aligned model is a local folder: add its hub id before publishing)"
        )
    return kept if isinstance(value, list) else (kept[0] if kept else None)


def _aligned(report: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The report's entry for the aligned model (for a profile run: the profile's pair)."""
    inputs = report.get("inputs")
    inputs = inputs if isinstance(inputs, Mapping) else {}
    profile = inputs.get("profile")
    pair = profile.get("pair") if isinstance(profile, Mapping) else None
    for holder in (inputs, profile, pair):
        if isinstance(holder, Mapping) and isinstance(holder.get("aligned"), Mapping):
            found: Mapping[str, Any] = holder["aligned"]
            return found
    return None


def _section(report: Mapping[str, Any], kind: str, command: Sequence[str] | str) -> list[str]:
    """What safelora did, in Markdown; every untrusted value inside code spans or blocks."""
    tool = report.get("tool")
    version = tool.get("version") if isinstance(tool, Mapping) else None
    version = printable(version or __version__, 40)
    lines = [BEGIN, "## Safe LoRA", "", _WHAT[kind].format(version=version), ""]
    lines += [f"- **{label}**: {value}" for label, value in _facts(report)]
    modules = [m for m in report.get("modules") or [] if isinstance(m, Mapping)]
    projected = [m for m in modules if m.get("projected") is True]
    if projected:
        lines += ["", "Projected modules (cosine before projection):", ""]
        lines += _fenced(_module_lines(projected), "text")
    else:
        lines += ["", "No module was projected."]
    found = [w for w in report.get("warnings") or [] if isinstance(w, (Mapping, str))]
    if found:
        messages = [w.get("message", "") if isinstance(w, Mapping) else w for w in found]
        lines += ["", "Warnings:", ""]
        lines += _fenced([printable(m, 1000) for m in messages], "text")
    argv = command if isinstance(command, str) else shlex.join(command)
    lines += ["", "Command:", "", *_fenced([printable(argv, 4000)], "sh")]
    lines += ["", "Every module's scores are in the run's report (`safelora_report.json`).", END]
    return lines


_PAPER = (
    "Safe LoRA (Hsu et al., NeurIPS 2024, [arXiv:2405.16833](https://arxiv.org/abs/2405.16833))"
)
_WHAT = {
    "adapter": "This adapter was patched with safelora {version}, an implementation of "
    + _PAPER
    + ". For every adapted module, the LoRA update B A was compared with the alignment direction "
    "of the model pair below (V = W_aligned - W_base); for the modules least aligned with it, "
    "lora_B was replaced by its projection. lora_A, the scaling and every other tensor are "
    "unchanged. Use it with the aligned model.",
    "full": "This model is a full fine-tune of the aligned model below, patched with safelora "
    "{version}, an implementation of " + _PAPER + ". For every targeted weight, the update "
    "D = W - W_aligned was compared with the alignment direction of the model pair below "
    "(V = W_aligned - W_base); the weights least aligned with it were replaced by "
    "W_aligned + P D. Every other tensor is unchanged.",
    "merged": "This model is the aligned model below with a LoRA adapter merged in "
    "(W = W_aligned + s B' A), after the adapter was patched with safelora {version}, an "
    "implementation of " + _PAPER + ": for the adapted modules least aligned with the alignment "
    "direction of the model pair (V = W_aligned - W_base), lora_B was replaced by its projection.",
}


def _facts(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    settings = report.get("settings")
    settings = settings if isinstance(settings, Mapping) else {}
    summary = report.get("summary")
    summary = summary if isinstance(summary, Mapping) else {}
    facts = [("Projection", _projection(settings)), ("Selection", _selection(settings, summary))]
    facts.append(("Result", f"{_num(summary.get('projected'))} of {_num(summary.get('modules'))} "
                  f"modules projected, {_num(summary.get('skipped'))} skipped"))  # fmt: skip
    inputs = report.get("inputs")
    for role, entry in inputs.items() if isinstance(inputs, Mapping) else []:
        if isinstance(entry, Mapping):
            label = _ROLES.get(role) or printable(role, 40).capitalize()
            facts.append((label, _input(entry)))
    return facts


_ROLES = {
    "base": "Base model",
    "aligned": "Aligned model",
    "adapter": "Adapter",
    "finetune": "Fine-tuned model",
    "model": "Fine-tuned model",
    "profile": "Profile",
}


def _projection(settings: Mapping[str, Any]) -> str:
    if settings.get("projection") == "subspace":
        if settings.get("rank") is not None:
            cut = f"the top {_num(settings['rank'])}"
        else:
            cut = f"the top singular vectors covering {_num(settings.get('energy'))} of ‖V‖²"
        return f"subspace: orthogonal projection onto {cut} left singular vectors of V"
    return "paper: Ĉ = V Vᵀ / ‖V‖_F, as in the paper and its official code"


def _selection(settings: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    if settings.get("select") == "threshold":
        text = f"threshold: every module with cosine ≤ {_num(settings.get('threshold'))}"
    else:
        text = f"number: the {_num(settings.get('num_layers'))} lowest cosines (ties included)"
    cut = summary.get("threshold_used")
    return text + (f"; cut used {_num(cut)}" if cut is not None else "")


def _input(entry: Mapping[str, Any]) -> str:
    """A report ``inputs`` entry as typed (never its resolved local path), with its version."""
    parts = [_code(entry.get("ref") or entry.get("path") or "?")]
    if entry.get("hub_id"):
        if entry["hub_id"] != entry.get("ref"):
            parts.append(f"hub {_code(entry['hub_id'])}")
        if entry.get("revision"):
            parts.append(f"revision {_code(entry['revision'])}")
    if entry.get("commit"):
        parts.append(f"commit {_code(entry['commit'])}")
    if entry.get("sha256"):
        parts.append(f"sha256 {_code(entry['sha256'])}")
    return ", ".join(parts)


def _module_lines(modules: list[Mapping[str, Any]]) -> list[str]:
    names = [printable(m.get("module"), 100) for m in modules[:MAX_LISTED]]
    width = max(map(len, names))
    lines = [f"{n:<{width}}  {_num(m.get('cosine'))}" for n, m in zip(names, modules, strict=False)]
    if len(modules) > MAX_LISTED:
        lines.append(f"... and {len(modules) - MAX_LISTED} more")
    return lines


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "?" if value is not None else "-"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _code(value: Any) -> str:
    """A Markdown code span holding ``value`` literally, whatever backticks it contains."""
    text = printable(value, 200)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _fenced(lines: list[str], info: str) -> list[str]:
    """A fenced code block that no line inside can close."""
    longest = max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, *lines, fence]

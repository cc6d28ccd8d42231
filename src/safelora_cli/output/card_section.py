"""The model card's own section: what safelora did, in Markdown, from the report.

Every value that comes from the inputs (refs, module names, the command line) is escaped
(``untrusted.printable``) and put in a code span or a fenced block longer than any run of
backticks inside it, so no input can close it, start a link or inject HTML.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from safelora_cli.untrusted import printable
from safelora_cli.version import __version__

BEGIN, END = "<!-- safelora: begin -->", "<!-- safelora: end -->"
MAX_LISTED = 64  # projected modules listed by name; the report has them all


def heading(report: Mapping[str, Any]) -> str:
    """A level-1 Markdown heading naming the output folder, for a card written from scratch."""
    output = report.get("output")
    name = re.split(r"[\\/]", str(output).rstrip("/\\"))[-1] if output else "Patched model"
    # backslash-escape ASCII punctuation: the name stays text, never a link or HTML
    return "# " + re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", printable(name or "Patched model", 100))


def section_lines(report: Mapping[str, Any], kind: str, command: Sequence[str] | str) -> list[str]:
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
    lines += ["", "Every module's scores are in the run's report (`safelora_report.json`)."]
    # no value inside may read as a marker: the section must end where strip_sections sees it end
    return [BEGIN, *(line.replace("<!--", "&lt;!--") for line in lines[1:]), END]


def strip_sections(body: str) -> str:
    """The card text without the safelora sections an earlier run put in it, so that patching a
    patched adapter gives a card with one section. A section is removed with the line endings
    ``build_card`` wrote after it, and the title it gave a card of its own, so the text of the
    card it was written over comes back byte for byte. Linear in the text's length.
    """
    pieces: list[str] = []
    pos, text_before = 0, False
    while (start := body.find(BEGIN, pos)) >= 0 and (end := body.find(END, start)) >= 0:
        before = body[pos:start]
        if not text_before and _title_only(before):
            before = ""  # nothing but the title an earlier run wrote comes before it
        text_before = text_before or bool(before.strip())
        pieces.append(before)
        pos = end + len(END)
        for _ in range(2):  # END's line ending, and the blank line before the text
            pos += 2 if body.startswith("\r\n", pos) else 1 if body.startswith("\n", pos) else 0
    if not pieces:
        return body
    return "".join(pieces) + body[pos:]


def _title_only(text: str) -> bool:
    """Whether ``text`` is blank, or one Markdown heading line (the title ``heading`` wrote)."""
    line = text.strip()
    return not line or (line.startswith("#") and "\n" not in line and "\r" not in line)


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

"""JUnit XML: a run's reports as the test report CI systems display per case (``--junit FILE``).

One ``<testsuite>`` per report (an adapter, or a full fine-tune's model), one ``<testcase>`` per
module: ``classname`` is its layer ("model.layers.3"), ``name`` the module type
("self_attn.q_proj"). A module that is projected (by ``score``: would be) is a ``<failure>`` whose
message gives its cosine and the cut; a skipped module is ``<skipped>`` with the reason. The
inputs, settings and summary are the suite's ``<properties>``. The shape is the Ant/Jenkins
JUnit format that GitLab, Jenkins, Azure and GitHub's test-report actions read.

Built from the report dicts alone (plain values, no torch). Names in a report come from input
files: every string goes through ``untrusted.printable``, so no control character (which XML 1.0
cannot hold) reaches the file; ElementTree escapes the markup characters.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safelora_cli.errors import UsageError
from safelora_cli.output.atomic import write_text
from safelora_cli.output.target import check_target, resolve_named
from safelora_cli.untrusted import printable

MAX_TEXT = 4096
"""A longer string (a pathological tensor name) is shortened in the middle."""
_LAYER = re.compile(r"(?P<layer>.*?\.\d+)\.(?P<rest>.+)")


def split_module(module: str) -> tuple[str, str]:
    """A module's (classname, name): its layer and the module type within it.

    Example:
        >>> split_module("model.layers.3.self_attn.q_proj")
        ('model.layers.3', 'self_attn.q_proj')
        >>> split_module("lm_head")
        ('lm_head', 'lm_head')
    """
    match = _LAYER.fullmatch(module)
    if match is not None:
        return match["layer"], match["rest"]
    head, _, leaf = module.rpartition(".")
    return (head or leaf), leaf


def _text(value: Any) -> str:
    """A value as attribute or element text: strings as they are (made safe), the rest as JSON."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return printable(text, MAX_TEXT)


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _properties(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The suite's properties: tool, kind, every input (its ref, commit, digest), every setting,
    the output and the summary."""
    tool = report.get("tool") or {}
    found: list[tuple[str, Any]] = [
        ("tool.version", tool.get("version")),
        ("kind", report.get("kind", "adapter")),
    ]
    for role, entry in (report.get("inputs") or {}).items():
        if not isinstance(entry, Mapping):
            continue
        found.append((f"inputs.{role}", entry.get("ref") or entry.get("path")))
        for key in ("hub_id", "revision", "commit", "sha256"):
            if entry.get(key) is not None:
                found.append((f"inputs.{role}.{key}", entry[key]))
    found += [(f"settings.{key}", value) for key, value in (report.get("settings") or {}).items()]
    found.append(("output", report.get("output")))
    found += [(f"summary.{key}", value) for key, value in (report.get("summary") or {}).items()]
    return [(name, _text(value)) for name, value in found]


def _verdict(report: Mapping[str, Any]) -> str:
    """How the suite says a selected module's fate: projected, or would be (``score``)."""
    return "would be projected" if report.get("output") is None else "projected"


def _rule(report: Mapping[str, Any]) -> str:
    settings = report.get("settings") or {}
    if settings.get("select") == "threshold":
        return f"threshold mode, T={_text(settings.get('threshold'))}"
    return f"number mode, the K={_text(settings.get('num_layers'))} lowest cosines"


def _failure(case: ET.Element, report: Mapping[str, Any], module: Mapping[str, Any]) -> None:
    cut = (report.get("summary") or {}).get("threshold_used")
    bound = module.get("cosine_bound")
    within = f" ± {_number(bound)}" if bound is not None else ""
    message = (
        f"cosine {_number(module.get('cosine'))}{within} <= cut {_number(cut)}: "
        f"{_verdict(report)} ({_rule(report)})"
    )
    failure = ET.SubElement(case, "failure", message=message, type="safelora.projected")
    lines = [
        f"module: {_text(module.get('module'))}",
        f"weight: {_text(module.get('weight'))}",
        f"cosine: {_number(module.get('cosine'), 6)}",
        f"cut (threshold used): {_number(cut, 6)}",
        f"||V||_F: {_number(module.get('v_norm'), 6)}",
        f"norm of the update before: {_number(module.get('b_norm_before'), 6)}",
        f"norm of the update after: {_number(module.get('b_norm_after'), 6)}",
    ]
    if bound is not None:
        lines.append(f"cosine bound (profile): {_number(bound, 6)}")
    failure.text = "\n".join(lines)


def suite(report: Mapping[str, Any]) -> ET.Element:
    """One report as a ``<testsuite>`` element (see the module docstring)."""
    modules = [m for m in report.get("modules") or [] if isinstance(m, Mapping)]
    inputs = report.get("inputs") or {}
    subject = next(
        (
            entry.get("ref") or entry.get("path")
            for role in ("adapter", "model")
            if isinstance(entry := inputs.get(role), Mapping)
        ),
        "(unknown)",
    )
    failures = sum(m.get("projected") is True for m in modules)
    skipped = sum(m.get("projected") is not True and m.get("skipped") is not None for m in modules)
    element = ET.Element(
        "testsuite",
        name=f"safelora: {_text(subject)}",
        tests=str(len(modules)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
        time="0",
    )
    properties = ET.SubElement(element, "properties")
    for name, value in _properties(report):
        ET.SubElement(properties, "property", name=name, value=value)
    for module in modules:
        classname, name = split_module(str(module.get("module")))
        case = ET.SubElement(
            element, "testcase", classname=_text(classname), name=_text(name), time="0"
        )
        if module.get("projected") is True:
            _failure(case, report, module)
        elif module.get("skipped") is not None:
            ET.SubElement(case, "skipped", message=_text(module["skipped"]))
    return element


def render_junit(reports: Sequence[Mapping[str, Any]]) -> str:
    """The reports of one run as a JUnit XML document (``<testsuites>``, a suite per report)."""
    suites = [suite(report) for report in reports]
    root = ET.Element(
        "testsuites",
        name="safelora",
        tests=str(sum(int(s.get("tests", "0")) for s in suites)),
        failures=str(sum(int(s.get("failures", "0")) for s in suites)),
        errors="0",
        skipped=str(sum(int(s.get("skipped", "0")) for s in suites)),
        time="0",
    )
    root.extend(suites)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(path: Path, reports: Sequence[Mapping[str, Any]]) -> None:
    """Write the JUnit XML of ``reports`` to ``path``, atomically."""
    write_text(path, render_junit(reports), "--junit")


def check_junit_path(
    path: Path,
    *,
    inputs: Sequence[Path],
    output: Path | None,
    force: bool,
    others: Mapping[str, Path | None] | None = None,
) -> None:
    """Refuse a ``--junit`` path before any work: the output-target policy
    (``target.check_target``), and, as for ``--report``, not inside the output folder nor the
    same file as another output.

    Args:
        path: the file to write.
        inputs: local input folders or files it must not be, nor be inside.
        output: the run's output folder, if any: the file must be outside it.
        force: replace an existing regular file.
        others: other files the run writes ("--report" -> path): it must be none of them.
    Raises:
        UsageError: inside the output folder, or the same file as another output.
        FilesystemError: what ``check_target`` refuses (a symlink, folder, device, FIFO or
            socket; inside an input; an existing file without ``force``; no writable parent).
    """
    resolved = resolve_named(path, "--junit")
    if output is not None:
        target = output.resolve()
        if resolved == target or target in resolved.parents:
            raise UsageError(
                f"--junit {path}: is inside the output folder {output}", "give a path outside it"
            )
    for flag, other in (others or {}).items():
        if other is not None and other.resolve() == resolved:
            raise UsageError(f"--junit {path}: is also the {flag} file", "give another path")
    check_target(path, "--junit", force=force, inputs=[i.resolve() for i in inputs])

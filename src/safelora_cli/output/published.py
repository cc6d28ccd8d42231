"""What published files say of local paths: folder names, never absolute paths.

The files inside an output folder (the model card and the report) are meant to be pushed to the
Hub, and a profile is shared with everyone who patches with it. None of them may carry the
absolute paths of the machine that wrote them: home folders, temporary folders, the
huggingface_hub cache. So, in a published file:

- a local input is named by its folder (or file) name, in ``ref`` and ``path`` alike;
- a folder inside the huggingface_hub cache (``.../models--org--name/snapshots/<commit>``) is
  named by its hub id, with ``hub_id`` and ``commit`` set;
- an input resolved on the hub keeps its hub id, revision and commit (``path``: the hub id);
- free text (warning messages and their values) has each input's path and ref as given replaced
  by its public name, and any other absolute path by its last part;
- the command line shows every argument that names a local path by its public name.

The report on stdout (``--json``) and a ``--report`` outside the output folder stay on the user's
machine and keep the full paths. Every function here is idempotent: a published report published
again is unchanged, so an older profile's absolute paths are cleaned wherever they are shown.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safelora_cli.inputs.modelref import hub_cache_location, is_hub_id
from safelora_cli.untrusted import ELLIPSIS

_STOP = r"\s'\"`,;:()\[\]{}<>|"
Scrub = Callable[[str], str]
"""Rewrites free text with no absolute path in it (``scrubber``)."""
_ABSOLUTE = re.compile(rf"(?<![\w.~/:\\-])(?:/[^/{_STOP}]+){{2,}}/?")
"""An absolute POSIX path of two parts or more, as it stands in a message."""


def public_name(path: str) -> str:
    """The name a published file gives a local path: its hub id (and the part below its
    snapshot) inside the huggingface_hub cache, else its last part.

    Example:
        >>> public_name("/home/me/.cache/huggingface/hub/models--org--chat/snapshots/" + "a" * 40)
        'org/chat'
        >>> public_name("/tmp/tmpx1/my-lora/")
        'my-lora'
    """
    cached = hub_cache_location(path)
    if cached is not None and cached.hub_id is not None and cached.commit is not None:
        return cached.hub_id + (f"/{cached.subfolder}" if cached.subfolder else "")
    parts = [part for part in re.split(r"[\\/]+", path) if part]
    return parts[-1] if parts else path


def public_input(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A report ``inputs`` entry (``ResolvedInput.describe()``, or a profile's record of its
    model pair) as a published file writes it: no absolute path."""
    public = dict(entry)
    path, ref, hub_id = entry.get("path"), entry.get("ref"), entry.get("hub_id")
    where = path if isinstance(path, str) else ref if isinstance(ref, str) else None
    cached = hub_cache_location(where) if where is not None else None
    if hub_id is None and cached is not None and cached.commit and not cached.subfolder:
        # a snapshot given as a folder: it is that hub id at that commit
        hub_id = cached.hub_id
        public.update(hub_id=hub_id, commit=entry.get("commit") or cached.commit, ref=hub_id)
        ref = hub_id
    if isinstance(path, str):
        public["path"] = public_name(path) if hub_id is None or cached else hub_id
    # a ref is a hub id when resolved on the hub, or (a record without a path) written as one
    hub_ref = isinstance(ref, str) and _hub_ref(ref) and (hub_id is not None or path is None)
    if isinstance(ref, str) and not hub_ref:
        public["ref"] = public["path"] if isinstance(path, str) else public_name(ref)
    pair = entry.get("pair")  # a profile's record holds the pair it was made from
    if isinstance(pair, Mapping):
        public["pair"] = {
            role: public_input(e) if isinstance(e, Mapping) else e for role, e in pair.items()
        }
    return public


def public_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Each entry of a report's (or a profile's) ``inputs`` through ``public_input``."""
    return {role: public_input(e) if isinstance(e, Mapping) else e for role, e in inputs.items()}


def published_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report as written inside the output folder: a copy with inputs named by folder name,
    the output by its name, and no absolute path in its warnings."""
    public = copy.deepcopy(dict(report))
    scrub = scrubber(report)
    inputs = report.get("inputs")
    if isinstance(inputs, Mapping):
        public["inputs"] = public_inputs(inputs)
    if isinstance(report.get("output"), str):
        public["output"] = public_name(report["output"])
    if isinstance(report.get("warnings"), list):
        public["warnings"] = _scrubbed(public["warnings"], scrub)
    return public


def published_command(command: Sequence[str] | str, report: Mapping[str, Any]) -> list[str] | str:
    """The command line as the model card shows it: every argument naming a local path (an
    input, the output, ``--report``, ``--config``...) by its public name."""
    scrub = scrubber(report)
    if isinstance(command, str):
        return scrub(command)
    shown = list(command[:1])
    for arg in command[1:]:
        flag, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if arg.startswith("-") and not equals:
            shown.append(arg)
        else:
            shown.append(flag + equals + _argument(value, scrub))
    return shown


def scrubber(report: Mapping[str, Any]) -> Scrub:
    """A function that rewrites free text with no absolute path: the report's inputs and output
    by their public names, any other absolute path by its last part."""
    names: dict[str, str] = {}
    entries = _entries(report.get("inputs"))
    for entry in entries:
        public = public_input(entry)
        for key in ("path", "ref"):
            given = entry.get(key)
            if isinstance(given, str) and given != public.get(key):
                for form in _forms(given):
                    names[form] = str(public.get(key))
    output = report.get("output")
    if isinstance(output, str):
        for form in _forms(output):
            names[form] = public_name(output)
    known = sorted((n for n in names if len(n) > 1), key=len, reverse=True)
    pattern = (
        re.compile(rf"(?<![^{_STOP}])(?:{'|'.join(map(re.escape, known))})(?![^/\\{_STOP}])")
        if known
        else None
    )

    def other(match: re.Match[str]) -> str:
        path = match.group(0)
        head, shortened, tail = path.partition(ELLIPSIS)
        if shortened:  # printable() kept the start and the end of a long path
            for known_path in known:  # the longest first
                if known_path.startswith(head) and (rest := _rest(known_path, tail)) is not None:
                    return names[known_path] + rest
        return public_name(path)

    def scrub(text: str) -> str:
        if pattern is not None:
            text = pattern.sub(lambda m: names[m.group(0)], text)
        return _ABSOLUTE.sub(other, text)

    return scrub


def _rest(path: str, tail: str) -> str | None:
    """What follows ``path`` in a text that ends with ``tail`` (the end of ``path``, then maybe
    a part below it: ``/README.md``), or None when ``tail`` is not the end of ``path``."""
    cuts = [len(tail)] + [i for i, c in enumerate(tail) if c in "/\\" and i > 0]
    for cut in cuts:
        if path.endswith(tail[:cut]):
            return tail[cut:]
    return None


def _argument(value: str, scrub: Scrub) -> str:
    """One argument of the command line: a local path by its public name, else as typed."""
    try:
        local = Path(value).expanduser()
        exists = value != "" and local.exists()
    except (OSError, ValueError, RuntimeError):  # too long, NUL, no home folder
        exists = False
    if exists:
        return public_name(str(local.resolve()))
    if value.startswith(("/", "~", "./", "../")) or ("/" in value and not _hub_ref(value)):
        return public_name(value)
    return scrub(value)


def _forms(path: str) -> set[str]:
    """The ways a path may stand in a message: as given, expanded, resolved."""
    forms = {path, path.rstrip("/\\")}
    try:
        expanded = os.path.expanduser(path)
        forms |= {expanded, os.path.abspath(expanded), os.path.realpath(expanded)}
    except (OSError, ValueError, RuntimeError):
        pass
    return {form for form in forms if form and form not in (".", "..")}


def _entries(value: Any) -> list[Mapping[str, Any]]:
    """Every inputs entry in a report's ``inputs``, the profile's pair included."""
    found: list[Mapping[str, Any]] = []
    if isinstance(value, Mapping):
        for entry in value.values():
            if isinstance(entry, Mapping):
                found.append(entry)
                found += _entries(entry.get("pair"))
    return found


def _hub_ref(ref: str) -> bool:
    """Whether ``ref`` is written as a hub id (``org/name[@revision]``), not a path."""
    repo = ref.split("@", 1)[0]
    return "/" in repo and is_hub_id(repo)


def _scrubbed(value: Any, scrub: Scrub) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [_scrubbed(v, scrub) for v in value]
    if isinstance(value, dict):
        return {k: _scrubbed(v, scrub) for k, v in value.items()}
    return value

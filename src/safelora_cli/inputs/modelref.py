"""Model references: what a REF or a recorded model name says about the model it names.

References are compared as the hub and its cache see them: a hub id by id (case-insensitive)
and commit, a local folder by its resolved path, and a folder inside the huggingface_hub cache
(``.../models--org--name/snapshots/<commit>``) as that hub id at that commit. When only names
can be compared (a hub id against a local folder, or the path an adapter was trained from on
another machine), equal names count as the same model: mirrors such as
``NousResearch/Llama-2-7b-chat-hf`` of ``meta-llama/Llama-2-7b-chat-hf`` are the usual case.
Nothing here reads a file or goes to the network; ``parse_ref`` only resolves local paths.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class ModelRef:
    """What a model reference says about the model: hub id and commit, or a resolved path."""

    given: str
    hub_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    path: str | None = None
    subfolder: str | None = None

    @property
    def name(self) -> str:
        """The model's own name: the repo name, or the folder name (lower case)."""
        if self.hub_id is not None:
            return self.hub_id.rsplit("/", 1)[-1].casefold()
        parts = _parts(self.path or self.given)
        return parts[-1].casefold() if parts else ""

    @property
    def pin(self) -> str | None:
        """The exact commit, when known (a resolved snapshot, or a revision that is a sha)."""
        if self.commit:
            return self.commit
        return self.revision if self.revision and COMMIT.fullmatch(self.revision) else None


class Match(enum.Enum):
    """How two references relate."""

    SAME = "same"  # same hub id and commit (or no commit to tell), or same resolved path
    OTHER_REVISION = "other revision"  # same hub id, two different commits
    SAME_NAME = "same name"  # only the names can be compared, and they are equal
    DIFFERENT = "different"


def hub_cache_location(path: str | PurePath) -> ModelRef | None:
    """The hub id and commit of a path inside the huggingface_hub cache, or None.

    Example:
        >>> ref = hub_cache_location("/hub/models--meta-llama--Llama-2-7b-hf/snapshots/" + "a" * 40)
        >>> ref.hub_id, ref.commit
        ('meta-llama/Llama-2-7b-hf', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')
    """
    parts = _parts(str(path))
    for i, part in enumerate(parts):
        if not part.startswith("models--"):
            continue
        hub_id = _valid_repo_id(part.removeprefix("models--").replace("--", "/"))
        if hub_id is None:
            return None
        rest = parts[i + 1 :]
        commit = rest[1] if len(rest) >= 2 and rest[0] == "snapshots" else None
        if commit is not None and not COMMIT.fullmatch(commit):
            return None
        sub = "/".join(rest[2:]) if commit is not None and len(rest) > 2 else None
        return ModelRef(str(path), hub_id=hub_id, commit=commit, path=str(path), subfolder=sub)
    return None


def parse_ref(text: str, revision: str | None = None) -> ModelRef:
    """A reference as written by a user or a training script (``base_model_name_or_path``).

    An existing folder is local (resolved); ``org/name[@rev]`` is a hub id; any other path-like
    string (absolute, ``./``, ``~``: a folder on the machine that trained the adapter) keeps its
    normalised text, and a cache snapshot path in it still names its hub id and commit.
    """
    local = Path(text).expanduser()
    if local.is_dir():
        resolved = str(local.resolve())
        cached = hub_cache_location(resolved)
        return _replace(cached, text) if cached else ModelRef(text, path=resolved)
    cached = hub_cache_location(text)
    if cached is not None:
        return _replace(cached, text)
    repo, _, rev = text.partition("@")
    if is_hub_id(repo):
        return ModelRef(text, hub_id=repo, revision=rev or revision)
    return ModelRef(text, path=os.path.normpath(str(local)))


def ref_from_input(entry: Mapping[str, Any]) -> ModelRef:
    """A report ``inputs`` entry (``ResolvedInput.describe()``) as a ModelRef."""
    given = str(entry.get("ref") or entry.get("path") or "")
    path = entry.get("path")
    hub_id = entry.get("hub_id")
    if hub_id is None and path is not None:
        cached = hub_cache_location(str(path))
        if cached is not None:
            return _replace(cached, given)
    return ModelRef(given, hub_id=hub_id, revision=entry.get("revision"),
                    commit=entry.get("commit"), path=path)  # fmt: skip


def compare(a: ModelRef, b: ModelRef) -> Match:
    """How ``a`` and ``b`` relate (see the module docstring for the rules)."""
    if a.path is not None and a.path == b.path:
        return Match.SAME
    if (a.subfolder or "") != (b.subfolder or ""):
        return Match.DIFFERENT
    if a.hub_id is not None and b.hub_id is not None and a.hub_id.casefold() == b.hub_id.casefold():
        return _same_repo(a, b)
    return Match.SAME_NAME if a.name and a.name == b.name else Match.DIFFERENT


def _same_repo(a: ModelRef, b: ModelRef) -> Match:
    # two commits decide; else two revisions that differ by name may differ (a tag and a branch
    # can point at one commit, but nothing here can tell); a missing revision is the default one
    if a.pin and b.pin:
        return Match.SAME if a.pin == b.pin else Match.OTHER_REVISION
    both_named = a.revision is not None and b.revision is not None
    return Match.OTHER_REVISION if both_named and a.revision != b.revision else Match.SAME


def _parts(path: str) -> list[str]:
    # both separators: an adapter config may carry a Windows path from the training machine
    return [part for part in re.split(r"[\\/]+", path) if part]


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is written as a hub repo id (``org/name`` or a legacy ``name``), not a path.

    Decided from the text alone: nothing on disk or on the network is looked at.
    """
    return not text.startswith((".", "/", "~", "\\")) and _valid_repo_id(text) is not None


def _valid_repo_id(text: str) -> str | None:
    # imported here: huggingface_hub costs 0.09 s of start-up, for runs on local folders too
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    try:
        validate_repo_id(text)
    except ValueError:  # HFValidationError
        return None
    return text


def _replace(ref: ModelRef, given: str) -> ModelRef:
    return ModelRef(given, ref.hub_id, ref.revision, ref.commit, ref.path, ref.subfolder)

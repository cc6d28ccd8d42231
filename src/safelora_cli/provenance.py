"""Provenance: do the inputs belong together, and could the run mean anything?

Safe LoRA assumes the adapter was trained on the aligned model, and that base and aligned are two
different models of one family. None of this is visible in the weights' shapes, so a run on the
wrong inputs succeeds and means nothing. These checks compare what the inputs say about
themselves; they read no weights and never go to the network.

Each check returns ``Finding``s. A fatal finding is a run that cannot mean anything (the same
model given as base and aligned); ``refuse`` turns it into the error the CLI exits with. Any
other finding is a warning: the CLI prints it and the report keeps it in ``warnings``.

References are compared as the hub and its cache see them (``ModelRef``): a hub id by id
(case-insensitive) and commit, a local folder by its resolved path, and a folder inside the
huggingface_hub cache (``.../models--org--name/snapshots/<commit>``) as that hub id at that
commit. When only names can be compared (a hub id against a local folder, or the path an adapter
was trained from on another machine), equal names count as the same model: mirrors such as
``NousResearch/Llama-2-7b-chat-hf`` of ``meta-llama/Llama-2-7b-chat-hf`` are the usual case.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

from safelora_cli.errors import IncompatibleInputError, SafeLoraError, UsageError
from safelora_cli.untrusted import printable

COMMIT = re.compile(r"[0-9a-f]{40}")
_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# name tokens that mark an instruction-tuned / aligned model
ALIGNED_MARKERS = frozenset({"chat", "instruct", "it", "rlhf", "dpo", "sft", "aligned"})
# more than this share of modules with V = 0 is a warning (all of them is fatal)
IDENTICAL_SHARE = 0.5


@dataclass(frozen=True)
class Finding:
    """One thing worth telling the user about the inputs.

    Attributes:
        code: stable identifier for scripts ("adapter-names-base", "same-model", ...).
        message: one line for stderr; untrusted values in it are escaped and shortened.
        values: the values compared, raw (for the report).
        fatal: the run cannot mean anything; ``refuse`` raises for it.
    """

    code: str
    message: str
    values: dict[str, Any] = field(default_factory=dict)
    fatal: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The report's ``warnings`` entry."""
        return {"code": self.code, "message": self.message, "values": dict(self.values)}


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
        >>> hub_cache_location("/c/hub/models--meta-llama--Llama-2-7b-hf/snapshots/" + "a" * 40)
        ModelRef(given=..., hub_id='meta-llama/Llama-2-7b-hf', commit='aaa...', ...)
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


def check_adapter(
    adapter_config: Mapping[str, Any], base: Mapping[str, Any], aligned: Mapping[str, Any]
) -> list[Finding]:
    """Was the adapter trained on ``--aligned``, as Safe LoRA assumes?

    Args:
        adapter_config: the adapter's ``adapter_config.json`` (``base_model_name_or_path``, and
            PEFT's optional ``revision``).
        base, aligned: the report's ``inputs`` entries for ``--base`` and ``--aligned``.
    Returns:
        [] when the config names the aligned model (or names nothing); else one warning:
        ``adapter-revision`` (the aligned repo at another commit), ``adapter-names-base``
        (trained on the base model), or ``adapter-names-other`` (neither model).
    """
    named = adapter_config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip():
        return []
    revision = adapter_config.get("revision")
    trained = parse_ref(named, revision if isinstance(revision, str) else None)
    base_ref, aligned_ref = ref_from_input(base), ref_from_input(aligned)
    on_aligned, on_base = compare(trained, aligned_ref), compare(trained, base_ref)
    values: dict[str, Any] = {
        "adapter_base_model": named,
        "aligned": aligned_ref.given,
        "base": base_ref.given,
    }
    if on_aligned is Match.SAME or (on_aligned is Match.SAME_NAME and on_base is not Match.SAME):
        return []
    if on_aligned is Match.OTHER_REVISION:
        trained_rev = trained.pin or trained.revision
        aligned_rev = aligned_ref.pin or aligned_ref.revision
        values |= {"adapter_revision": trained_rev, "aligned_revision": aligned_rev}
        return [Finding("adapter-revision",
            f"the adapter was trained on {_show(named)} at revision {_show(str(trained_rev))}, "
            f"and --aligned is revision {_show(str(aligned_rev))}: the weights may differ",
            values)]  # fmt: skip
    if on_base is not Match.DIFFERENT:
        return [Finding("adapter-names-base",
            f"the adapter was trained on {_show(named)}, which is --base: Safe LoRA assumes "
            f"training on the aligned model ({_show(aligned_ref.given)}); the projection may "
            "not restore its alignment", values)]  # fmt: skip
    return [Finding("adapter-names-other",
        f"the adapter was trained on {_show(named)}, which is neither --aligned "
        f"({_show(aligned_ref.given)}) nor --base ({_show(base_ref.given)}): check that "
        "these are the models it was trained from", values)]  # fmt: skip


def check_pair(
    base: Mapping[str, Any],
    aligned: Mapping[str, Any],
    base_files: Mapping[str, str] | None = None,
    aligned_files: Mapping[str, str] | None = None,
) -> list[Finding]:
    """Are ``--base`` and ``--aligned`` two different models, given in the right order?

    Args:
        base, aligned: the report's ``inputs`` entries.
        base_files, aligned_files: optional ``file_identities`` of the two folders.
    Returns:
        ``same-model`` (fatal: one folder, or one hub repo at one commit), ``same-files``
        (fatal: every weight file is the same file or the same hub blob), or
        ``pair-swapped`` (warning: only --base's name marks an instruction-tuned model).
    """
    b, a = ref_from_input(base), ref_from_input(aligned)
    values = {"base": b.given, "aligned": a.given}
    if compare(b, a) is Match.SAME:
        return [Finding("same-model",
            f"--base {_show(b.given)} and --aligned {_show(a.given)} are the same model: "
            "V = W_aligned - W_base is zero everywhere, so there is nothing to project onto",
            values, fatal=True)]  # fmt: skip
    if base_files and aligned_files and base_files == aligned_files:
        return [Finding("same-files",
            f"--base {_show(b.given)} and --aligned {_show(a.given)} hold the same weight "
            "files: V = W_aligned - W_base is zero everywhere", values, fatal=True)]  # fmt: skip
    if _aligned_name(b.name) and not _aligned_name(a.name):
        return [Finding("pair-swapped",
            f"--base {_show(b.given)} looks like an instruction-tuned model and --aligned "
            f"{_show(a.given)} does not: are they swapped?", values)]  # fmt: skip
    return []


def check_scores(report: Mapping[str, Any]) -> list[Finding]:
    """After scoring: did the pair differ where the adapter acts, and did the adapter act?

    Returns:
        ``no-alignment-difference`` (fatal: base and aligned are identical in every adapted
        module, so "nothing to project" would be a false all-clear), ``mostly-identical``
        (warning: in more than half of them), ``adapter-is-zero`` (warning: every update is
        zero, e.g. an untrained adapter: nothing to do).
    """
    modules = [m for m in report.get("modules") or [] if isinstance(m, Mapping)]
    if not modules:
        return []
    identical = sum(1 for m in modules if m.get("skipped") and m.get("v_norm") == 0)
    zero = sum(1 for m in modules if m.get("skipped") and m.get("v_norm") != 0)
    values = {"modules": len(modules), "identical": identical, "zero_update": zero}
    if identical == len(modules):
        return [Finding("no-alignment-difference",
            f"base and aligned are identical in all {len(modules)} adapted modules: Safe LoRA "
            "has no alignment direction to project onto", values, fatal=True)]  # fmt: skip
    if identical > IDENTICAL_SHARE * len(modules):
        return [Finding("mostly-identical",
            f"base and aligned are identical in {identical} of {len(modules)} adapted modules "
            "(skipped): check that --aligned is the aligned model", values)]  # fmt: skip
    if zero == len(modules):
        return [Finding("adapter-is-zero",
            f"every one of the {len(modules)} LoRA updates is zero (an untrained adapter?): "
            "there is nothing to project", values)]  # fmt: skip
    return []


def file_identities(folder: Path) -> dict[str, str]:
    """Per ``*.safetensors`` file in ``folder``: the hub blob it links to, or its inode.

    Two folders with equal identities hold the very same weights (hard links, symlinks to one
    file, or two hub repos whose files are the same LFS blobs). Only ``stat`` and ``readlink``
    are used: no file is read.
    """
    identities: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            if path.is_symlink() and _BLOB.fullmatch(Path(os.readlink(path)).name):
                identities[path.name] = "blob:" + Path(os.readlink(path)).name
            else:
                st = path.stat()
                identities[path.name] = f"inode:{st.st_dev}:{st.st_ino}"
        except OSError:
            return {}  # unreadable: the pipeline reports it properly; this check just abstains
    return identities


def refuse(findings: Sequence[Finding]) -> None:
    """Raise for the first fatal finding: ``same-model`` is a usage error (exit 2), the rest
    inputs that do not fit together (exit 4)."""
    for finding in findings:
        if finding.fatal:
            error: type[SafeLoraError] = (
                UsageError if finding.code == "same-model" else IncompatibleInputError
            )
            raise error(finding.message, _HINTS.get(finding.code))


_HINTS = {
    "same-model": "give the base model to --base and its aligned sibling to --aligned",
    "same-files": "give the base model to --base and its aligned sibling to --aligned",
    "no-alignment-difference": "check that --aligned is the aligned sibling of --base",
}


def _parts(path: str) -> list[str]:
    # both separators: an adapter config may carry a Windows path from the training machine
    return [part for part in re.split(r"[\\/]+", path) if part]


def _aligned_name(name: str) -> bool:
    return not ALIGNED_MARKERS.isdisjoint(re.split(r"[-_.\s]+", name))


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is written as a hub repo id (``org/name`` or a legacy ``name``), not a path.

    Decided from the text alone: nothing on disk or on the network is looked at.
    """
    return not text.startswith((".", "/", "~", "\\")) and _valid_repo_id(text) is not None


def _valid_repo_id(text: str) -> str | None:
    try:
        validate_repo_id(text)
    except ValueError:  # HFValidationError
        return None
    return text


def _replace(ref: ModelRef, given: str) -> ModelRef:
    return ModelRef(given, ref.hub_id, ref.revision, ref.commit, ref.path, ref.subfolder)


def _show(value: str) -> str:
    return printable(value, limit=120)

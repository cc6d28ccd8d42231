"""Provenance: do the inputs belong together, and could the run mean anything?

Safe LoRA assumes the adapter was trained on the aligned model, and that base and aligned are two
different models of one family. None of this is visible in the weights' shapes, so a run on the
wrong inputs succeeds and means nothing. These checks compare what the inputs say about
themselves; they read no weights and never go to the network.

Each check returns ``Finding``s. A fatal finding is a run that cannot mean anything (the same
model given as base and aligned); ``refuse`` turns it into the error the CLI exits with. Any
other finding is a warning: the CLI prints it and the report keeps it in ``warnings``.

References are compared by ``modelref.compare``: hub ids by id and commit, local folders by
resolved path, cache snapshots as their hub id and commit, and otherwise by name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safelora_cli.errors import IncompatibleInputError, SafeLoraError, UsageError
from safelora_cli.inputs.modelref import Match, compare, parse_ref, ref_from_input
from safelora_cli.untrusted import printable

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


def check_adapter(
    config: Mapping[str, Any], base: Mapping[str, Any], aligned: Mapping[str, Any]
) -> list[Finding]:
    """Was the adapter (or full fine-tune) trained on ``--aligned``, as Safe LoRA assumes?

    Args:
        config: the adapter's ``adapter_config.json`` (``base_model_name_or_path`` and PEFT's
            optional ``revision``), or a full fine-tune's ``config.json`` (``_name_or_path``,
            where transformers records the model it was loaded from).
        base, aligned: the report's ``inputs`` entries for ``--base`` and ``--aligned``.
    Returns:
        [] when the config names the aligned model (or names nothing); else one warning:
        ``adapter-revision`` (the aligned repo at another commit), ``adapter-names-base``
        (trained on the base model), or ``adapter-names-other`` (neither model).
    """
    key = "base_model_name_or_path" if "base_model_name_or_path" in config else "_name_or_path"
    named, what = config.get(key), "the adapter" if key != "_name_or_path" else "the fine-tune"
    if not isinstance(named, str) or not named.strip():
        return []
    revision = config.get("revision")
    trained = parse_ref(named, revision if isinstance(revision, str) else None)
    base_ref, aligned_ref = ref_from_input(base), ref_from_input(aligned)
    on_aligned, on_base = compare(trained, aligned_ref), compare(trained, base_ref)
    values: dict[str, Any] = {"trained_on": named, "aligned": aligned_ref.given,
                              "base": base_ref.given}  # fmt: skip
    if on_aligned is Match.SAME or (on_aligned is Match.SAME_NAME and on_base is not Match.SAME):
        return []
    if on_aligned is Match.OTHER_REVISION:
        trained_rev = trained.pin or trained.revision
        aligned_rev = aligned_ref.pin or aligned_ref.revision
        values |= {"trained_revision": trained_rev, "aligned_revision": aligned_rev}
        return [Finding("adapter-revision",
            f"{what} was trained on {_show(named)} at revision {_show(str(trained_rev))}, "
            f"and --aligned is revision {_show(str(aligned_rev))}: the weights may differ",
            values)]  # fmt: skip
    if on_base is not Match.DIFFERENT:
        return [Finding("adapter-names-base",
            f"{what} was trained on {_show(named)}, which is --base: Safe LoRA assumes "
            f"training on the aligned model ({_show(aligned_ref.given)}); the projection may "
            "not restore its alignment", values)]  # fmt: skip
    return [Finding("adapter-names-other",
        f"{what} was trained on {_show(named)}, which is neither --aligned "
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
        (fatal: every weight file is the same file or the same hub blob), ``pair-same-name``
        (warning: two folders or repos of one name, e.g. a copy or a mirror), or
        ``pair-swapped`` (warning: only --base's name marks an instruction-tuned model).
    """
    b, a = ref_from_input(base), ref_from_input(aligned)
    values = {"base": b.given, "aligned": a.given}
    match = compare(b, a)
    if match is Match.SAME:
        return [Finding("same-model",
            f"--base {_show(b.given)} and --aligned {_show(a.given)} are the same model: "
            "V = W_aligned - W_base is zero everywhere, so there is nothing to project onto",
            values, fatal=True)]  # fmt: skip
    if base_files and aligned_files and base_files == aligned_files:
        return [Finding("same-files",
            f"--base {_show(b.given)} and --aligned {_show(a.given)} hold the same weight "
            "files: V = W_aligned - W_base is zero everywhere", values, fatal=True)]  # fmt: skip
    if match is Match.SAME_NAME:
        return [Finding("pair-same-name",
            f"--base {_show(b.given)} and --aligned {_show(a.given)} have the same name: "
            "if they are the same model, there is nothing to project onto", values)]  # fmt: skip
    if _aligned_name(b.name) and not _aligned_name(a.name):
        return [Finding("pair-swapped",
            f"--base {_show(b.given)} looks like an instruction-tuned model and --aligned "
            f"{_show(a.given)} does not: are they swapped?", values)]  # fmt: skip
    return []


def check_profile_pair(
    profile_aligned: Mapping[str, Any], aligned: Mapping[str, Any]
) -> list[Finding]:
    """Is ``--aligned`` the aligned model the profile was made from (a full fine-tune through a
    profile reads W_aligned from ``--aligned`` and V from the profile)?

    Returns:
        [] when they are the same model (or the profile records none); else one warning,
        ``profile-pair-mismatch``.
    """
    if not profile_aligned:
        return []
    recorded, given = ref_from_input(profile_aligned), ref_from_input(aligned)
    if compare(recorded, given) in (Match.SAME, Match.SAME_NAME):
        return []
    return [Finding("profile-pair-mismatch",
        f"the profile was made with the aligned model {_show(recorded.given)}, and --aligned is "
        f"{_show(given.given)}: V and W_aligned may not belong together",
        {"profile_aligned": recorded.given, "aligned": given.given})]  # fmt: skip


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
        updates = "weight updates" if report.get("kind") == "full" else "LoRA updates"
        return [Finding("adapter-is-zero",
            f"every one of the {len(modules)} {updates} is zero (an untrained adapter?): "
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


def _aligned_name(name: str) -> bool:
    return not ALIGNED_MARKERS.isdisjoint(re.split(r"[-_.\s]+", name))


def _show(value: str) -> str:
    return printable(value, limit=120)

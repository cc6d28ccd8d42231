"""Resolve: turn each REF (a local folder or a hub id) into a local folder.

Hub ids (``org/name``, optionally ``@revision``) go through huggingface_hub's cache, fetching only
``*.safetensors`` and ``*.json`` and honouring ``HF_HUB_OFFLINE``. Nothing else is ever downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safelora_cli.errors import HubError, UsageError
from safelora_cli.notices import NOTE, Notices

HUB_PATTERNS = ["*.safetensors", "*.json"]
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class ResolvedInput:
    """A local folder for one input, and where it came from (for the report)."""

    ref: str
    path: Path
    hub_id: str | None = None
    revision: str | None = None
    files: dict[str, int] = field(default_factory=dict)
    commit: str | None = None

    @property
    def trusted_root(self) -> Path:
        """The folder this input's files may lead into: the folder itself, or for a hub snapshot
        its cached repository (a snapshot's files are links into the repository's blobs)."""
        if self.hub_id is not None and self.path.parent.name == "snapshots":
            return self.path.parent.parent.resolve()
        return self.path.resolve()

    def describe(self) -> dict[str, Any]:
        """The report's ``inputs`` entry: path or hub id + revision, files and sizes."""
        return {
            "ref": self.ref,
            "path": str(self.path),
            "hub_id": self.hub_id,
            "revision": self.revision,
            "commit": self.commit,
            "files": dict(sorted(self.files.items())),
            "bytes": sum(self.files.values()),
        }


def resolve(
    ref: str, revision: str | None = None, role: str = "input", notices: Notices | None = None
) -> ResolvedInput:
    """Resolve a local folder or hub id to a local folder.

    Args:
        ref: a folder path, ``org/name`` or ``org/name@revision``.
        revision: hub revision (``--revision``); an ``@rev`` in ``ref`` takes precedence.
        role: how to name the input in errors ("--base").
        notices: told when a REF that is not a local folder is looked up on the hub.
    Returns:
        The resolved input, with the folder's safetensors/json files and sizes.
    Raises:
        UsageError: a path that does not exist and is not a hub id, a file where a folder is due,
            a name too long for the file system, or ``org/name`` where ``org`` is a local folder
            (a typo in a path, far likelier than a hub id).
        HubError: the hub id cannot be resolved (offline and not cached, not found, gated...).
    """
    local = Path(ref).expanduser()
    try:
        if local.is_dir():
            path = local.resolve()
            return ResolvedInput(ref, path, files=_listing(path))
        exists = local.exists()
    except OSError as exc:  # ENAMETOOLONG: is_dir() lets it through
        raise UsageError(f"{role} {ref}: cannot be used as a path ({exc.strerror})") from exc
    if exists:
        raise UsageError(f"{role} {ref}: is a file; give the folder that holds it")
    match = _HUB_ID.match(ref)
    if match is None or ref.startswith((".", "/", "~")):
        raise UsageError(
            f"{role} {ref}: no such folder, and not a hub id (org/name[@revision])",
            "check the path",
        )
    org = ref.split("/", 1)[0]
    if Path(org).is_dir():
        raise UsageError(
            f"{role} {ref}: no such folder (./{org} exists here, so this looks like a path)",
            f"check the path; for the hub id, run from a folder without ./{org}",
        )
    repo, rev = match["repo"], match["rev"] or revision
    if notices is not None:
        notices.add("hub-ref", f"{role} {ref}: not a local folder; resolved as a hub id", NOTE)
    path = Path(_download(repo, rev, role))
    # the cache keeps a snapshot per commit: record which one was used, for reproducibility
    commit = path.name if _COMMIT.fullmatch(path.name) else None
    return ResolvedInput(
        ref, path, hub_id=repo, revision=rev or "main", files=_listing(path), commit=commit
    )


def _listing(path: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_size
        for p in path.iterdir()
        if p.is_file() and p.suffix in (".safetensors", ".json")
    }


PROFILE_NAME = "safelora_profile.safetensors"
"""The file a hub repository holds its alignment profile in."""


def resolve_profile(
    ref: str, revision: str | None = None, notices: Notices | None = None
) -> ResolvedInput:
    """Resolve ``--profile``: a local file, or a hub id ``org/name[@rev]`` whose repository holds
    ``PROFILE_NAME`` (only that file is fetched).

    Returns:
        The input, with ``path`` the profile file itself.
    Raises:
        UsageError: a folder, or a path that does not exist and is not a hub id.
        HubError: as ``resolve``, or the repository has no profile.
    """
    local = Path(ref).expanduser()
    try:
        if local.is_dir():
            raise UsageError(f"--profile {ref}: is a folder", "give the profile's file")
        if local.exists() or ref.startswith((".", "/", "~")) or _HUB_ID.match(ref) is None:
            if not local.exists():
                raise UsageError(f"--profile {ref}: no such file, and not a hub id")
            path = local.resolve()
            return ResolvedInput(ref, path, files={path.name: path.stat().st_size})
    except OSError as exc:
        raise UsageError(f"--profile {ref}: cannot be used as a path ({exc.strerror})") from exc
    match = _HUB_ID.match(ref)
    assert match is not None
    repo, rev = match["repo"], match["rev"] or revision
    if notices is not None:
        notices.add("hub-ref", f"--profile {ref}: not a local file; resolved as a hub id", NOTE)
    folder = Path(_download(repo, rev, "--profile", [PROFILE_NAME]))
    path = folder / PROFILE_NAME
    if not path.is_file():
        raise HubError(
            f"--profile {ref}: the repository holds no {PROFILE_NAME}",
            "publish the file `safelora profile` wrote under that name",
        )
    commit = folder.name if _COMMIT.fullmatch(folder.name) else None
    return ResolvedInput(
        ref, path, repo, rev or "main", {PROFILE_NAME: path.stat().st_size}, commit
    )


def _download(repo: str, revision: str | None, role: str, patterns: list[str] | None = None) -> str:
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    where = f"{role} {repo}" + (f"@{revision}" if revision else "")
    try:
        result = snapshot_download(repo, revision=revision, allow_patterns=patterns or HUB_PATTERNS)
    except hub_errors.GatedRepoError as exc:
        raise HubError(
            f"{where}: the repository is gated",
            f"request access at https://huggingface.co/{repo} and log in with `hf auth login`",
        ) from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise HubError(f"{where}: repository not found", "check the id, or log in") from exc
    except hub_errors.RevisionNotFoundError as exc:
        raise HubError(f"{where}: revision not found", "check --revision") from exc
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as exc:
        raise HubError(
            f"{where}: not in the local cache and the hub cannot be reached (offline)",
            "download it once while online (`hf download`), or pass a local folder",
        ) from exc
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise HubError(f"{where}: cannot fetch ({exc})", "check the network and the id") from exc
    return str(result)

"""Hub ids, offline use, and what the hub can refuse: each a clear error (``ExitCode.HUB``).

A huggingface_hub cache is built by hand under tmp (``models--org--name/refs/main`` holding a
commit hash, ``blobs/`` holding the files, ``snapshots/<hash>/`` linking to them), with
HF_HUB_OFFLINE=1. huggingface_hub reads its environment at import time, so the constants module is
patched as well as the environment. Nothing is downloaded: online-only failures (gated, not found,
bad revision, server error) are raised by a stand-in for ``snapshot_download``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub import errors as hub_errors

from safelora_cli.errors import ExitCode
from tests.conftest import Trio
from tests.helpers import COMMIT, OTHER_COMMIT, REPORT, Cli, cache_repo, expect_error, expect_ok


def hub_args(trio: Trio, output: Path, base: str, aligned: str, *extra: str) -> list[str]:
    return ["patch", str(trio.adapter), "--base", base, "--aligned", aligned,
            "--output", str(output), "--quiet", *extra]  # fmt: skip


def test_cached_hub_ids_resolve_offline_like_local_folders(
    trio: Trio, cli: Cli, tmp_path: Path, hub: Path
) -> None:
    base_snapshot = cache_repo(hub, "org/base-model", trio.base)
    cache_repo(hub, "org/chat-model", trio.aligned, commit=OTHER_COMMIT, ref="v1")
    out, local = tmp_path / "out", tmp_path / "local"

    report = expect_ok(cli(hub_args(trio, out, "org/base-model", "org/chat-model@v1")), out)
    base, aligned = report["inputs"]["base"], report["inputs"]["aligned"]
    assert (base["hub_id"], base["revision"], base["commit"]) == ("org/base-model", "main", COMMIT)
    assert (aligned["hub_id"], aligned["revision"], aligned["commit"]) == (
        "org/chat-model",
        "v1",
        OTHER_COMMIT,
    )
    assert base_snapshot.is_dir()
    assert (base["ref"], base["path"]) == ("org/base-model", "org/base-model")  # not the cache
    assert base["files"] == {p.name: p.stat().st_size for p in trio.base.iterdir()}
    # the same result as from the local folders
    expect_ok(cli(["patch", str(trio.adapter), "--base", str(trio.base), "--aligned",
                   str(trio.aligned), "--output", str(local), "--quiet"]), local)  # fmt: skip
    local_report = json.loads((local / REPORT).read_text())
    assert report["modules"] == local_report["modules"]
    assert (out / "adapter_model.safetensors").read_bytes() == (
        local / "adapter_model.safetensors"
    ).read_bytes()


def test_revision_flag_applies_to_base_and_aligned(
    trio: Trio, cli: Cli, tmp_path: Path, hub: Path
) -> None:
    cache_repo(hub, "org/base-model", trio.base, ref="v2")
    cache_repo(hub, "org/chat-model", trio.aligned, ref="v2")
    out = tmp_path / "out"
    report = expect_ok(
        cli(hub_args(trio, out, "org/base-model", "org/chat-model", "--revision", "v2")), out
    )
    assert report["inputs"]["base"]["revision"] == report["inputs"]["aligned"]["revision"] == "v2"


def test_revision_in_the_ref_wins_over_the_revision_flag(
    trio: Trio, cli: Cli, tmp_path: Path, hub: Path
) -> None:
    """``org/name@rev`` names its own revision; ``--revision`` applies to a REF without one."""
    for repo, folder in (("org/base-model", trio.base), ("org/chat-model", trio.aligned)):
        cache_repo(hub, repo, folder, commit=COMMIT, ref="v1")
        cache_repo(hub, repo, folder, commit=OTHER_COMMIT, ref="v2")
    out = tmp_path / "out"
    args = hub_args(trio, out, "org/base-model@v1", "org/chat-model", "--revision", "v2")
    report = expect_ok(cli(args), out)
    base, aligned = report["inputs"]["base"], report["inputs"]["aligned"]
    assert (base["revision"], base["commit"]) == ("v1", COMMIT)
    assert (aligned["revision"], aligned["commit"]) == ("v2", OTHER_COMMIT)


def test_commit_hash_revision_resolves_offline(
    trio: Trio, cli: Cli, tmp_path: Path, hub: Path
) -> None:
    cache_repo(hub, "org/base-model", trio.base)
    cache_repo(hub, "org/chat-model", trio.aligned)
    out = tmp_path / "out"
    report = expect_ok(cli(hub_args(trio, out, f"org/base-model@{COMMIT}", "org/chat-model")), out)
    assert report["inputs"]["base"]["revision"] == report["inputs"]["base"]["commit"] == COMMIT


@pytest.mark.parametrize(
    ("base", "named"),
    [
        pytest.param("org/missing", "--base org/missing", id="repo-not-cached"),
        pytest.param("org/base-model@nope", "--base org/base-model@nope", id="ref-not-cached"),
        pytest.param(
            f"org/base-model@{OTHER_COMMIT}", f"org/base-model@{OTHER_COMMIT}", id="commit-missing"
        ),
    ],
)
def test_offline_and_not_cached_is_a_hub_error_naming_the_ref(
    trio: Trio, cli: Cli, tmp_path: Path, hub: Path, base: str, named: str
) -> None:
    cache_repo(hub, "org/base-model", trio.base)
    cache_repo(hub, "org/chat-model", trio.aligned)
    out = tmp_path / "out"
    expect_error(
        cli(hub_args(trio, out, base, "org/chat-model")), ExitCode.HUB, named,
        "not in the local cache", "offline", output=out,
    )  # fmt: skip


def test_revision_flag_not_in_the_cache_is_a_hub_error(
    trio: Trio, cli: Cli, tmp_path: Path, hub: Path
) -> None:
    cache_repo(hub, "org/base-model", trio.base)
    cache_repo(hub, "org/chat-model", trio.aligned)
    out = tmp_path / "out"
    expect_error(
        cli(hub_args(trio, out, "org/base-model", "org/chat-model", "--revision", "v9")),
        ExitCode.HUB, "--base org/base-model@v9", output=out,
    )  # fmt: skip


def test_aligned_not_cached_is_named_as_aligned(
    trio: Trio, cli: Cli, tmp_path: Path, hub: Path
) -> None:
    cache_repo(hub, "org/base-model", trio.base)
    out = tmp_path / "out"
    expect_error(
        cli(hub_args(trio, out, "org/base-model", "org/chat-model")), ExitCode.HUB,
        "--aligned org/chat-model", "not in the local cache", output=out,
    )  # fmt: skip


def _http_error(cls: type[hub_errors.HfHubHTTPError], status: int) -> hub_errors.HfHubHTTPError:
    url = "https://huggingface.co/api/models/org/base-model"
    response = httpx2.Response(status, request=httpx2.Request("GET", url))
    return cls(f"{status} Client Error.\n\nfor url: {url}\nmore detail", response=response)


@pytest.mark.parametrize(
    ("error", "phrases"),
    [
        pytest.param(
            lambda: _http_error(hub_errors.GatedRepoError, 403),
            ("--base org/base-model", "gated", "https://huggingface.co/org/base-model"),
            id="gated",
        ),
        pytest.param(
            lambda: _http_error(hub_errors.RepositoryNotFoundError, 404),
            ("--base org/base-model", "repository not found"),
            id="not-found",
        ),
        pytest.param(
            lambda: _http_error(hub_errors.RevisionNotFoundError, 404),
            ("--base org/base-model@v3", "revision not found", "--revision"),
            id="bad-revision",
        ),
        pytest.param(
            lambda: _http_error(hub_errors.HfHubHTTPError, 500),
            ("--base org/base-model", "cannot fetch", "500"),
            id="server-error",
        ),
        pytest.param(
            lambda: hub_errors.OfflineModeIsEnabled("offline"),
            ("--base org/base-model", "offline"),
            id="offline-raised",
        ),
        pytest.param(
            lambda: ValueError("Invalid repo id"), ("--base org/base-model",), id="value-error"
        ),
    ],
)
def test_hub_refusals_are_hub_errors_with_a_hint(
    trio: Trio,
    cli: Cli,
    tmp_path: Path,
    hub: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Callable[[], Exception],
    phrases: tuple[str, ...],
) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []

    def refuse(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        raise error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    out = tmp_path / "out"
    base = "org/base-model@v3" if "@v3" in phrases[0] else "org/base-model"
    expect_error(
        cli(hub_args(trio, out, base, "org/chat-model")), ExitCode.HUB, *phrases, output=out
    )
    # only safetensors and json are ever asked for
    assert calls[0]["allow_patterns"] == ["*.safetensors", "*.json"]


@pytest.mark.parametrize(
    "ref",
    ["org/", "/abs/path/missing", "./rel/missing", "a/b/c", "org/name@", "~/missing-folder"],
)
def test_ref_neither_folder_nor_hub_id_is_a_usage_error(
    trio: Trio, cli: Cli, tmp_path: Path, hub: Path, ref: str
) -> None:
    out = tmp_path / "out"
    expect_error(
        cli(hub_args(trio, out, ref, str(trio.aligned))), ExitCode.USAGE, "--base", output=out
    )

"""The error contract: one table from exceptions to exit codes, errors that carry data, and every
error (click's usage errors included) as one stderr line."""

from __future__ import annotations

from pathlib import Path

import pytest

from safelora_cli.cli._errors import as_error
from safelora_cli.errors import (
    CorruptFileError,
    ExitCode,
    FilesystemError,
    InternalError,
    Interrupted,
    PairingError,
    SafeLoraError,
    UsageError,
)
from safelora_cli.inputs.adapter import load_adapter
from safelora_cli.inputs.index import TensorIndex, index_folder
from safelora_cli.inputs.pairing import pair_modules
from safelora_cli.runs import execute
from tests.conftest import Trio
from tests.helpers import assert_error, invoke


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        pytest.param(KeyboardInterrupt(), Interrupted, ExitCode.INTERRUPTED, id="interrupt"),
        pytest.param(
            OSError(28, "No space left", "/x"), FilesystemError, ExitCode.FILESYSTEM, id="oserror"
        ),  # fmt: skip
        pytest.param(
            PermissionError(13, "denied", "/y"),
            FilesystemError,
            ExitCode.FILESYSTEM,
            id="oserror-subclass",
        ),  # fmt: skip
        pytest.param(ValueError("bug"), InternalError, ExitCode.INTERNAL, id="bug"),
        pytest.param(CorruptFileError("bad"), CorruptFileError, ExitCode.CORRUPT, id="ours"),
        pytest.param(SafeLoraError("unclassified"), SafeLoraError, ExitCode.INTERNAL, id="base"),
    ],
)
def test_every_exception_maps_to_one_exit_code(
    exc: BaseException, kind: type[SafeLoraError], code: ExitCode
) -> None:
    error = as_error(exc)
    assert type(error) is kind
    assert error.exit_code == code


def test_the_base_error_is_not_the_gate_code() -> None:
    assert SafeLoraError.exit_code != ExitCode.GATE_FAILED
    assert {cls.exit_code for cls in (UsageError, CorruptFileError, FilesystemError)}.isdisjoint(
        {ExitCode.OK, ExitCode.GATE_FAILED}
    )


def test_pairing_error_lists_every_problem_as_data(trio: Trio) -> None:
    adapter = load_adapter(trio.adapter)
    base = index_folder(trio.base)
    missing = {f"{m}.weight" for m in trio.modules[:2]}
    pruned = TensorIndex(
        base.root, {k: v for k, v in base.tensors.items() if k not in missing}, base.files
    )
    with pytest.raises(PairingError) as caught:
        pair_modules(adapter, pruned, index_folder(trio.aligned))
    problems = caught.value.problems
    assert sorted(p.module for p in problems) == sorted(trio.modules[:2])
    assert all("base model" in p.problem for p in problems)
    assert "2 adapter module(s) have no weight in the base model" in caught.value.message


def test_click_usage_errors_are_one_line_with_a_hint(trio: Trio) -> None:
    result = invoke(["score", str(trio.adapter), "--select", "lowest"])
    assert_error(result, ExitCode.USAGE, "--select", "lowest", "safelora score --help")
    missing = invoke(["patch", str(trio.adapter), "--base", str(trio.base)])
    assert_error(missing, ExitCode.USAGE, "--output")
    unknown = invoke(["bogus"])
    assert_error(unknown, ExitCode.USAGE, "bogus", "safelora --help")


def test_no_arguments_shows_the_help() -> None:
    result = invoke([])
    assert "Commands:" in result.output
    assert "patch" in result.output


def test_negative_gate_is_a_usage_error(trio: Trio) -> None:
    result = invoke(["score", str(trio.adapter), "--base", str(trio.base),
                     "--aligned", str(trio.aligned), "--fail-if-projected", "-1"])  # fmt: skip
    assert_error(result, ExitCode.USAGE, "--fail-if-projected")


def test_an_unexpected_exception_is_an_internal_error_line_with_the_documented_code(
    trio: Trio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug reaches the user as one line and the internal-error code, which the README's exit
    table documents (test_docs checks that table against ``ExitCode``)."""

    def bug(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(execute, "score", bug)
    out = tmp_path / "out"
    result = invoke(trio.patch_args(out, "--quiet"))
    assert_error(
        result, ExitCode.INTERNAL, "internal error: ZeroDivisionError: planted", "SAFELORA_DEBUG=1"
    )
    # no two names share a code (an IntEnum would silently make one an alias of the other)
    assert len({int(code) for code in ExitCode.__members__.values()}) == len(ExitCode.__members__)
    assert not out.exists()

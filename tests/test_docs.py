"""The docs checked against the code: every option of every command is on its page in docs/, the
exit-code tables of the README and of docs/safety.md are ``errors.ExitCode``, the README is a front
door whose links lead somewhere, and the project stands alone (no file points outside it).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from safelora_cli.errors import ExitCode
from tests.helpers import invoke

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
README_MAX_LINES = 250
WIDE = {"COLUMNS": "250"}
# a flag in the option column of click's help: "  -k, --num-layers K   text"
OPTION_LINE = re.compile(r"^\s{2}(-[\w-]+(?:, -[\w-]+)*)")
FLAG = re.compile(r"--[a-z][a-z0-9-]*")
# click adds --help to every command; the README says so once, not per command
IMPLICIT = {"--help"}


def _section(text: str, title: str) -> list[str]:
    """The lines of a help section ("Commands:", "Options:"), up to the next blank line."""
    lines = text.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def commands() -> list[str]:
    result = invoke(["--help"], env=WIDE)
    assert result.exit_code == ExitCode.OK, result.output
    return [line.split()[0] for line in _section(result.stdout, "Commands:")]


def options(command: str) -> set[str]:
    """Every --flag in the option column of ``safelora COMMAND --help``."""
    result = invoke([command, "--help"], env=WIDE)
    assert result.exit_code == ExitCode.OK, result.output
    flags: set[str] = set()
    for line in _section(result.stdout, "Options:"):
        match = OPTION_LINE.match(line)
        if match:
            flags.update(FLAG.findall(match[1]))
    return flags


def test_the_help_lists_every_command_and_its_options() -> None:
    """The parsing below sees what a user sees (a guard for the two tests that rely on it)."""
    assert {"patch", "score", "inspect", "presets"} <= set(commands())
    assert {"--base", "--aligned", "--output", "--num-layers", "--force"} <= options("patch")
    assert "--fail-if-projected" in options("score")


def command_page(command: str) -> str:
    """The reference page of a command: docs/cli-COMMAND.md."""
    page = DOCS / f"cli-{command}.md"
    assert page.is_file(), f"`safelora {command}` has no page: {page.relative_to(ROOT)}"
    return page.read_text(encoding="utf-8")


@pytest.mark.parametrize("command", commands())
def test_every_option_of_every_command_is_on_its_page(command: str) -> None:
    page = command_page(command)
    assert f"safelora {command}" in page
    missing = sorted(flag for flag in options(command) - IMPLICIT if flag not in page)
    assert missing == [], f"`safelora {command}` options missing from docs/cli-{command}.md"


def exit_code_table(text: str) -> dict[int, str]:
    """The "## Exit codes" table of a page: code -> meaning."""
    section = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*(.+?)\s*\|\s*$", section, flags=re.MULTILINE)
    return {int(code): meaning for code, meaning in rows}


@pytest.mark.parametrize("page", ["README.md", "docs/safety.md"])
def test_exit_code_tables_are_the_exit_code_enum(page: str) -> None:
    documented = exit_code_table((ROOT / page).read_text(encoding="utf-8"))
    assert list(documented) == [int(code) for code in ExitCode]
    # each row says what the code is for, as the enum names it
    for code in ExitCode:
        word = {"INCOMPATIBLE": "do not fit", "GATE_FAILED": "gate"}.get(code.name, code.name)
        assert word.lower() in documented[int(code)].lower(), (code, documented[int(code)])


def test_the_readme_is_a_front_door() -> None:
    """Short, with the two set-up commands, and every page of docs/ linked from it."""
    assert len(README.splitlines()) <= README_MAX_LINES
    assert "make demo" in README
    assert "make test" in README
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert len(pages) >= 4
    unlinked = [name for name in pages if f"(docs/{name})" not in README]
    assert unlinked == []


def test_every_relative_link_in_the_docs_leads_to_a_file() -> None:
    link = re.compile(r"\]\(([^)#:]+)(?:#[^)]*)?\)")
    broken = []
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in link.findall(page.read_text(encoding="utf-8")):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def project_files() -> list[Path]:
    """The files a clone of the project holds (tracked, or new and not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if listed.returncode != 0:  # not a git checkout (an unpacked sdist): walk the tree
        skip = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
        return [
            p for p in ROOT.rglob("*") if p.is_file() and not skip.intersection(p.parts)
        ]  # fmt: skip
    return [ROOT / name for name in listed.stdout.split("\0") if name]


def test_no_file_points_outside_the_project() -> None:
    """The project stands alone: a clone holds no notes from outside it, so nothing may point
    there (the needles are split so that this file does not match itself)."""
    needles = ["../" + "shared", "shared" + "/", "BAD" + "_INPUTS"]
    files = [p for p in project_files() if p.is_file()]
    assert ROOT / "README.md" in files
    offenders = []
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in needles if n in text]
    assert offenders == []

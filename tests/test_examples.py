"""The ready-made pipelines in examples/ and the composite action (action.yml), tested as far as
they can run here: every YAML file parses, every shell script and `run:` step passes ``bash -n``,
every ``safelora`` command line in them uses only options its command's ``--help`` lists, and the
steps themselves run on synthetic adapters: the GitHub Actions workflow and the action (their
`run:` steps, with the env GitHub would give them; `uses:` steps are GitHub's), the GitLab job's
script, the batch over a folder of adapters on xargs (and GNU parallel where installed), the Slurm
array's tasks, and the training example with the callback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from safelora_cli.synthetic import LlamaShape, all_modules, make_adapter, make_pair
from tests.helpers import invoke
from tests.test_docs import options

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ACTION = ROOT / "action.yml"
WORKFLOW = EXAMPLES / "github-actions" / "safelora.yml"
GITLAB = EXAMPLES / "gitlab-ci" / ".gitlab-ci.yml"
BATCH = EXAMPLES / "batch" / "safelora-batch.sh"
SLURM = EXAMPLES / "batch" / "safelora-array.sbatch"
TRAIN = EXAMPLES / "train_with_callback.py"
YAML_FILES = [ACTION, WORKFLOW, GITLAB]
SHELL_FILES = [BATCH, SLURM]
PROJECT_ALL = ("--select", "threshold", "--threshold", "1")  # every scored module fails the gate
EXPRESSION = re.compile(r"\$\{\{\s*(.+?)\s*\}\}")


# --- reading the files ------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def workflow_steps(path: Path) -> list[dict[str, Any]]:
    """The steps of a GitHub workflow (every job) or of a composite action."""
    doc = load_yaml(path)
    if "runs" in doc:
        return list(doc["runs"]["steps"])
    return [step for job in doc["jobs"].values() for step in job["steps"]]


def gitlab_script(job: Mapping[str, Any]) -> list[str]:
    return [str(line) for line in job["script"]]


def shell_snippets() -> dict[str, str]:
    """Every piece of shell in the examples and the action, by where it comes from."""
    snippets = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in SHELL_FILES}
    for path in (ACTION, WORKFLOW):
        for n, step in enumerate(workflow_steps(path)):
            if "run" in step:
                snippets[f"{path.relative_to(ROOT)} step {n}"] = step["run"]
    for name, job in load_yaml(GITLAB).items():
        if isinstance(job, dict) and "script" in job:
            for key in ("before_script", "script"):
                text = "\n".join(str(line) for line in job.get(key, []))
                snippets[f"{GITLAB.relative_to(ROOT)} {name}.{key}"] = text
    return snippets


def safelora_commands(shell: str) -> list[tuple[str, list[str]]]:
    """(command, its --flags) for each ``safelora CMD ...`` in ``shell`` (continuation lines
    joined), and for a command built as a bash array ``args=(CMD ...)`` / ``args+=(...)``."""
    text = re.sub(r"\\\n", " ", shell)
    found = [
        (m[1], re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m[2]))
        for m in re.finditer(r"(?:^|[\s;|&(])safelora ([a-z]+)\b([^\n]*)", text)
    ]
    arrays = re.findall(r"\bargs(\+?)=\(([^)]*)\)", text)
    if arrays:
        assert arrays[0][0] == "", "the array starts with args=(COMMAND ...)"
        command = arrays[0][1].split()[0]
        flags = [f for _, body in arrays for f in re.findall(r"--[a-z][a-z0-9-]*", body)]
        found.append((command, flags))
    return found


# --- running the steps ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose ``safelora`` on PATH runs this tree's code (as ``pip install`` would
    put it there), outside GitHub Actions unless a test says otherwise."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "safelora"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m safelora_cli "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "SLURM_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                      env.get("PYTHONPATH")]))  # fmt: skip
    env["COLUMNS"] = "120"
    return env


@dataclass(frozen=True)
class Adapters:
    """A synthetic pair, its profile, and a folder of three adapters trained on it."""

    base: Path
    aligned: Path
    profile: Path
    folder: Path
    names: tuple[str, ...]

    def adapter(self, name: str) -> Path:
        return self.folder / name


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    root = tmp_path_factory.mktemp("examples")
    base, aligned = make_pair(root)
    modules = all_modules(LlamaShape())
    names = ("lora-a", "lora-b", "lora-c")
    for seed, name in enumerate(names, start=1):
        make_adapter(root / "adapters" / name, base, aligned, modules, seed=seed)
    profile = root / "profile.safetensors"
    result = invoke(["profile", "--base", str(base), "--aligned", str(aligned),
                     "--output", str(profile), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return Adapters(base, aligned, profile, root / "adapters", names)


def run_shell(
    script: str, env: Mapping[str, str], cwd: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """``script`` as GitHub runs a `run:` step (bash --noprofile --norc -eo pipefail)."""
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script, "step", *args],
        env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def expression(expr: str, context: Mapping[str, Any]) -> str:
    """The few GitHub expressions the examples use: ``inputs.X``, ``env.X``, ``secrets.X``,
    ``steps.ID.outputs.X`` and ``github.action_path``; anything else fails the test."""
    head, _, rest = expr.partition(".")
    if head == "steps":
        step, _, name = rest.partition(".outputs.")
        return str(context["steps"].get(step, {}).get(name, ""))
    assert head in ("inputs", "env", "secrets", "github"), f"unsupported expression {expr!r}"
    return str(context[head].get(rest, ""))


def substitute(value: str, context: Mapping[str, Any]) -> str:
    return EXPRESSION.sub(lambda m: expression(m[1], context), value)


def condition(text: str | None, context: Mapping[str, Any], failed: bool) -> bool:
    """A step's ``if:``: ``always()``, or ``A == 'x'`` / ``A != 'x'`` (after a success)."""
    if text is None:
        return not failed
    text = EXPRESSION.sub(lambda m: m[1], str(text)).strip()
    if text == "always()":
        return True
    match = re.fullmatch(r"([\w.-]+)\s*(==|!=)\s*'([^']*)'", text)
    assert match, f"unsupported condition {text!r}"
    value = expression(match[1], context)
    return not failed and (value == match[3]) == (match[2] == "==")


@dataclass
class Run:
    """What running the `run:` steps of a workflow or an action did."""

    ran: list[str]
    skipped: list[str]
    failed: subprocess.CompletedProcess[str] | None
    outputs: dict[str, dict[str, str]]
    stdout: str
    stderr: str


def run_steps(
    path: Path,
    env: Mapping[str, str],
    cwd: Path,
    context_env: Mapping[str, str],
    inputs: Mapping[str, str] | None = None,
) -> Run:
    """Run the `run:` steps of ``path`` in order as a runner would: each with the workflow's,
    job's and step's env (expressions substituted), ``GITHUB_OUTPUT`` read back after each step
    into ``steps.ID.outputs``, a failed step skipping the rest but ``if: always()``. A step that
    installs safelora with pip is not run: ``env``'s PATH has this tree's ``safelora``."""
    doc = load_yaml(path)
    declared = {k: str(v.get("default", "")) for k, v in (doc.get("inputs") or {}).items()}
    context: dict[str, Any] = {
        "inputs": {**declared, **(inputs or {})},
        "env": dict(context_env),
        "secrets": {},
        "github": {"action_path": str(ROOT)},
        "steps": {},
    }
    declared_env = {k: substitute(str(v), context) for k, v in (doc.get("env") or {}).items()}
    base_env = {**env, **declared_env, **context_env}
    context["env"] = base_env
    run = Run([], [], None, context["steps"], "", "")
    for n, step in enumerate(workflow_steps(path)):
        if "run" not in step or not condition(step.get("if"), context, run.failed is not None):
            continue
        if "pip install" in step["run"]:
            run.skipped.append(step.get("name", f"step {n}"))
            continue
        output = cwd / f"github-output-{n}"
        output.write_text("")
        step_env = {k: substitute(str(v), context) for k, v in (step.get("env") or {}).items()}
        result = run_shell(step["run"], {**base_env, **step_env, "GITHUB_OUTPUT": str(output)}, cwd)
        run.ran.append(step.get("name", f"step {n}"))
        run.stdout += result.stdout
        run.stderr += result.stderr
        if "id" in step:
            pairs = (line.split("=", 1) for line in output.read_text().splitlines() if "=" in line)
            context["steps"][step["id"]] = dict(pairs)
        if result.returncode != 0 and run.failed is None:
            run.failed = result
    return run


def github_env(shell_env: Mapping[str, str], workdir: Path) -> dict[str, str]:
    summary = workdir / "step-summary.md"
    summary.write_text("")
    return {**shell_env, "GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary),
            "GITHUB_ACTION_PATH": str(ROOT)}  # fmt: skip


def junit_failures(path: Path) -> dict[str, int]:
    """testsuite name -> number of failures, from a JUnit file."""
    tree = ET.parse(path)
    return {s.get("name", ""): len(s.findall("testcase/failure")) for s in tree.iter("testsuite")}


# --- static checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_files_parse_as_their_tool_reads_them(path: Path) -> None:
    doc = load_yaml(path)
    if path == ACTION:
        assert doc["runs"]["using"] == "composite"
        assert {"adapter", "profile", "base", "aligned", "fail-if-projected"} <= set(doc["inputs"])
        assert doc["inputs"]["adapter"]["required"] is True
        assert "report" in doc["outputs"]
        assert all("shell" in s for s in doc["runs"]["steps"] if "run" in s)  # composite rule
    elif path == WORKFLOW:
        assert True in doc  # `on:` (YAML 1.1 reads the key as true, as PyYAML does)
        assert all("runs-on" in job for job in doc["jobs"].values())
    else:
        [job] = [j for j in doc.values() if isinstance(j, dict) and "script" in j]
        assert job["artifacts"]["reports"]["junit"] == "safelora-junit.xml"
        assert job["artifacts"]["when"] == "always"


def test_every_shell_snippet_passes_bash_n() -> None:
    snippets = shell_snippets()
    assert len(snippets) >= 8
    for where, text in snippets.items():
        result = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert result.returncode == 0, f"{where}: {result.stderr}"


def test_every_safelora_command_line_uses_options_its_help_lists() -> None:
    seen: dict[str, set[str]] = {}
    for where, text in shell_snippets().items():
        for command, flags in safelora_commands(text):
            known = options(command)
            unknown = sorted(set(flags) - known)
            assert unknown == [], f"{where}: `safelora {command}` has no {unknown}"
            seen.setdefault(command, set()).update(flags)
    # the examples gate with JUnit output, build profiles, and the extraction saw them
    assert {"--profile", "--fail-if-projected", "--junit", "--json"} <= seen["score"]
    assert {"--base", "--aligned", "--output"} <= seen["profile"]


def test_safelora_commands_are_found_in_continued_lines_and_arrays() -> None:
    """The extraction above reads what bash would run (a guard for the test that relies on it)."""
    shell = 'safelora score "$A" \\\n  --profile p --json\nargs=(patch x --force)\nargs+=(--base b)'
    assert safelora_commands(shell) == [
        ("score", ["--profile", "--json"]),
        ("patch", ["--force", "--base"]),
    ]


# --- the batch over a folder of adapters ------------------------------------------------------


def batch(
    shell_env: Mapping[str, str],
    adapters_dir: Path,
    profile: Path,
    out: Path,
    options: tuple[str, ...] = (),
    score_options: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """``safelora-batch.sh OPTIONS ADAPTERS_DIR PROFILE OUT -- SCORE_OPTIONS``."""
    args = [*options, str(adapters_dir), str(profile), str(out), "--", *score_options]
    return subprocess.run(["bash", str(BATCH), *args], env=dict(shell_env), capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.fixture
def folder_with_a_broken_adapter(adapters: Adapters, tmp_path: Path) -> Path:
    """The three adapters (linked) and a fourth whose weights are cut short."""
    folder = tmp_path / "adapters"
    folder.mkdir()
    for name in adapters.names:
        shutil.copytree(adapters.adapter(name), folder / name)
    broken = shutil.copytree(adapters.adapter("lora-a"), folder / "lora-broken")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (folder / "not-an-adapter").mkdir()  # no adapter_config.json: not a job
    return folder


def test_batch_scores_each_adapter_on_its_own_and_says_which_failed(
    shell_env: dict[str, str], adapters: Adapters, folder_with_a_broken_adapter: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    out = tmp_path / "reports"
    folder = folder_with_a_broken_adapter
    result = batch(shell_env, folder, adapters.profile, out, ("--runner", "xargs", "-j", "2"),
                   PROJECT_ALL)  # fmt: skip

    assert result.returncode == 3, result.stderr  # the broken adapter's exit code wins
    for name in adapters.names:
        report = json.loads((out / f"{name}.json").read_text())
        assert Path(report["inputs"]["adapter"]["path"]).name == name  # this adapter alone
        assert report["inputs"]["profile"]
        assert report["summary"]["projected"] == report["summary"]["modules"]  # threshold 1
        assert (out / f"{name}.exit").read_text().strip() == "1"
        assert f"{name}: gate failed" in result.stderr
        junit = junit_failures(out / f"{name}.junit.xml")
        assert list(junit.values()) == [report["summary"]["projected"]]
    assert not (out / "lora-broken.json").exists()
    assert (out / "lora-broken.exit").read_text().strip() == "3"
    assert "lora-broken" in (out / "lora-broken.log").read_text()
    assert "lora-broken: error, exit 3" in result.stderr
    assert not list(out.glob("not-an-adapter*"))
    assert not list(out.glob("*.part"))
    assert "3 failed the gate, 1 could not be scored" in result.stderr

    # a rerun scores only what has no report yet (GNU parallel where installed)
    reports = {name: (out / f"{name}.json").stat().st_mtime_ns for name in adapters.names}
    shutil.rmtree(folder / "lora-broken")
    runner = "parallel" if shutil.which("parallel") else "xargs"
    again = batch(shell_env, folder, adapters.profile, out, ("--runner", runner), PROJECT_ALL)
    assert again.returncode == 1, again.stderr
    assert {n: (out / f"{n}.json").stat().st_mtime_ns for n in adapters.names} == reports
    assert "0 passed, 3 failed the gate, 0 could not be scored" in again.stderr


def test_batch_passes_when_every_adapter_is_within_the_gate(
    shell_env: dict[str, str], adapters: Adapters, tmp_path: Path
) -> None:
    out = tmp_path / "reports"
    result = batch(shell_env, adapters.folder, adapters.profile, out, ("-g", "1000"))
    assert result.returncode == 0, result.stderr
    assert "3 passed, 0 failed the gate, 0 could not be scored" in result.stderr
    assert sorted(p.name for p in out.glob("*.json")) == [f"{n}.json" for n in adapters.names]


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        ([], "usage: safelora-batch.sh"),
        (["-j", "0", "ADAPTERS", "PROFILE", "OUT"], "-j 0 is not a number"),
        (["-g", "-1", "ADAPTERS", "PROFILE", "OUT"], "-g -1 is not a number"),
        (["--bogus"], "unknown option --bogus"),
        (["NOWHERE", "PROFILE", "OUT"], "NOWHERE is not a folder"),
        (["ADAPTERS", "NOWHERE", "OUT"], "profile NOWHERE not found"),
        (["--runner", "make", "ADAPTERS", "PROFILE", "OUT"], "--runner make"),
    ],
)
def test_batch_refuses_bad_arguments(
    shell_env: dict[str, str], args: list[str], phrase: str, tmp_path: Path
) -> None:
    (tmp_path / "ADAPTERS").mkdir()
    (tmp_path / "PROFILE").write_text("")
    result = subprocess.run(["bash", str(BATCH), *args], env=shell_env, cwd=tmp_path,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2
    assert phrase in result.stderr
    assert not (tmp_path / "OUT").exists()


def test_slurm_array_tasks_split_the_folder_and_read_only_their_share(
    shell_env: dict[str, str], adapters: Adapters, tmp_path: Path
) -> None:
    out = tmp_path / "reports"
    seen: list[str] = []
    for task in (0, 1):
        env = {**shell_env, "ADAPTERS_DIR": str(adapters.folder), "PROFILE": str(adapters.profile),
               "OUT_DIR": str(out), "GATE": "1000", "SLURM_ARRAY_TASK_ID": str(task + 4),
               "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "2"}  # fmt: skip
        result = subprocess.run(["bash", str(SLURM)], env=env, capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr
        data = json.loads((out / f"task-{task}.json").read_text())
        reports = data if isinstance(data, list) else [data]
        names = [Path(r["inputs"]["adapter"]["path"]).name for r in reports]
        assert names == list(adapters.names[task::2])  # every second adapter, by name
        assert len(junit_failures(out / f"task-{task}.junit.xml")) == len(names)
        seen += names
    assert sorted(seen) == list(adapters.names)


def test_slurm_array_outside_slurm_says_what_is_missing(shell_env: dict[str, str]) -> None:
    result = subprocess.run(["bash", str(SLURM)], env=shell_env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "ADAPTERS_DIR" in result.stderr


# --- GitHub Actions: the workflow and the composite action -----------------------------------


@pytest.mark.parametrize(
    ("gate", "threshold", "passes"), [("1000", "0.35", True), ("0", "1", False)]
)
def test_github_workflow_builds_the_profile_and_gates_with_junit_and_summary(
    shell_env: dict[str, str], adapters: Adapters, tmp_path: Path,
    gate: str, threshold: str, passes: bool,
) -> None:  # fmt: skip
    env = github_env(shell_env, tmp_path)
    overrides = {"ADAPTER": str(adapters.adapter("lora-a")), "BASE": str(adapters.base),
                 "ALIGNED": str(adapters.aligned), "PROFILE": "profiles/pair.safetensors",
                 "FAIL_IF_PROJECTED": gate, "THRESHOLD": threshold}  # fmt: skip
    run = run_steps(WORKFLOW, env, tmp_path, overrides)
    assert run.skipped == ["Install safelora"]
    assert "Download or build the profile" in run.ran  # no cache here: built
    assert (tmp_path / "profiles" / "pair.safetensors").is_file()  # built from the pair
    report = json.loads((tmp_path / "safelora-report.json").read_text())
    junit = junit_failures(tmp_path / "safelora-junit.xml")
    assert list(junit.values()) == [report["summary"]["projected"]]
    summary = (tmp_path / "step-summary.md").read_text()
    assert "|" in summary  # the heat map as a markdown table
    if passes:
        assert run.failed is None, run.stderr
    else:
        assert run.failed is not None
        assert run.failed.returncode == 1
        assert "::error title=safelora::" in run.stderr


def action_run(
    shell_env: dict[str, str], tmp_path: Path, **inputs: str
) -> tuple[Run, dict[str, str]]:
    """Run the composite action's steps; returns the run and the action's outputs."""
    run = run_steps(ACTION, github_env(shell_env, tmp_path), tmp_path, {}, inputs)
    context = {"steps": run.outputs}
    declared = load_yaml(ACTION)["outputs"]
    outputs = {name: substitute(spec["value"], context) for name, spec in declared.items()}
    return run, outputs


def test_action_with_a_profile_outputs_the_report_path(
    shell_env: dict[str, str], adapters: Adapters, tmp_path: Path
) -> None:
    gate = {"fail-if-projected": "1000"}
    run, outputs = action_run(shell_env, tmp_path, adapter=str(adapters.adapter("lora-b")),
                              profile=str(adapters.profile), **gate)  # fmt: skip
    assert run.failed is None, run.stderr
    assert run.skipped == ["Install safelora"]
    report = json.loads((tmp_path / outputs["report"]).read_text())
    assert outputs["report"] == "safelora-report.json"
    assert report["inputs"]["profile"]
    assert report["settings"]["select"] == "threshold"
    assert int(outputs["projected"]) == report["summary"]["projected"]
    assert junit_failures(tmp_path / outputs["junit"])
    assert "safelora" in (tmp_path / "step-summary.md").read_text()


def test_action_with_the_pair_fails_the_gate_with_an_annotation(
    shell_env: dict[str, str], adapters: Adapters, tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    run, outputs = action_run(shell_env, tmp_path, adapter=str(adapters.adapter("lora-c")),
                              base=str(adapters.base), aligned=str(adapters.aligned),
                              threshold="1", junit="out/junit.xml")  # fmt: skip
    assert run.failed is not None
    assert run.failed.returncode == 1
    assert "::error title=safelora::" in run.stderr
    report = json.loads((tmp_path / outputs["report"]).read_text())
    assert report["inputs"]["base"]
    assert int(outputs["projected"]) == report["summary"]["modules"]  # threshold 1: every one


def test_action_without_a_profile_or_the_pair_is_an_error(
    shell_env: dict[str, str], adapters: Adapters, tmp_path: Path
) -> None:
    run, outputs = action_run(shell_env, tmp_path, adapter=str(adapters.adapter("lora-a")),
                              base=str(adapters.base))  # fmt: skip
    assert run.failed is not None
    assert run.failed.returncode == 2
    assert "give the profile input, or both base and aligned" in run.stdout
    assert outputs["report"] == ""


# --- GitLab CI --------------------------------------------------------------------------------


def test_gitlab_job_script_writes_the_junit_report_it_publishes(
    shell_env: dict[str, str], adapters: Adapters, tmp_path: Path
) -> None:
    doc = load_yaml(GITLAB)
    [job] = [j for j in doc.values() if isinstance(j, dict) and "script" in j]
    variables = {k: str(v) for k, v in doc["variables"].items()}
    variables |= {"ADAPTER": str(adapters.adapter("lora-a")), "PROFILE": str(adapters.profile),
                  "FAIL_IF_PROJECTED": "1000"}  # fmt: skip
    # GitLab runs the lines in one shell and stops at the first that fails
    result = run_shell("\n".join(gitlab_script(job)), {**shell_env, **variables}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "GITHUB" not in result.stderr  # outside GitHub Actions: no annotations
    for artifact in job["artifacts"]["paths"]:
        assert (tmp_path / artifact).is_file(), artifact
    report = json.loads((tmp_path / "safelora-report.json").read_text())
    junit = junit_failures(tmp_path / job["artifacts"]["reports"]["junit"])
    assert list(junit.values()) == [report["summary"]["projected"]]

    variables["FAIL_IF_PROJECTED"] = "0"
    variables["THRESHOLD"] = "1"
    again = tmp_path / "again"  # a job starts from a fresh checkout
    again.mkdir()
    failed = run_shell("\n".join(gitlab_script(job)), {**shell_env, **variables}, again)
    assert failed.returncode == 1
    assert "gate failed" in failed.stderr
    assert "::error" not in failed.stderr


# --- the training example ---------------------------------------------------------------------


@pytest.mark.slow
def test_training_example_runs_on_the_tiny_model_and_its_gate_stops_it(
    shell_env: dict[str, str], tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, str(TRAIN), "--tiny", str(tmp_path / "tiny"), "--stop-if-projected", "0"],
        env=shell_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # stopped by the gate
    run = tmp_path / "tiny" / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    report = json.loads((run / "checkpoint-2" / "safelora_report.json").read_text())
    assert report["summary"]["projected"] > 0
    assert "stopped at step 2" in result.stdout
    assert f"would_project {report['summary']['projected']}" in result.stdout
    final = json.loads((run / "final-safe" / "safelora_report.json").read_text())
    assert final["summary"]["projected"] == report["summary"]["projected"]
    assert f"patched final adapter: {run / 'final-safe'}" in result.stdout


@pytest.mark.slow
def test_training_example_is_the_same_at_every_run(
    shell_env: dict[str, str], tmp_path: Path
) -> None:
    """Seeded throughout (the LoRA's random init included, made before the Trainer seeds): two
    runs score their checkpoint alike, so the gate above never depends on the run's luck."""
    reports = []
    for run in ("one", "two"):
        out = tmp_path / run
        subprocess.run(
            [sys.executable, str(TRAIN), "--tiny", str(tmp_path / "tiny"), "--output-dir",
             str(out), "--max-steps", "2"],
            env=shell_env, capture_output=True, text=True,
            timeout=300, check=True,
        )  # fmt: skip
        report = json.loads((out / "checkpoint-2" / "safelora_report.json").read_text())
        reports.append([(m["module"], m["cosine"]) for m in report["modules"]])
    assert reports[0] == reports[1]
    assert all(cosine is not None for _, cosine in reports[0])

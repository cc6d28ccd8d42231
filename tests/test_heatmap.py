"""The heat map: one row per layer, one column per module type, every cell telling the truth.

The grid is read back from the text by column position (cells are right-aligned under their
headers) and compared with the report it came from, module by module.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
from rich.console import Console
from typer.testing import Result

from safelora_cli.display.heatmap import heatmap_renderable, heatmap_text, print_heatmap
from safelora_cli.synthetic import ALL_PROJ
from tests.conftest import Trio
from tests.reports import make_report

Cli = Callable[..., Result]
CSI_SGR = re.compile(r"\x1b\[[0-9;]*m")


def read_grid(text: str, first: int = 0) -> tuple[list[str], dict[int, dict[str, str]]]:
    """The headers and the cells of the grid whose header is the ``first``-th "layer" line."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.split()[:1] == ["layer"]]
    header = lines[starts[first]]
    columns = [(m.group(), m.end()) for m in re.finditer(r"\S+", header)][1:]
    rows: dict[int, dict[str, str]] = {}
    for line in lines[starts[first] + 1 :]:
        if not re.match(r"\s*\d+ ", line):
            break
        padded = line.ljust(len(header))
        rows[int(line.split()[0])] = {name: padded[end - 2 : end].strip() for name, end in columns}
    return [name for name, _ in columns], rows


def expected_cell(module: dict[str, Any]) -> str:
    """What the documented legend promises for a module: ``*`` if projected, the first decimal."""
    if module["cosine"] is None:
        return "--"
    return ("*" if module["projected"] else "") + str(math.floor(module["cosine"] * 10))


def layer_and_proj(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return int(parts[2]), parts[-1]


def test_two_layer_report_of_a_real_run(trio: Trio, cli: Cli) -> None:
    args = ["score", str(trio.adapter), "--base", str(trio.base), "--aligned", str(trio.aligned)]
    result = cli([*args, "--num-layers", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    text = heatmap_text(report)
    headers, rows = read_grid(text)
    assert headers == list(ALL_PROJ)  # model order, not the report's alphabetical order
    assert sorted(rows) == [0, 1]
    for module in report["modules"]:
        layer, proj = layer_and_proj(module["module"])
        assert rows[layer][proj] == expected_cell(module), module["module"]
    assert sum(cell.startswith("*") for row in rows.values() for cell in row.values()) == 4
    assert text.splitlines()[0].endswith("trio0/adapter (adapter)")  # long paths: the middle cut


def test_eighty_layers_fit_in_a_hundred_columns_one_row_per_layer() -> None:
    skipped = ["model.layers.7.mlp.up_proj", "model.layers.79.self_attn.q_proj"]
    report = make_report(layers=80, num_layers=25, skipped=skipped, extra=["lm_head"], seed=3)
    text = heatmap_text(report)
    assert max(map(len, text.splitlines())) <= 100
    headers, rows = read_grid(text)
    assert sorted(rows) == list(range(80))
    assert len(text.splitlines()) < 80 + 10  # the rows, and a few lines of title and legend
    for module in report["modules"]:
        if module["module"] == "lm_head":
            continue
        layer, proj = layer_and_proj(module["module"])
        assert rows[layer][proj] == expected_cell(module), module["module"]
    assert rows[7]["up_proj"] == "--"
    assert rows[79]["q_proj"] == "--"
    lm_head = next(m for m in report["modules"] if m["module"] == "lm_head")
    other = next(line for line in text.splitlines() if line.startswith("other:"))
    assert f"lm_head {expected_cell(lm_head):>2}" in other


def test_terminal_form_is_the_same_grid_coloured_by_cosine() -> None:
    report = make_report(layers=3, num_layers=5, skipped=["model.layers.1.mlp.up_proj"])
    console = Console(record=True, width=100, force_terminal=True, color_system="truecolor")
    console.print(heatmap_renderable(report))
    plain = "\n".join(line.rstrip() for line in console.export_text().splitlines())
    assert plain == heatmap_text(report)
    colours: dict[str, tuple[int, int, int]] = {}
    for segment in console.render(heatmap_renderable(report)):
        style = segment.style
        if style is not None and style.bgcolor is not None and segment.text.strip():
            triplet = style.bgcolor.get_truecolor()
            colours[segment.text.strip()] = (triplet.red, triplet.green, triplet.blue)
            assert bool(style.bold) == segment.text.strip().startswith("*")
    low = [rgb for text, rgb in colours.items() if text[-1] in "0123"]
    high = [rgb for text, rgb in colours.items() if text[-1] in "789"]
    assert low
    assert high
    assert all(r > g for r, g, _ in low)
    assert all(g > r for r, g, _ in high)


def test_plain_text_off_a_terminal_and_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    report = make_report()
    file = io.StringIO()
    print_heatmap(Console(file=file, width=100), report)  # a file is not a terminal
    assert file.getvalue() == heatmap_text(report) + "\n"
    monkeypatch.setenv("NO_COLOR", "1")
    file = io.StringIO()
    print_heatmap(Console(file=file, width=100, force_terminal=True), report)
    assert "\x1b" not in file.getvalue()
    assert file.getvalue() == heatmap_text(report) + "\n"
    monkeypatch.delenv("NO_COLOR")
    file = io.StringIO()
    print_heatmap(Console(file=file, width=100, force_terminal=True), report)
    assert CSI_SGR.search(file.getvalue())  # the terminal form, for contrast


HOSTILE = [
    "model.layers.0.self_attn.\x1b]0;owned\x07q_proj",  # retitles an xterm
    "model.layers.0.mlp.[bold red]x[/bold red]",  # rich markup
    "model.layers.1.mlp.\x9b2Jclear",  # C1 CSI: clears the screen
    "model.layers.1.self_attn.q_proj\nINJECTED line",
    "model.layers.1.mlp." + "w" * 5000,
    "lm_head\u202egnp.exe",  # right-to-left override
    "model." + "x" * 5000,
]


def test_hostile_names_are_escaped_in_both_forms() -> None:
    report = make_report(names=HOSTILE, num_layers=3)
    text = heatmap_text(report)
    assert all(ch == "\n" or " " <= ch <= "~" for ch in text)  # printable ASCII only
    assert max(map(len, text.splitlines())) <= 100
    assert not any(line.startswith("INJECTED") for line in text.splitlines())
    assert "\\x1b]0;owned\\x07" in text  # shown, escaped: the reader sees what was there
    console = Console(record=True, width=100, force_terminal=True, color_system="truecolor")
    console.print(heatmap_renderable(report))
    raw = console.export_text(styles=True, clear=False)
    assert CSI_SGR.sub("", raw).count("\x1b") == 0  # no escape but rich's own colours
    assert not re.search(r"[\x07\x80-\x9f\u202e]", raw)
    assert "[bold red]x[/bold red]" in console.export_text()  # markup shown, not applied


def test_batch_shows_every_adapter() -> None:
    first, second = make_report(seed=1), make_report(seed=2)
    second["inputs"]["adapter"]["ref"] = "runs/second-lora"
    text = heatmap_text([first, second])
    titles = [line for line in text.splitlines() if line.startswith("safelora scores:")]
    assert titles == ["safelora scores: runs/my-lora (adapter)",
                      "safelora scores: runs/second-lora (adapter)"]  # fmt: skip
    for k, report in enumerate((first, second)):
        _, rows = read_grid(text, first=k)
        for module in report["modules"]:
            layer, proj = layer_and_proj(module["module"])
            assert rows[layer][proj] == expected_cell(module)


def test_full_fine_tune_report() -> None:
    report = make_report(kind="full", layers=4)
    report["inputs"]["finetune"] = report["inputs"].pop("adapter")
    text = heatmap_text(report)
    assert text.splitlines()[0] == "safelora scores: runs/my-lora (full)"
    _, rows = read_grid(text)
    assert sorted(rows) == [0, 1, 2, 3]


def test_profile_report_marks_cosines_within_their_bound_of_the_cut() -> None:
    report = make_report(layers=6, num_layers=12, bound=0.05, seed=5)
    cut = report["summary"]["threshold_used"]
    text = heatmap_text(report)
    lines = text.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["layer"])
    ends = {m.group(): m.end() for m in re.finditer(r"\S+", header)}
    near = 0
    for module in report["modules"]:
        layer, proj = layer_and_proj(module["module"])
        row = next(line for line in lines if line.split()[:1] == [str(layer)]).ljust(len(header))
        cell = row[ends[proj] - 3 : ends[proj]]
        uncertain = abs(module["cosine"] - cut) <= 0.05
        near += uncertain
        assert cell == expected_cell(module).rjust(2) + ("~" if uncertain else " ")
    assert near >= 2  # the cut itself and at least one neighbour: the mark was exercised
    assert "~ selection left open by the profile's error bound" in text.replace("\n", " ")


def test_a_runs_own_uncertain_flags_drive_the_mark() -> None:
    """A report that says which modules are uncertain (a run through a profile) is believed:
    the module that defines the cut, within its bound of it, is not marked unless flagged."""
    report = make_report(layers=2, bound=0.05, num_layers=4, seed=3)
    flagged = report["modules"][1]["module"]
    for module in report["modules"]:
        module["uncertain"] = module["module"] == flagged
    text = heatmap_text(report)
    assert text.count("~") == 2  # the flagged cell and the legend


def test_experts_share_a_column_that_shows_their_lowest_cosine() -> None:
    names = [f"model.layers.{layer}.mlp.experts.{e}.w1" for layer in range(2) for e in range(8)]
    report = make_report(names=names, num_layers=3, seed=9)
    headers, rows = read_grid(heatmap_text(report))
    assert headers == ["experts.*.w1"]
    for layer in range(2):
        mine = [m for m in report["modules"] if m["module"].startswith(f"model.layers.{layer}.")]
        lowest = min(mine, key=lambda m: m["cosine"])
        marker = "*" if any(m["projected"] for m in mine) else ""
        assert rows[layer]["experts.*.w1"] == marker + str(math.floor(lowest["cosine"] * 10))


def test_many_module_types_and_narrow_widths_stay_inside_the_width() -> None:
    names = [f"model.layers.{layer}.block.proj_{c}" for layer in range(3) for c in range(30)]
    report = make_report(names=names, num_layers=10)
    for width in (100, 60, 40):
        text = heatmap_text(report, width=width)
        assert max(map(len, text.splitlines())) <= width, width
        assert "columns: " in text  # abbreviated headers come with their key
    names = [f"model.layers.0.t{c}" for c in range(200)]  # more types than columns
    text = heatmap_text(make_report(names=names, num_layers=5))
    headers, _ = read_grid(text)
    assert len(headers) <= 48
    assert max(map(len, text.splitlines())) <= 100


def test_malformed_reports_are_shown_not_fatal() -> None:
    report = make_report(layers=1)
    report["modules"] += [
        "not an entry",
        {"module": 42},
        {"module": "model.layers.0.mlp.nan_proj", "cosine": float("nan"), "projected": False},
        {"module": "model.layers.0.mlp.str_proj", "cosine": "0.5", "projected": "yes"},
    ]
    report["summary"] = "broken"
    report["settings"] = None
    text = heatmap_text([report, "not a report"])  # type: ignore[list-item]
    _, rows = read_grid(text)
    assert rows[0]["nan_proj"] == "!!"
    assert rows[0]["str_proj"] == "!!"
    assert "2 malformed module entries ignored" in text.replace("\n", " ")
    assert "(not a report: ignored)" in text

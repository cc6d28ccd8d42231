"""The one display sink (``display.sink``): what a crafted report, profile or adapter holds reaches
the terminal, the HTML page and ``--json`` only as safe text: no rich markup interpreted, no
escape sequence or invisible character written raw, valid JSON, and an HTML page whose parsed
elements and attributes are only the renderer's own (checked with the stdlib's parser, so it holds
where no browser is installed)."""

from __future__ import annotations

import io
import json
import math
import re
from html.parser import HTMLParser
from typing import Any

import pytest
from rich.console import Console

from safelora_cli.display import heatmap_layout
from safelora_cli.display.heatmap import print_heatmap
from safelora_cli.display.html_report import render_html
from safelora_cli.display.sink import cell, count, finite, html, json_text, number, plain
from safelora_cli.display.terminal import (
    changed_table,
    inspect_tables,
    profile_table,
    summary_table,
)
from tests.reports import make_report

INVISIBLE = "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\ufeff\u00ad\U000e0041"
MARKUP = "[link=http://evil.example]click[/link][bold red]loud[/]"
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x9b31m\x1b]8;;http://evil.example\x1b\\x\x1b]8;;\x1b\\"
HOSTILE = f"model.layers.0.self_attn.q_proj{INVISIBLE}{MARKUP}{ESCAPES}<script>x</script>\"'&"
RAW = ["\x1b", "\x07", "\x9b", *INVISIBLE]


def terminal() -> tuple[Console, io.StringIO]:
    """A console that believes it is a colour terminal (where markup would become escapes)."""
    out = io.StringIO()
    return Console(file=out, force_terminal=True, color_system="truecolor", width=200), out


def inert(text: str) -> str:
    """``text`` without rich's own colour codes (SGR, ``ESC [ ... m``), checked to hold no other
    escape, control or invisible character: no title, no screen clearing, no hyperlink."""
    own = re.sub("\x1b\\[[0-9;]*m", "", text)
    for raw in RAW:
        assert raw not in own, repr(raw)
    return own


# --- the sink itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("char", list(INVISIBLE))
def test_invisible_characters_are_escaped(char: str) -> None:
    shown = plain(f"a{char}b")
    assert char not in shown
    assert shown.startswith("a\\")
    assert shown.endswith("b")


def test_numbers_from_a_file_are_formatted_or_shown_as_text_never_a_crash() -> None:
    assert number(0.123456) == "0.1235"
    assert number(None) == "-"
    assert number(10**400) == plain(10**400, 20)  # past float's range: shown, not OverflowError
    assert number(float("nan")) == "nan"
    assert number(f"{MARKUP}{ESCAPES}") == plain(f"{MARKUP}{ESCAPES}", 20)
    assert "\x1b" not in number(ESCAPES)
    assert number(True) == "True"
    assert count(1234567) == "1,234,567"
    assert count("[red]") == "[red]"


def test_cells_are_text_rich_never_parses() -> None:
    console, out = terminal()
    console.print(cell(MARKUP))
    assert "[link=http://evil.example]click[/link]" in out.getvalue()
    assert "\x1b]8;" not in out.getvalue()  # no hyperlink


def test_json_results_are_valid_json_with_null_for_non_finite() -> None:
    value = {"a": [float("nan"), float("inf"), -float("inf"), 1.5], "b": {"c": float("nan")}}
    text = json_text(value)
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert parsed == {"a": [None, None, None, 1.5], "b": {"c": None}}
    assert finite((1.0, math.nan)) == [1.0, None]
    assert text.isascii()


def test_html_escapes_and_shows_invisible_characters() -> None:
    shown = html(HOSTILE)
    for raw in ["<", ">", '"', "'", *RAW]:
        assert raw not in shown, repr(raw)


# --- every renderer, fed crafted values directly (defence in depth: nothing validated) --------


def crafted_report() -> dict[str, Any]:
    report = make_report(layers=2, names=[HOSTILE, "model.layers.1.mlp.down_proj", "lm_head"])
    report["summary"]["projected"] = f"{MARKUP}{ESCAPES}"  # a count that is not one
    report["summary"]["threshold_used"] = MARKUP
    report["summary"]["mean_pdst"] = 10**400
    report["modules"][1]["cosine"] = ESCAPES
    report["modules"][1]["v_norm"] = float("nan")
    report["inputs"]["adapter"]["path"] = f"/runs/{INVISIBLE}{MARKUP}{ESCAPES}"
    report["inputs"]["adapter"]["ref"] = report["inputs"]["adapter"]["path"]
    report["warnings"] = [{"message": f"{MARKUP}{ESCAPES}"}]
    return report


def test_the_summary_table_shows_crafted_fields_as_text() -> None:
    console, out = terminal()
    summary_table(console, crafted_report())
    text = inert(out.getvalue())
    assert text.count("[link=htt") >= 3  # the markup shown as written (shortened), never applied


def test_the_heat_map_shows_crafted_fields_as_text() -> None:
    console, out = terminal()
    print_heatmap(console, crafted_report())
    text = inert(out.getvalue())
    assert "\\u200b" in text  # the invisible characters of the adapter's path, made visible


def test_inspect_and_profile_tables_show_crafted_fields_as_text() -> None:
    console, out = terminal()
    info = {
        "config": {"r": MARKUP, "lora_alpha": 10**400, "use_rslora": False},
        "summary": {"modules": 1, "lora_parameters": MARKUP, "passthrough": 1, "paired": None},
        "inputs": {"adapter": {"path": f"{MARKUP}{ESCAPES}"}},
        "modules": [
            {
                "module": HOSTILE,
                "shape": [ESCAPES, 3],
                "rank": MARKUP,
                "alpha": MARKUP,
                "scaling": float("nan"),
                "lora_A": {"dtype": ESCAPES},
                "lora_B": {"dtype": MARKUP},
            }
        ],  # fmt: skip
        "passthrough": [{"name": HOSTILE, "dtype": MARKUP, "shape": [ESCAPES]}],
    }
    inspect_tables(console, info)
    profile = {
        "path": HOSTILE,
        "rank_rule": {"rank": None, "tolerance": MARKUP, "max_rank": ESCAPES},
        "totals": {"weights": MARKUP, "lowrank": 1, "whole": 0, "zero": 0, "max_rank": 10**400,
                   "file_bytes": ESCAPES, "max_relative_error": float("inf")},  # fmt: skip
        "weights": [{"weight": HOSTILE, "shape": [1, 2], "kind": "lowrank", "rank": MARKUP,
                     "captured_energy": 1e300, "error_bound": ESCAPES, "bytes": 10**400}],
    }  # fmt: skip
    profile_table(console, profile)
    changed = {
        "summary": {"changed": MARKUP, "tensors": 1, "targeted_changed": ESCAPES},
        "inputs": {"model": {"path": HOSTILE}},
        "tensors": [{"tensor": HOSTILE, "shape": [MARKUP], "changed": True, "d_norm": MARKUP,
                     "relative": 10**400, "targeted": True}],
    }  # fmt: skip
    changed_table(console, changed)
    text = inert(out.getvalue())
    assert text.count("[link=") >= 5


# --- the HTML page, parsed ---------------------------------------------------------------------

TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "section",
        "table", "thead", "tbody", "tr", "th", "td", "details", "summary", "code", "span",
        "b"}  # fmt: skip
ATTRIBUTES = {"lang", "charset", "http-equiv", "content", "class", "style", "title"}


class Page(HTMLParser):
    """Every element, attribute and text of a page, as a browser's parser would see them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str]] = []
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [(name, value or "") for name, value in attrs]

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_data(self, data: str) -> None:
        self.texts.append(data)

    def handle_comment(self, data: str) -> None:
        raise AssertionError(f"a comment in the page: {data[:40]!r}")


def parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    return parser


def test_the_html_page_parses_to_the_renderers_own_elements_only() -> None:
    page = render_html([crafted_report(), make_report(layers=3), "not a report"])  # type: ignore[list-item]
    parsed = parse(page)
    assert set(parsed.tags) <= TAGS, set(parsed.tags) - TAGS
    assert {name for name, _ in parsed.attributes} <= ATTRIBUTES
    for name, value in parsed.attributes:
        if name == "style":  # only the renderer's colours: no url(), no expression()
            assert "url(" not in value, value
            assert "expression" not in value, value
    text = "".join(parsed.texts) + "".join(v for _, v in parsed.attributes)
    for raw in RAW:
        assert raw not in text, repr(raw)
    assert "<script>x</script>" in text  # the name, shown as text (the parser decoded it)
    assert "[link=http://evil.example]" in text
    assert parsed.tags.count("script") == 0


def test_the_html_page_of_a_real_report_has_its_grid_and_every_module() -> None:
    report = make_report(layers=4)
    parsed = parse(render_html(report))
    cells = parsed.tags.count("td")
    modules = len(report["modules"])
    assert cells >= 2 * modules  # a grid cell and a row of the module table for each
    assert "every module (28)" in "".join(parsed.texts)


def test_modules_outside_layers_never_go_through_the_suffix_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The quadratic step (shortest unique suffix, comparing every column with every other) only
    ever sees a stack's columns, at most MAX_COLUMNS of them: thousands of modules without a
    layer number are headed by their own names, in linear time."""
    seen: list[int] = []
    original = heatmap_layout.column_headers

    def counting(columns: list[str]) -> dict[str, str]:
        seen.append(len(columns))
        return original(columns)

    monkeypatch.setattr(heatmap_layout, "column_headers", counting)
    monkeypatch.setattr("safelora_cli.display.html_report.column_headers", counting)
    monkeypatch.setattr("safelora_cli.display.heatmap.column_headers", counting)
    names = [f"head_{k}.proj" for k in range(3000)] + ["model.layers.0.mlp.up_proj"]
    report = make_report(names=names, num_layers=5)
    page = parse(render_html(report))
    assert "head_2999.proj" in "".join(page.texts)
    console, _ = terminal()
    print_heatmap(console, report)
    assert seen
    assert max(seen) <= heatmap_layout.MAX_COLUMNS


def test_layer_numbers_of_many_digits_are_not_layers() -> None:
    name = f"model.layers.{'9' * 3000}.self_attn.q_proj"
    lay = heatmap_layout.layout(make_report(names=[name, "model.layers.1.mlp.up_proj"]))
    assert name in lay.other  # not int("9" * 3000): shown with the modules outside layers
    assert [sorted(s.rows) for s in lay.stacks] == [[1]]
    assert "9" * 400 not in render_html(make_report(names=[name]))  # shortened in the page

"""Model card: the output folder's README.md, for the Hugging Face Hub and for colleagues.

The card has Hugging Face front matter (``base_model``: the aligned model; ``library_name``:
``peft`` for an adapter, ``transformers`` for a full or merged model; the ``safelora`` tag) over
the input card's metadata, then a short section saying what safelora did, then the input card's
text, unchanged. The input card is untrusted: whatever it holds (not UTF-8, front matter that is
not YAML or not a mapping, a YAML bomb, megabytes of text) ends in a valid card and a warning
string for the caller, never an exception or a hang. The front matter is written without YAML
anchors or aliases (``_expanded``); a card safelora wrote earlier has its section replaced
(``card_section.strip_sections``), so a card holds one; and the card names inputs as published
files do (``published``): no local path, in the section or the command line.

``build_card`` is a pure function of plain data (the card's bytes or text, the report dict, the
command line). ``read_card`` reads an input folder's README.md under the rules of the other files
copied from it (``writer.OutputFolder.copy_files``): regular files only, never through a symlink
that leads out of the folder (or, for a hub snapshot, out of its cached repository), and at most
``MAX_CARD_BYTES``.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from safelora_cli.errors import CorruptFileError
from safelora_cli.inputs.modelref import is_hub_id, ref_from_input
from safelora_cli.inputs.smallfiles import open_regular
from safelora_cli.output.card_section import heading, section_lines, strip_sections
from safelora_cli.output.published import published_command, published_report
from safelora_cli.untrusted import printable

CARD_NAME = "README.md"
MAX_CARD_BYTES = 8 * 2**20  # a larger card is not carried over (Hub READMEs are kilobytes)
MAX_FRONT_MATTER = 256 * 2**10  # YAML larger than this is kept as text, not parsed
MAX_EXPANDED = MAX_FRONT_MATTER  # the metadata written back, YAML aliases expanded
MAX_DEPTH = 64  # nesting of the metadata written back (Hub metadata is a few levels deep)
KINDS = {"adapter": "peft", "full": "transformers", "merged": "transformers"}
TAG = "safelora"
ADAPTER_TAG = "base_model:adapter:"
ADAPTER_ONLY_TAGS = frozenset(
    {"peft", "lora", "qlora", "dora", "loha", "lokr", "adalora", "ia3", "vera", "oft", "boft"}
)
"""Tags PEFT gives an adapter's card, wrong for a full or merged model (with ``ADAPTER_TAG``)."""

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _NoAliasDumper(_Dumper):  # type: ignore[misc]
    """Writes every value in full: no anchor or alias in the card's front matter (``_expanded``
    has already bounded what that costs and refused loops)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@dataclass(frozen=True)
class Card:
    """The card to write, the metadata in its front matter, and what the caller should warn about.

    Write ``text`` as UTF-8 bytes, without newline translation (``path.write_bytes(
    card.text.encode())``): the input card's text is then kept byte for byte.
    """

    text: str
    metadata: dict[str, Any]
    warnings: tuple[str, ...]


def build_card(
    original: str | bytes | None,
    report: Mapping[str, Any],
    kind: str,
    command: Sequence[str] | str,
) -> Card:
    """The output's README.md: front matter, what safelora did, then the input card's text.

    Args:
        original: the input card (``read_card``'s bytes, or text), or None when there is none.
        report: the run's report (README.md, "Report").
        kind: "adapter", "full" (a patched full fine-tune) or "merged" (an adapter merged into
            the aligned model).
        command: the command line, as argv or one string.
    Returns:
        The card. Its warnings say what could not be carried over from the input card.
    Example:
        >>> card = build_card(None, report, "adapter", ["safelora", "patch", "my-lora", ...])
        >>> Path("out/README.md").write_bytes(card.text.encode())
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {sorted(KINDS)}")
    public = published_report(report)  # what the card says of the inputs: no local path
    warnings: list[str] = []
    text = _decode(original, warnings)
    metadata, body = _split(text, warnings)
    body = strip_sections(body)  # a re-patched card: the earlier run's section goes
    metadata = _metadata(_expanded(metadata, warnings), public, kind, warnings)
    # the input card's line ending, when most of its lines end so (Windows-edited cards)
    newline = "\r\n" if 2 * body.count("\r\n") > body.count("\n") else "\n"
    front = yaml.dump(
        metadata, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True, line_break=newline
    )
    title = [] if body.strip() else [heading(public), ""]  # a card of its own needs a title
    shown = published_command(command, report)
    section = newline.join(["---", *title, *section_lines(public, kind, shown), ""])
    separator = newline if body else ""
    return Card(f"---{newline}{front}{section}{separator}{body}", metadata, tuple(warnings))


def read_card(folder: Path, inside: Path) -> tuple[bytes | None, list[str]]:
    """The README.md of an input folder, or None; and warnings for a card that was not read.

    Reads only a regular file that lives inside ``inside`` (the folder, or for a hub snapshot its
    cached repository, whose files are symlinks to blobs: ``ResolvedInput.trusted_root``), and at
    most ``MAX_CARD_BYTES + 1`` bytes: ``build_card`` recognises a larger card from the length
    and leaves it out.
    """
    path = folder / CARD_NAME
    if not os.path.lexists(path):
        return None, []
    where = printable(path, limit=200)
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(inside):
        return None, [f"{where} leads outside its folder (a symlink): not used in the model card"]
    try:
        with open_regular(target) as file:
            return file.read(MAX_CARD_BYTES + 1), []
    except (CorruptFileError, OSError) as exc:
        reason = exc.message if isinstance(exc, CorruptFileError) else exc.strerror
        return None, [f"{where} cannot be used ({reason}): not used in the model card"]


def _decode(original: str | bytes | None, warnings: list[str]) -> str:
    if original is None:
        return ""
    if len(original) > MAX_CARD_BYTES:
        warnings.append(
            f"the input's {CARD_NAME} is larger than {MAX_CARD_BYTES // 2**20} MiB: "
            "left out of the model card"
        )
        return ""
    if isinstance(original, str):
        return original.removeprefix("\ufeff")
    if original.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        warnings.append(f"the input's {CARD_NAME} is UTF-16: converted to UTF-8")
        return original.decode("utf-16", errors="replace").removeprefix("\ufeff")
    try:
        return original.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        warnings.append(
            f"the input's {CARD_NAME} is not valid UTF-8 (first bad byte at offset {exc.start}): "
            "undecodable bytes were replaced by U+FFFD"
        )
        return original.decode("utf-8-sig", errors="replace")


def _split(text: str, warnings: list[str]) -> tuple[dict[str, Any], str]:
    """The card's metadata and its text, as the Hub splits them (its own regex)."""
    match = REGEX_YAML_BLOCK.search(text)
    if match is None:
        return {}, text
    block = match.group(2)
    problem = None
    if len(block) > MAX_FRONT_MATTER:
        problem = f"is larger than {MAX_FRONT_MATTER // 2**10} KiB"
    else:
        try:
            data = yaml.load(block, Loader=_Loader)  # noqa: S506 (a safe loader)
        except (yaml.YAMLError, RecursionError, ValueError, TypeError, OverflowError) as exc:
            # untrusted YAML: a syntax error, nesting past the parser's limit, a date or an
            # integer out of range all mean "not metadata we can use"
            problem = f"is not valid YAML ({printable(exc, limit=120)})"
        else:
            if data is None:
                return {}, text[match.end() :]
            if isinstance(data, dict):
                return data, text[match.end() :]
            problem = f"is a {type(data).__name__}, not a mapping"
    warnings.append(
        f"the front matter of the input's {CARD_NAME} {problem}: kept as text, "
        "the card's metadata written fresh"
    )
    return {}, text


def _metadata(
    original: dict[str, Any], report: Mapping[str, Any], kind: str, warnings: list[str]
) -> dict[str, Any]:
    """The input card's metadata, in its order, with safelora's keys set."""
    base_model = _base_model(original.get("base_model"), report, warnings)
    tags = _tags(original.get("tags"), warnings, kind, base_model)
    ours = ModelCardData(base_model=base_model, library_name=KINDS[kind], tags=tags).to_dict()  # type: ignore[no-untyped-call]
    merged = dict(original)  # its keys keep their places; new ones go last
    if "base_model" not in ours:
        merged.pop("base_model", None)
    merged.update(ours)
    if "base_model_relation" in original:
        # an adapter's relation ("adapter") would be wrong for the merged model
        merged["base_model_relation"] = "adapter" if kind == "adapter" else "finetune"
    return merged


def _tags(value: Any, warnings: list[str], kind: str, base_model: Any) -> list[str]:
    """The input card's tags, with ``safelora``. PEFT's ``base_model:adapter:X`` follows the
    card's base_model (a local path in it is dropped); a full or merged model keeps no
    adapter-only tag."""
    if value is None:
        tags: list[Any] = []
    elif isinstance(value, str):
        tags = [value]
    elif isinstance(value, list) and all(isinstance(t, (str, int, float)) for t in value):
        tags = [str(t) for t in value]
    else:
        warnings.append(f"the input card's tags are not a list of strings: replaced by [{TAG}]")
        tags = []
    first = next((i for i, t in enumerate(tags) if t.startswith(ADAPTER_TAG)), None)
    kept = [t for t in tags if not t.startswith(ADAPTER_TAG)]
    if kind != "adapter":
        kept = [t for t in kept if t.casefold() not in ADAPTER_ONLY_TAGS]
    elif first is not None and isinstance(base_model, str):
        kept.insert(
            sum(not t.startswith(ADAPTER_TAG) for t in tags[:first]), ADAPTER_TAG + base_model
        )
    return [*kept, TAG] if TAG not in kept else kept


class _Unwritable(Exception):
    """A front matter value that cannot be written back without YAML aliases."""


def _expanded(metadata: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """The metadata as plain trees: every YAML alias expanded into its own copy, key by key,
    within ``MAX_EXPANDED`` characters in all; a value that refers to itself, nests past
    ``MAX_DEPTH`` or would grow past what is left (an alias bomb) is left out, with a warning.

    The copy is built node by node against the budget, so a bomb costs at most the budget.
    """
    budget, kept = MAX_EXPANDED, {}
    for key, value in metadata.items():
        try:
            copied, budget = _copy(value, budget - len(str(key)), 0, frozenset())
        except _Unwritable as exc:
            warnings.append(
                f"the front matter key {printable(key, 60)} of the input's {CARD_NAME} {exc}: "
                "left out of the model card"
            )
            continue
        kept[key] = copied
    return kept


def _copy(value: Any, budget: int, depth: int, inside: frozenset[int]) -> tuple[Any, int]:
    """A copy of ``value`` with no shared node, and the budget left."""
    budget -= len(str(value)) + 2 if not isinstance(value, (dict, list, set)) else 2
    if budget < 0:
        raise _Unwritable(f"expands past {MAX_EXPANDED // 2**10} KiB (YAML anchors and aliases)")
    if isinstance(value, (dict, list, set)):
        if id(value) in inside:
            raise _Unwritable("refers to itself (a YAML alias loop)")
        if depth >= MAX_DEPTH:
            raise _Unwritable(f"is nested more than {MAX_DEPTH} levels deep")
        inside |= {id(value)}
        if isinstance(value, dict):
            copied: dict[Any, Any] = {}
            for key, item in value.items():
                key, budget = _copy(key, budget, depth + 1, inside)
                copied[key], budget = _copy(item, budget, depth + 1, inside)
            return copied, budget
        items = []
        for item in value:
            item, budget = _copy(item, budget, depth + 1, inside)
            items.append(item)
        return (set(items) if isinstance(value, set) else items), budget
    return value, budget


def _base_model(value: Any, report: Mapping[str, Any], warnings: list[str]) -> Any:
    """The aligned model's hub id; else what of the input card's base_model is a hub id."""
    aligned = _aligned(report)
    hub_id = ref_from_input(aligned).hub_id if aligned is not None else None
    if hub_id is not None:
        if value is not None and str(value).casefold() != hub_id.casefold():
            warnings.append(
                f"the input card's base_model {printable(value, 120)} was replaced by the "
                f"aligned model {printable(hub_id, 120)}"
            )
        return hub_id
    given = value if isinstance(value, list) else [] if value is None else [value]
    kept = [v for v in given if isinstance(v, str) and is_hub_id(v)]
    if len(kept) < len(given):
        warnings.append(
            f"the input card's base_model {printable(value, 120)} is not a hub id: left out "
            "(the aligned model is a local folder: add its hub id before publishing)"
        )
    return kept if isinstance(value, list) else (kept[0] if kept else None)


def _aligned(report: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The report's entry for the aligned model (for a profile run: the profile's pair)."""
    inputs = report.get("inputs")
    inputs = inputs if isinstance(inputs, Mapping) else {}
    profile = inputs.get("profile")
    pair = profile.get("pair") if isinstance(profile, Mapping) else None
    for holder in (inputs, profile, pair):
        if isinstance(holder, Mapping) and isinstance(holder.get("aligned"), Mapping):
            found: Mapping[str, Any] = holder["aligned"]
            return found
    return None

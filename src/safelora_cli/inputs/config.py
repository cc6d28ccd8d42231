"""Config: where a run's options come from, merged in one place.

Precedence, lowest first: a preset (``--preset NAME``, or ``preset = "NAME"`` in the file), a TOML
run file (``--config FILE``), the flags given on the command line; what is still unset after that
takes the defaults of ``settings.Settings``. The keys a file may hold are the options of
``settings.OPTIONS``. Nothing here imports torch: ``safelora presets`` stays fast.

Presets are TOML files, one per known base/aligned pair. The built-in ones are package data
(``safelora_cli/presets/``, linked from ``configs/presets`` in the source tree), so an installed
wheel finds them; ``SAFELORA_PRESET_PATH`` (folders, separated by ``os.pathsep``) adds your own,
and a file there replaces a built-in preset of the same name.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safelora_cli.errors import UsageError
from safelora_cli.inputs.smallfiles import decode_toml, read_small
from safelora_cli.settings import OPTIONS, SETTING_KEYS, Projection, Settings

if TYPE_CHECKING:
    from importlib.abc import Traversable

PRESET_PATH_ENV = "SAFELORA_PRESET_PATH"

_STR, _INT, _FLOAT, _LIST = (str,), (int,), (float, int), (list,)
_TOML_TYPES = {int: _INT, float: _FLOAT, list: _LIST}  # str and the str Enums: _STR
KEY_TYPES: dict[str, tuple[type, ...]] = {
    **{option.key: _TOML_TYPES.get(option.type, _STR) for option in OPTIONS},
    "description": _STR,
}
RUN_KEYS = frozenset(option.key for option in OPTIONS)
"""Keys a ``--config`` file may hold: every option that says what to compute and on which models."""
PRESET_KEYS = frozenset({"description"} | {option.key for option in OPTIONS if option.preset})
"""Keys a preset may hold: the model pair and its recommended selection/projection."""


@dataclass(frozen=True)
class Preset:
    """A known base/aligned pair and its recommended options, read from ``<name>.toml``."""

    name: str
    base: str
    aligned: str
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def layer(self) -> dict[str, Any]:
        """The preset as the lowest layer of a merge."""
        return {"base": self.base, "aligned": self.aligned, **self.options}

    def describe(self) -> dict[str, Any]:
        """The ``safelora presets --json`` entry."""
        return {
            "name": self.name,
            "base": self.base,
            "aligned": self.aligned,
            "description": self.description,
            "settings": dict(self.options),
            "source": self.source,
        }


@dataclass(frozen=True)
class RunConfig:
    """A run's merged options: the model pair (or the profile standing in for it), the
    settings, and the preset they came from."""

    base: str | None
    aligned: str | None
    settings: Settings
    revision: str | None = None
    preset: str | None = None
    profile: str | None = None


def check_table(table: Mapping[str, Any], allowed: Iterable[str], where: str) -> dict[str, Any]:
    """Validate one layer of options: known keys (``-`` read as ``_``), each of the right type.

    Args:
        table: the decoded TOML table.
        allowed: the keys this kind of file may hold.
        where: how to name the file in errors ("--config run.toml").
    Returns:
        The options with snake_case keys; integers given for float options become floats.
    Raises:
        UsageError: an unknown key, a key given twice, or a value of the wrong type.
    """
    allowed = sorted(allowed)
    checked: dict[str, Any] = {}
    for raw_key, raw_value in table.items():
        key = raw_key.replace("-", "_")
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(
                f"{where}: unknown key {raw_key!r}", f"{hint}known keys: {', '.join(allowed)}"
            )
        if key in checked:
            raise UsageError(f"{where}: {key!r} is given twice (as - and _)")
        types = KEY_TYPES[key]
        if not _has_type(raw_value, types):
            kind = {_STR: "a string", _INT: "an integer", _FLOAT: "a number",
                    _LIST: "a list of strings"}[types]  # fmt: skip
            raise UsageError(f"{where}: {raw_key!r} must be {kind}, not {raw_value!r}")
        checked[key] = float(raw_value) if types is _FLOAT else raw_value
    return checked


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    if types is _LIST:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return isinstance(value, types) and not isinstance(value, bool)


MAX_TOML_BYTES = 1024 * 1024


def read_config(path: Path | str) -> dict[str, Any]:
    """Read a ``--config`` TOML run file: any of ``RUN_KEYS``, at the top level.

    Example:
        >>> read_config("run.toml")  # preset = "llama-2-7b-chat" / select = "threshold"
        {'preset': 'llama-2-7b-chat', 'select': 'threshold'}
    """
    path = Path(path)
    where = f"--config {path}"
    if not os.path.lexists(path):
        raise UsageError(f"{where}: no such file", "give the path of a TOML run file")
    if path.is_dir():
        raise UsageError(f"{where}: is a folder", "give the path of a TOML run file")
    raw = read_small(path, "run file", MAX_TOML_BYTES, UsageError)
    return check_table(decode_toml(raw, where, "run file", UsageError), RUN_KEYS, where)


def parse_preset(name: str, text: bytes, source: str) -> Preset:
    """Build a preset from the text of ``<name>.toml``; ``base`` and ``aligned`` are required."""
    where = f"preset {name!r} ({source})"
    options = check_table(decode_toml(text, where, "preset", UsageError), PRESET_KEYS, where)
    missing = [key for key in ("base", "aligned") if key not in options]
    if missing:
        raise UsageError(f"{where}: no {' and no '.join(missing)}", "a preset names both models")
    base, aligned = options.pop("base"), options.pop("aligned")
    description = options.pop("description", "")
    return Preset(name, base, aligned, description, options, source)


def _builtin_dir() -> Traversable:
    return resources.files("safelora_cli").joinpath("presets")


def preset_dirs() -> list[Path]:
    """The folders named in ``SAFELORA_PRESET_PATH``, in order; each must exist."""
    dirs = [Path(p) for p in os.environ.get(PRESET_PATH_ENV, "").split(os.pathsep) if p]
    for folder in dirs:
        if not folder.is_dir():
            raise UsageError(
                f"{PRESET_PATH_ENV}: {folder} is not a folder", "list folders of <name>.toml files"
            )
    return dirs


def load_presets(dirs: Iterable[Path] | None = None) -> dict[str, Preset]:
    """Every preset by name: the built-in ones, then those in ``dirs`` (a later one wins).

    Args:
        dirs: extra folders of ``<name>.toml`` files; default ``preset_dirs()``.
    Returns:
        Presets sorted by name.
    """
    found: dict[str, Preset] = {}
    builtin = _builtin_dir()
    if builtin.is_dir():
        for entry in builtin.iterdir():
            if entry.name.endswith(".toml") and entry.is_file():
                name = entry.name.removesuffix(".toml")
                found[name] = parse_preset(name, entry.read_bytes(), f"built-in {entry.name}")
    for folder in preset_dirs() if dirs is None else dirs:
        for path in sorted(Path(folder).glob("*.toml")):
            raw = read_small(path, "preset", MAX_TOML_BYTES, UsageError)
            found[path.stem] = parse_preset(path.stem, raw, str(path))
    return dict(sorted(found.items()))


def find_preset(name: str, presets: Mapping[str, Preset], where: str = "--preset") -> Preset:
    """The preset called ``name``; an unknown name is a UsageError with the closest names."""
    if name in presets:
        return presets[name]
    close = difflib.get_close_matches(name, list(presets), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UsageError(f"{where} {name!r}: no such preset", f"{hint}`safelora presets` lists them")


def merge_layers(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge option layers, lowest first; a later layer wins, ``None`` means "not given".

    ``rank`` and ``energy`` exclude each other, so a layer that sets one drops the other from
    the layers below it; a layer that sets ``projection = "paper"`` drops both.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        values = {key: value for key, value in layer.items() if value is not None}
        if "rank" in values or "energy" in values or values.get("projection") == Projection.PAPER:
            merged.pop("rank", None)
            merged.pop("energy", None)
        merged.update(values)
    return merged


def resolve_run(
    flags: Mapping[str, Any],
    config_file: Path | str | None = None,
    presets: Mapping[str, Preset] | None = None,
) -> RunConfig:
    """Merge preset < config file < flags, then apply ``Settings``' defaults to what is unset.

    Args:
        flags: option name (``RUN_KEYS``) -> value given on the command line, None if not given.
        config_file: a ``--config`` TOML run file.
        presets: the presets to look names up in; default ``load_presets()``.
    Returns:
        The model pair, the validated ``Settings``, the revision and the preset's name.
    Raises:
        UsageError: unknown key or preset, or no base/aligned after merging.
    Example:
        >>> resolve_run({"preset": "llama-2-7b-chat", "num_layers": 8}).settings.num_layers
        8
    """
    given = check_table({k: v for k, v in flags.items() if v is not None}, RUN_KEYS, "options")
    file_layer = read_config(config_file) if config_file is not None else {}
    name = given.get("preset", file_layer.get("preset"))
    preset_layer: dict[str, Any] = {}
    if name is not None:
        where = "--preset" if "preset" in given else f"--config {config_file}: preset"
        preset = find_preset(name, load_presets() if presets is None else presets, where)
        preset_layer = preset.layer()
    merged = merge_layers(preset_layer, file_layer, given)
    settings = Settings(**{key: merged[key] for key in SETTING_KEYS if key in merged})
    revision = merged.get("revision")
    profile = merged.get("profile")
    if profile is not None:
        if "base" in given or "base" in file_layer:  # a preset's pair gives way to the profile
            raise UsageError(
                "--profile and --base both given",
                "a profile stands in for the model pair: give one or the other",
            )
        # --aligned stays for a full fine-tune (D = W_ft − W_aligned); an adapter refuses it
        aligned = given.get("aligned", file_layer.get("aligned"))
        return RunConfig(None, aligned, settings, revision, name, profile)
    missing = [f"--{key}" for key in ("base", "aligned") if key not in merged]
    if missing:
        raise UsageError(
            f"no {' and no '.join(missing)} given",
            "pass the models, a --profile FILE, a --preset NAME (`safelora presets` lists them), "
            "or base/aligned in a --config file",
        )
    return RunConfig(merged["base"], merged["aligned"], settings, revision, name)

"""Sidecars: which files of an input folder travel into the output beside the weights.

One policy for adapters and models. Copied: regular files at the top of the folder that live in
it (or, for a hub snapshot, in its cached repository, whose files are links to blobs). Left out,
with a reason the caller reports: weights in another format (pickles, GGUF, ONNX, ...), stale
copies that some loaders prefer to the patched weights; links that lead elsewhere (they could carry
a private file, a token say, into an output the user then publishes); FIFOs, devices and broken
links. Left out silently: folders, hidden files, an earlier run's report, and what the caller
writes itself.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from safelora_cli.inputs.index import PICKLE_SUFFIXES
from safelora_cli.output.report import REPORT_NAME

STALE_SUFFIXES = (*PICKLE_SUFFIXES, ".gguf", ".onnx", ".msgpack", ".h5")
"""Weights in another format than safetensors: copied, they would be stale, unpatched weights."""


@dataclass(frozen=True)
class Refusal:
    """A file left out of the output: a stable ``code`` and why."""

    path: Path
    code: str
    reason: str


def plan_sidecars(
    root: Path,
    inside: Path,
    skip: frozenset[str] = frozenset(),
    trusted: frozenset[str] = frozenset(),
    model: bool = False,
) -> tuple[list[Path], list[Refusal]]:
    """The files of ``root`` to copy into the output, and those refused.

    Args:
        root: the input folder; inside: the folder its files must live in
            (``ResolvedInput.trusted_root``).
        skip: names the caller writes itself; trusted: names copied wherever they lead (an
            adapter_config.json that was read and validated).
        model: a model folder: its ``*.safetensors`` are the shards, written by ``ShardWriter``.
    Returns:
        (files to copy, sorted by name; refusals).
    """
    keep: list[Path] = []
    refused: list[Refusal] = []
    for path in sorted(root.iterdir()):
        name = path.name
        if name in skip or name.startswith(".") or name == REPORT_NAME:
            continue
        if model and name.endswith(".safetensors"):
            continue
        if name.endswith(STALE_SUFFIXES):
            refused.append(Refusal(path, "stale-weights", "weights in another format"))
            continue
        real = Path(os.path.realpath(path))
        try:
            mode = real.stat().st_mode  # a FIFO or device is looked at, never opened
        except OSError:
            refused.append(Refusal(path, "file-not-regular", "a broken link or unreadable"))
            continue
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            refused.append(Refusal(path, "file-not-regular", "not a regular file"))
        elif name not in trusted and not real.is_relative_to(inside):
            refused.append(
                Refusal(path, "file-outside-input", f"a link to {real}, outside {inside}")
            )
        else:
            keep.append(path)
    return keep, refused

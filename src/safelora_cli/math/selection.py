"""Selection: which scored modules to project, from every cosine at once.

Both modes follow the official code: a module is projected when its cosine is at most a threshold;
in number mode the threshold is the K-th lowest cosine, so ties at that value are all included.
"""

from __future__ import annotations

from collections.abc import Mapping

from safelora_cli.settings import Select


def select_modules(
    cosines: Mapping[str, float], select: Select, num_layers: int, threshold: float
) -> tuple[set[str], float | None]:
    """Pick the modules to project.

    Args:
        cosines: module name -> cosine, for every scored (not skipped) module.
        select: NUMBER (the K lowest cosines, ties included) or THRESHOLD (cosine <= T).
        num_layers: K; threshold: T (each used by its own mode only).
    Returns:
        (selected module names, the threshold used; None when nothing was scored).
    """
    if not cosines:
        return set(), None
    if Select(select) is Select.NUMBER:  # a plain "number" too
        ordered = sorted(cosines.values())
        threshold = ordered[min(num_layers, len(ordered)) - 1]
    return {name for name, cos in cosines.items() if cos <= threshold}, threshold

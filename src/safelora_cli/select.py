"""Select: which scored modules to project, from every cosine at once.

Both modes follow the official code: a module is projected when its cosine is at most a threshold;
in number mode the threshold is the K-th lowest cosine, so ties at that value are all included.
"""

from __future__ import annotations

from collections.abc import Mapping

from safelora_cli.errors import UsageError

NUMBER = "number"
THRESHOLD = "threshold"
DEFAULT_NUM_LAYERS = 10
DEFAULT_THRESHOLD = 0.5


def check_selection(select: str, num_layers: int, threshold: float, modules: int) -> None:
    """Reject selection settings that cannot work, before any heavy read.

    Args:
        modules: how many LoRA modules the adapter has.
    Raises:
        UsageError: unknown mode, K outside [1, modules], threshold outside [-1, 1].
    """
    if select == NUMBER:
        if not 1 <= num_layers <= modules:
            raise UsageError(
                f"--num-layers {num_layers} is outside 1..{modules} "
                f"(the adapter has {modules} LoRA modules)",
                "pick K between 1 and the number of modules, or use --select threshold",
            )
    elif select == THRESHOLD:
        if not -1.0 <= threshold <= 1.0:
            raise UsageError(
                f"--threshold {threshold} is outside [-1, 1]", "a cosine lies in [-1, 1]"
            )
    else:
        raise UsageError(f"--select {select!r} is not 'number' or 'threshold'")


def select_modules(
    cosines: Mapping[str, float], select: str, num_layers: int, threshold: float
) -> tuple[set[str], float | None]:
    """Pick the modules to project.

    Args:
        cosines: module name -> cosine, for every scored (not skipped) module.
        select: "number" (the K lowest cosines, ties included) or "threshold" (cosine <= T).
    Returns:
        (selected module names, the threshold used; None when nothing was scored).
    """
    if not cosines:
        return set(), None
    if select == NUMBER:
        ordered = sorted(cosines.values())
        threshold = ordered[min(num_layers, len(ordered)) - 1]
    return {name for name, cos in cosines.items() if cos <= threshold}, threshold

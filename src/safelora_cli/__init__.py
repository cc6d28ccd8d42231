"""safelora: Safe LoRA (Hsu et al., NeurIPS 2024) as a streaming, exact, atomic tool.

The library API mirrors the CLI::

    from safelora_cli import Settings, patch, score
    result = patch("my-lora", "org/base", "org/chat", "my-lora-safe", Settings(num_layers=8))
    result.report["summary"]

torch is imported on first use of these names, so ``safelora --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from safelora_cli.version import __version__

__all__ = ["Result", "Settings", "__version__", "patch", "patch_many", "score", "score_many"]
_API = frozenset(__all__) - {"__version__"}

if TYPE_CHECKING:
    from safelora_cli.api import Result, patch, patch_many, score, score_many
    from safelora_cli.settings import Settings


def __getattr__(name: str) -> Any:
    if name == "Settings":  # no torch needed
        from safelora_cli.settings import Settings

        return Settings
    if name in _API:
        from safelora_cli import api as pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'safelora_cli' has no attribute {name!r}")

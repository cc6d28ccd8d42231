"""safelora: Safe LoRA (Hsu et al., NeurIPS 2024) as a streaming, exact, atomic tool."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

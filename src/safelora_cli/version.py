"""The version of safelora, in one place (the package, the report, the card and --version)."""

__version__ = "0.1.0"

"""corp: one-shot structured pruning of trained transformers with closed-form compensation (CORP)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_pruned"]


def __getattr__(name: str):  # lazy so `import corp_cli` stays cheap for the CLI's --help
    if name == "load_pruned":
        from corp_cli.compact import load_pruned

        return load_pruned
    raise AttributeError(name)

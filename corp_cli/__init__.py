"""corp: one-shot structured pruning of trained transformers with closed-form compensation (CORP).

The Python API (see corp_cli.api): calibrate, prune, save_pruned, load_pruned; prune_to runs
`corp prune` as a function (corp_cli.prune_job); describe(path) says what an artifact is
(corp_cli.inspection). Attributes are imported on first use, so
`import corp_cli` (and the CLI's --help) stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "adopt": "corp_cli.api",
    "calibrate": "corp_cli.api",
    "prune": "corp_cli.api",
    "prune_to": "corp_cli.prune_job",  # the whole `corp prune` job, files and all
    "save_pruned": "corp_cli.api",
    "PruneResult": "corp_cli.api",
    "load_pruned": "corp_cli.compact",
    "PruneOptions": "corp_cli.pruning",
    "Statistics": "corp_cli.stats",
    "ModelOptions": "corp_cli.family",
    "describe": "corp_cli.inspection",  # what an artifact is (`corp inspect`)
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(name)

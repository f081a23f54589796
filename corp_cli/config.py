"""YAML presets for `corp prune --config`: PruneOptions fields, strictly checked.

Keys are PruneOptions field names (with `lambda` for `lam`, `sparsity` setting both
sparsities) plus `blocks:`, a map from block index to per-block overrides. An unknown
key is an error, never ignored.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from corp_cli.errors import InputError
from corp_cli.prune import BLOCK_OVERRIDABLE, PruneOptions

_ALIASES = {"lambda": "lam"}


def load_prune_config(path: Path) -> dict[str, Any]:
    """PruneOptions keyword arguments from a YAML preset (not yet validated as a whole)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise InputError(f"--config {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise InputError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"--config {path}: expected a mapping of option names to values")
    names = {f.name for f in fields(PruneOptions)} - {"block_overrides"}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = _ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if k == "sparsity":
            out.setdefault("mlp_sparsity", value)
            out.setdefault("attn_sparsity", value)
        elif k == "blocks":
            out["block_overrides"] = _blocks(value, path)
        elif k in names:
            if k == "lam" and value == "auto":
                value = None
            out[k] = value
        else:
            raise InputError(f"--config {path}: unknown key {key!r}; allowed: {', '.join(sorted(names | {'sparsity', 'lambda', 'blocks'}))}")
    return out


def _blocks(value: Any, path: Path) -> dict[int, dict[str, Any]]:
    if not isinstance(value, dict):
        raise InputError(f"--config {path}: 'blocks' must map block indices to option mappings")
    res: dict[int, dict[str, Any]] = {}
    for idx, ov in value.items():
        try:
            i = int(idx)
        except (TypeError, ValueError):
            raise InputError(f"--config {path}: block key {idx!r} is not an integer index") from None
        if not isinstance(ov, dict):
            raise InputError(f"--config {path}: block {i} must map option names to values")
        clean: dict[str, Any] = {}
        for k, v in ov.items():
            kk = str(k).replace("-", "_")
            if kk == "sparsity":
                clean["mlp_sparsity"] = clean["attn_sparsity"] = v
            elif kk in BLOCK_OVERRIDABLE:
                clean[kk] = v
            else:
                raise InputError(f"--config {path}: block {i} has unknown key {k!r}; allowed: {', '.join(BLOCK_OVERRIDABLE)}")
        res[i] = clean
    return res

"""Load whatever a user names as a model: a timm name (+ local checkpoint) or a `corp prune` output.

Commands that only *use* a model (evaluate, benchmark) go through `load_any`, so a pruned
directory and a dense model are interchangeable everywhere downstream.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corp_cli.compact import MODEL_FILE, load_pruned, read_pruned
from corp_cli.errors import InputError
from corp_cli.models import load_dense, resolve_device
from corp_cli.hf import refuse_hf
from corp_cli.preprocess import Preprocessing, resolve_preprocessing

log = logging.getLogger(__name__)


def is_pruned_path(model_or_dir: str | Path) -> bool:
    """A path on disk (a corp output dir or its model.safetensors), as opposed to a timm name."""
    p = Path(model_or_dir).expanduser()
    return p.is_dir() or (p.is_file() and p.suffix == ".safetensors")


def parse_classes(raw: Any) -> list[str] | None:
    """Class names from checkpoint metadata: a list, or (safetensors metadata is str->str) its JSON text."""
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise InputError(f"checkpoint metadata 'classes' is not JSON: {raw[:80]!r}") from None
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise InputError("checkpoint metadata 'classes' must be a list of class names")
    return list(raw)


def load_any(
    model_or_dir: str | Path,
    checkpoint: Path | None,
    num_classes: int | None,
    device: str | torch.device,
    *,
    pretrained_cfg: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    command: str = "benchmark",
) -> tuple[nn.Module, dict[str, Any], Preprocessing]:
    """(model in eval mode on `device`, a JSON-able description, its eval preprocessing).

    A pruned DIR brings its own architecture, preprocessing and class names in its
    metadata; `checkpoint`/`num_classes` only make sense for a timm name.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    refuse_hf(command, model_or_dir)
    if is_pruned_path(model_or_dir):
        if checkpoint is not None:
            raise InputError(f"{model_or_dir} is a pruned model; --checkpoint applies only to a timm model name")
        if num_classes is not None:
            raise InputError(f"{model_or_dir} is a pruned model; its classifier size is fixed, drop --num-classes")
        return _load_pruned_dir(Path(model_or_dir).expanduser(), dev, pretrained_cfg, overrides, command)
    loaded = load_dense(str(model_or_dir), checkpoint=checkpoint, num_classes=num_classes, device=dev)
    prep = resolve_preprocessing(
        loaded.model, checkpoint_meta=loaded.checkpoint_meta, pretrained_cfg_path=pretrained_cfg, overrides=overrides
    )
    desc = {
        "kind": "dense",
        "name": loaded.identity.name,
        "path": str(checkpoint) if checkpoint is not None else None,
        "identity": loaded.identity.to_dict(),
        "base": loaded.identity.to_dict(),
        "num_classes": loaded.identity.num_classes,
        "classes": parse_classes(loaded.checkpoint_meta.get("classes")),
        "preprocessing": prep.to_dict(),
    }
    return loaded.model, desc, prep


def _load_pruned_dir(
    path: Path, dev: torch.device, pretrained_cfg: Path | None, overrides: Mapping[str, Any] | None, command: str
) -> tuple[nn.Module, dict[str, Any], Preprocessing]:
    _, meta = read_pruned(path)  # validates kind/format before building anything
    refuse_hf(command, path, meta.get("architecture", {}).get("family"))
    model = load_pruned(path, device=dev)
    if "preprocessing" not in meta:
        raise InputError(f"{path}: pruned model metadata has no preprocessing record")
    prep = Preprocessing.from_dict(meta["preprocessing"])
    if pretrained_cfg is not None or overrides:
        # The recorded preprocessing plays the role of the checkpoint layer; explicit flags still win.
        prep = resolve_preprocessing(
            model, checkpoint_meta={"preprocessing": json.dumps(_fields_only(prep))},
            pretrained_cfg_path=pretrained_cfg, overrides=overrides,
        )
    base = meta.get("base") or {}
    arch = meta["architecture"]
    desc = {
        "kind": "pruned",
        "name": arch["base_model"],
        "path": str(path / MODEL_FILE if path.is_dir() else path),
        "identity": None,
        "base": base,
        "num_classes": int(getattr(model, "num_classes", 0)),
        "classes": parse_classes(meta.get("classes")),
        "options": meta.get("options"),
        "stats": meta.get("stats"),
        "architecture": arch,
        "preprocessing": prep.to_dict(),
    }
    log.info("loaded pruned %s from %s", arch["base_model"], path)
    return model, desc, prep


def _fields_only(prep: Preprocessing) -> dict[str, Any]:
    return {k: v for k, v in prep.to_dict().items() if k != "source"}


def same_preprocessing(a: Preprocessing, b: Preprocessing) -> bool:
    """Equal in everything that changes the pixels (the provenance string does not)."""
    return dataclasses.replace(a, source="") == dataclasses.replace(b, source="")

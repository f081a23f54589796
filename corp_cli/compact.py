"""The compacted model's checkpoint: writing it, and `load_pruned`.

A pruned model is rebuilt, never patched: its family builds the base architecture with
the recorded widths (fresh narrower modules), and the saved weights are loaded into it
strictly. The checkpoint's metadata carries everything needed for that.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from corp_cli import __version__
from corp_cli.artifacts import FORMAT_VERSION, read_safetensors, save_safetensors_atomic
from corp_cli.errors import ArtifactError
from corp_cli.family import Loaded
from corp_cli.registry import by_name

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"


def architecture(loaded: Loaded) -> dict[str, Any]:
    """Self-description of a (possibly pruned) model: enough to rebuild it with no other file."""
    return loaded.family.architecture(loaded)


def save_pruned_checkpoint(folder: Path, loaded: Loaded, extra_meta: dict[str, Any]) -> dict[str, Any]:
    """Write folder/model.safetensors (and the family's files beside it); returns the architecture record."""
    arch = architecture(loaded)
    meta = {
        "kind": "model",
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "architecture": arch,
        **extra_meta,
        **loaded.family.checkpoint_meta(arch),
    }
    state = loaded.family.checkpoint_state(loaded.model)
    save_safetensors_atomic(Path(folder) / MODEL_FILE, state, meta)
    loaded.family.write_extras(loaded, arch, Path(folder))
    return arch


def read_pruned(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    return read_safetensors(p, kind="model")


def load_pruned_loaded(path: str | Path, *, device: str | torch.device = "cpu", stock: bool = False) -> Loaded:
    """A pruned model rebuilt from its checkpoint alone, wrapped with its family and preprocessing."""
    state, meta = read_pruned(path)
    arch = meta.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("family"), str):
        raise ArtifactError(f"{path}: the checkpoint has no architecture record")
    family = by_name(arch["family"])
    if stock:
        builder = family.stock_loader(arch)
        if builder is None:
            raise ArtifactError(
                f"{path}: this pruned model has no stock {family.name} form (per-block widths differ, Q/K dims were "
                "pruned, or the family has none); load it with load_pruned(path)"
            )
        model = builder()
    else:
        model = family.build(arch)
    try:
        family.load_state(model, state)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: weights do not match the recorded architecture ({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    p = Path(path)
    return family.reloaded(model, meta, p if p.is_dir() else p.parent)


def load_pruned(path: str | Path, *, device: str | torch.device = "cpu", stock_timm: bool = False) -> nn.Module:
    """Rebuild a pruned model from a corp output directory (or its model.safetensors), in eval mode.

    Needs only the checkpoint: the base architecture is created without pretrained weights,
    narrowed to the recorded widths, and the saved weights are loaded strictly.
    stock_timm=True returns the model built from its library's stock classes instead (a timm
    model with another mlp_ratio), when the pruning allows it; otherwise it raises ArtifactError.
    """
    return load_pruned_loaded(path, device=device, stock=stock_timm).model

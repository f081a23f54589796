"""The masks artifact: which units/dims each block keeps, with the options that chose them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from corp_cli import __version__
from corp_cli.artifacts import FORMAT_VERSION, read_safetensors, save_safetensors_atomic
from corp_cli.errors import ArtifactError
from corp_cli.models import ModelIdentity
from corp_cli.prune import BlockMasks

KIND = "masks"


def save_masks(
    path: Path, masks: list[BlockMasks], *, identity: ModelIdentity, shapes: list[dict[str, int]],
    options: dict[str, Any], stats_fingerprint: str,
) -> None:
    tensors: dict[str, Tensor] = {}
    for i, bm in enumerate(masks):
        if bm.mlp is not None:
            tensors[f"blocks.{i}.mlp.keep"] = bm.mlp.to(torch.int64)
        if bm.attn is not None:
            tensors[f"blocks.{i}.attn.keep"] = bm.attn.to(torch.int64)
    meta = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "model": identity.to_dict(),
        "block_shapes": shapes,
        "options": options,
        "stats_fingerprint": stats_fingerprint,
    }
    save_safetensors_atomic(path, tensors, meta)


def load_masks(path: Path, shapes: list[dict[str, int]]) -> tuple[list[BlockMasks], dict[str, Any]]:
    """Masks validated against the dense block shapes: index ranges, uniqueness, order."""
    tensors, meta = read_safetensors(path, kind=KIND)
    try:
        ModelIdentity.from_dict(meta["model"])
        if meta["block_shapes"] != shapes:
            raise ArtifactError(f"{path}: masks were made for a model with different block shapes")
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: invalid masks metadata ({e})") from None
    masks = [BlockMasks() for _ in shapes]
    for key, t in tensors.items():
        parts = key.split(".")
        if len(parts) != 4 or parts[0] != "blocks" or parts[2] not in ("mlp", "attn") or parts[3] != "keep" or not parts[1].isdigit():
            raise ArtifactError(f"{path}: unexpected tensor {key!r} in masks file")
        i = int(parts[1])
        if i >= len(shapes):
            raise ArtifactError(f"{path}: {key} refers to block {i} but the model has {len(shapes)} blocks")
        if t.dtype != torch.int64:
            raise ArtifactError(f"{path}: {key} has dtype {t.dtype}, expected int64")
        limit = shapes[i]["mlp_hidden"] if parts[2] == "mlp" else shapes[i]["head_dim"]
        rows = t.reshape(1, -1) if parts[2] == "mlp" else t
        want_ndim = 1 if parts[2] == "mlp" else 2
        if t.ndim != want_ndim or (parts[2] == "attn" and t.shape[0] != shapes[i]["num_heads"]):
            raise ArtifactError(f"{path}: {key} has shape {tuple(t.shape)}, which does not fit block {i}")
        if rows.shape[1] == 0 or int(rows.min()) < 0 or int(rows.max()) >= limit:
            raise ArtifactError(f"{path}: {key} holds indices outside [0, {limit}) or is empty")
        if bool((rows[:, 1:] <= rows[:, :-1]).any()):
            raise ArtifactError(f"{path}: {key} indices must be strictly ascending (no duplicates)")
        setattr(masks[i], parts[2], t)
    return masks, meta

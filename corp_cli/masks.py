"""The masks artifact: which units/dims each block keeps, with the options that chose them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from corp_cli import __version__
from corp_cli.artifacts import FORMAT_VERSION, read_safetensors, save_safetensors_atomic
from corp_cli.errors import ArtifactError
from corp_cli.family import ModelIdentity
from corp_cli.pruning import BlockMasks

KIND = "masks"
_KEY = re.compile(r"blocks\.(0|[1-9][0-9]{0,5})\.(mlp|attn|vo|heads)\.keep")  # ASCII digits only: int() must parse it
# Each part's index limit (a block shape key) and its rank: per-head parts have one row per kept head.
_LIMITS = {"mlp": ("mlp_hidden", 1), "heads": ("num_heads", 1), "attn": ("head_dim", 2), "vo": ("head_dim", 2)}


def save_masks(
    path: Path, masks: list[BlockMasks], *, identity: ModelIdentity, shapes: list[dict[str, int]],
    options: dict[str, Any], stats_fingerprint: str, allocation: list[dict[str, Any]] | None = None,
) -> None:
    """`allocation`: the per-block widths a FLOPs budget chose (recorded for reading; the tensors fix the kept units)."""
    tensors: dict[str, Tensor] = {}
    for i, bm in enumerate(masks):
        for part in ("mlp", "attn", "vo", "heads"):
            kept = getattr(bm, part)
            if kept is not None:
                tensors[f"blocks.{i}.{part}.keep"] = kept.to(torch.int64)
    meta: dict[str, Any] = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "model": identity.to_dict(),
        "block_shapes": shapes,
        "options": options,
        "stats_fingerprint": stats_fingerprint,
    }
    if allocation is not None:
        meta["allocation"] = allocation
    save_safetensors_atomic(path, tensors, meta)


def load_masks(path: Path, shapes: list[dict[str, int]] | None = None) -> tuple[list[BlockMasks], dict[str, Any]]:
    """Masks validated against the dense block shapes: index ranges, uniqueness, order.

    `shapes` are the model's (or its statistics'); None checks the file against its own
    recorded shapes only, for validating it before the model is loaded.
    """
    tensors, meta = read_safetensors(path, kind=KIND)
    try:
        ModelIdentity.from_dict(meta.get("model"))  # type: ignore[arg-type]
        own = meta.get("block_shapes")
        if not isinstance(own, list) or not own or not all(isinstance(s, dict) for s in own):
            raise ValueError("block_shapes must be a non-empty list of objects")
        if not isinstance(meta.get("options"), dict) or not isinstance(meta.get("stats_fingerprint"), str):
            raise ValueError("options must be an object and stats_fingerprint a string")
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ArtifactError(f"{path}: invalid masks metadata ({e})") from None
    if shapes is None:
        shapes = own
    elif own != shapes:
        raise ArtifactError(f"{path}: masks were made for a model with different block shapes")
    masks = [BlockMasks() for _ in shapes]
    found: dict[tuple[int, str], Tensor] = {}
    for key, t in sorted(tensors.items()):
        match = _KEY.fullmatch(key)
        if match is None:
            raise ArtifactError(f"{path}: unexpected tensor {key!r} in masks file")
        i, part = int(match.group(1)), match.group(2)
        if i >= len(shapes):
            raise ArtifactError(f"{path}: {key} refers to block {i} but the model has {len(shapes)} blocks")
        if t.dtype != torch.int64:
            raise ArtifactError(f"{path}: {key} has dtype {t.dtype}, expected int64")
        found[(i, part)] = t
    # heads first: the per-head parts have one row per kept head
    for (i, part), t in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] != "heads")):
        key = f"blocks.{i}.{part}.keep"
        limit_key, want_ndim = _LIMITS[part]
        limit, heads = shapes[i].get(limit_key), shapes[i].get("num_heads")
        if not _positive_int(limit) or (want_ndim == 2 and not _positive_int(heads)):
            raise ArtifactError(f"{path}: block_shapes[{i}] has no valid {limit_key}/num_heads for {key}")
        # only a per-head part has rows to count (a 1-d part's block may hold no valid num_heads)
        if t.ndim != want_ndim or (want_ndim == 2 and t.shape[0] != _rows_wanted(shapes[i], masks[i].heads)):
            raise ArtifactError(f"{path}: {key} has shape {tuple(t.shape)}, which does not fit block {i}")
        rows = t.reshape(1, -1) if want_ndim == 1 else t
        if rows.shape[1] == 0 or int(rows.min()) < 0 or int(rows.max()) >= limit:
            raise ArtifactError(f"{path}: {key} holds indices outside [0, {limit}) or is empty")
        if bool((rows[:, 1:] <= rows[:, :-1]).any()):
            raise ArtifactError(f"{path}: {key} indices must be strictly ascending (no duplicates)")
        setattr(masks[i], part, t)
    return masks, meta


def _rows_wanted(shape: dict[str, Any], heads: Tensor | None) -> int:
    """Rows of a per-head part: one per kept head, or, under grouped-query attention, per kept kv head."""
    nh, kv = shape["num_heads"], shape.get("kv_heads")
    group = nh // kv if _positive_int(kv) and kv < nh and nh % kv == 0 else 1
    if heads is None:
        return nh // group
    return int(torch.unique(torch.div(heads, group, rounding_mode="floor")).numel())


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1

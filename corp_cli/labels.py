"""Map image-folder class names to classifier indices.

ImageNet synsets go through timm's own class list so indices always match timm's
ImageNet-1k heads; there is deliberately no hand-copied class table here.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

from corp_cli.errors import InputError

log = logging.getLogger(__name__)

_SYNSET_RE = re.compile(r"n\d{8}")


@functools.lru_cache(maxsize=1)
def _imagenet_index() -> dict[str, int]:
    from timm.data import ImageNetInfo

    # timm 1.0 has no name->index lookup, only index->name and the ordered list of names.
    return {name: i for i, name in enumerate(ImageNetInfo("imagenet-1k").label_names())}


def synset_to_imagenet_index(name: str) -> int | None:
    """ImageNet-1k class index of a WordNet synset id like 'n01440764'; None if it is not one."""
    if not _SYNSET_RE.fullmatch(name):
        return None
    return _imagenet_index().get(name)


def folder_label_map(folder_names: Iterable[str], class_names: Sequence[str] | None = None) -> dict[str, int]:
    """Label index for each folder name.

    All folders ImageNet-1k synsets -> timm's ImageNet index; else, with `class_names`
    (e.g. from a checkpoint's metadata), each folder's position in that list; else sorted
    folder names -> 0..K-1, as torchvision's ImageFolder does.
    """
    names = sorted(set(folder_names))
    if not names:
        return {}
    synsets = {n: synset_to_imagenet_index(n) for n in names}
    if all(i is not None for i in synsets.values()):
        return {n: i for n, i in synsets.items() if i is not None}
    if class_names is not None:
        index = {c: i for i, c in enumerate(class_names)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise InputError(f"class folder(s) {unknown[:5]} not among the model's class names {list(class_names)[:10]}")
        return {n: index[n] for n in names}
    # Numbering folders 0..K-1 is only right if the model's head was trained in that
    # order; scored against an ImageNet head it would be silently wrong, so always say so.
    kind = "only some class folders are ImageNet synsets" if any(i is not None for i in synsets.values()) else (
        "class folders are not ImageNet synsets and the model carries no class names"
    )
    log.warning("%s; labelling the %d folders 0..K-1 in sorted order (ImageFolder convention)", kind, len(names))
    return {n: i for i, n in enumerate(names)}


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

"""The family registry: which families exist, which one holds a model or claims a spec.

Families are named here by module path and imported on first use, so core modules never
import a family (and `transformers` is only imported when a Hugging Face model is used).
Adding a family is one line in FAMILIES. Third-party families register through the
`corp.families` entry-point group with the same "module:Class" form.
"""

from __future__ import annotations

import functools
import importlib
import logging
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from torch import nn

from corp_cli.errors import InputError, UnsupportedModelError

if TYPE_CHECKING:
    from corp_cli.family import ModelFamily, ModelOptions

log = logging.getLogger(__name__)

# Order matters where two families could claim one spec: the first claim wins.
FAMILIES: tuple[str, ...] = (
    "corp_cli.families.hf_bert:HFBertFamily",
    "corp_cli.families.hf_vit:HFViTFamily",
    "corp_cli.families.timm_vit:TimmViTFamily",
    "corp_cli.families.timm_eva:TimmEvaFamily",
    "corp_cli.families.hf_llama:HFLlamaFamily",
)
ENTRY_POINT_GROUP = "corp.families"


@functools.lru_cache(maxsize=None)
def _load(path: str) -> ModelFamily:
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)()


@functools.lru_cache(maxsize=1)
def _paths() -> tuple[str, ...]:
    extra = tuple(ep.value for ep in entry_points(group=ENTRY_POINT_GROUP))
    return FAMILIES + tuple(p for p in extra if p not in FAMILIES)


def families() -> list[ModelFamily]:
    """Every registered family, instantiated (imports each family module, not its optional libraries)."""
    return [_load(p) for p in _paths()]


def by_name(name: str) -> ModelFamily:
    """The family a checkpoint records (architecture["family"])."""
    for fam in families():
        if fam.name == name:
            return fam
    known = ", ".join(f.name for f in families())
    raise UnsupportedModelError(f"this corp has no model family {name!r} (it knows {known}); is the checkpoint from a newer corp?")


def family_of(model: nn.Module) -> ModelFamily:
    """The family an in-memory module belongs to."""
    for fam in families():
        if fam.owns(model):
            return fam
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a model corp can prune; supported: "
        + "; ".join(f"{f.name} ({f.describe()})" for f in families())
    )


def resolve(spec: str) -> tuple[ModelFamily, str]:
    """(family, full model name) for a CLI MODEL argument; a short name is resolved and said so."""
    for fam in families():
        if fam.claim(spec):
            return fam, spec
    candidates = sorted({c for fam in families() for c in fam.candidates(spec)})
    if len(candidates) == 1:
        (full,) = candidates
        log.warning("%s resolved to %s", spec, full)
        for fam in families():
            if fam.claim(full):
                return fam, full
    if candidates:
        raise InputError(f"{spec} is ambiguous; corp can prune {', '.join(candidates[:12])}"
                         f"{', ...' if len(candidates) > 12 else ''}: name one")
    misses = [m for fam in families() if (m := fam.near_miss(spec))]
    if misses:
        what = misses[0][0]
        raise UnsupportedModelError(f"{spec}: {what} is not supported ({'; '.join(p for _, p in misses)})")
    raise InputError(unknown_model_message(spec))


def unknown_model_message(spec: str) -> str:
    hints = sorted({h for fam in families() for h in getattr(fam, "close_matches", lambda s: [])(spec)})
    hint = f"; did you mean {', '.join(hints[:5])}?" if hints else ""
    supported = "; ".join(f"{f.name}: {', '.join(f.examples[:3])}" for f in families() if f.examples)
    return f"unknown model {spec!r}{hint} (corp prunes {supported}, or a Hugging Face folder / hf-model:ID)"


def check_options(fam: ModelFamily, options: ModelOptions) -> None:
    """Refuse, in one line, any model option this family does not honour."""
    from corp_cli.family import OPTION_REASONS

    for name in options.given():
        if name not in fam.options:
            why = fam.option_reasons.get(name) or OPTION_REASONS.get(name, "it does not apply to this model")
            raise InputError(f"{options.flags(name)} does not apply to {fam.name} models: {why}")

"""Hugging Face `transformers` encoders: BERT (and sentence-transformers folders of it), HF ViT/DeiT.

Everything family-specific lives in this package so the timm path stays untouched; the
shared modules only dispatch here (adapter_for, load_pruned, collect_statistics, commands).
`transformers` is an optional extra (`pip install 'corp-cli[hf]'`) and is imported lazily.
"""

from __future__ import annotations

from pathlib import Path

HUB_PREFIX = "hf-model:"
FAMILY_PREFIX = "hf-"


def is_hf_model_spec(model: str | Path) -> bool:
    """MODEL names a dense HF model: `hf-model:ID`, or a local folder holding a config.json."""
    text = str(model)
    if text.startswith(HUB_PREFIX):
        return True
    p = Path(text).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


def is_hf_family(family: str | None) -> bool:
    return bool(family) and str(family).startswith(FAMILY_PREFIX)


def is_hf_module(model: object) -> bool:
    """A transformers PreTrainedModel (checked by class ancestry, without importing transformers)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def refuse_hf(what: str, model: str | Path, family: str | None = None) -> None:
    """Where a timm model is expected (a timm MODEL's --reference), an HF encoder is refused in one line."""
    if is_hf_model_spec(model) or is_hf_family(family):
        from corp_cli.errors import InputError

        raise InputError(
            f"corp {what}: {model} is a Hugging Face encoder, but a timm model is expected here; "
            "compare HF models with HF models and timm models with timm models"
        )

"""The commands' model loading, for Hugging Face models (the dispatch target of commands.calibrate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corp_cli.errors import InputError
from corp_cli.hf.models import load_hf_model_and_preprocessing
from corp_cli.models import LoadedModel, resolve_device


def load_hf_for_command(
    model: str, checkpoint: Path | None, num_classes: int | None, pretrained_cfg: Path | None,
    overrides: dict[str, Any], device: str,
) -> tuple[LoadedModel, Any]:
    """Refuse the timm-only options (their meaning is fixed by the HF folder), then load."""
    if checkpoint is not None:
        raise InputError(f"{model} is a Hugging Face model; --checkpoint applies only to timm names")
    if num_classes is not None:
        raise InputError(f"{model} is a Hugging Face model; its classifier size comes from its config.json")
    if pretrained_cfg is not None or any(v is not None for v in (overrides or {}).values()):
        raise InputError(f"{model} is a Hugging Face model; its preprocessing comes from its own folder")
    return load_hf_model_and_preprocessing(model, resolve_device(device))


def check_hf_model_inputs(
    model: str, checkpoint: Path | None, num_classes: int | None, pretrained_cfg: Path | None, device: str,
) -> Any:
    """The cheap checks before any weight is read: options that do not apply, config.json's model type."""
    if checkpoint is not None:
        raise InputError(f"{model} is a Hugging Face model; --checkpoint applies only to timm names")
    if num_classes is not None:
        raise InputError(f"{model} is a Hugging Face model; its classifier size comes from its config.json")
    if pretrained_cfg is not None:
        raise InputError(f"{model} is a Hugging Face model; its preprocessing comes from its own folder")
    dev = resolve_device(device)
    if not model.startswith("hf-model:"):
        from corp_cli.hf.models import check_config_file

        check_config_file(Path(model).expanduser())
    return dev


def sweep_measure(
    model: Any, prep: Any, data: str, samples: int | None, seed: int, batch_size: int, workers: int, cache_bytes: int,
) -> tuple[Any, Any, str, int | None]:
    """(measure, evaluation source, what one FLOP count is per, items per evaluation) for `corp sweep`."""
    from corp_cli.hf.models import SOURCE_ATTR, TextPreprocessing, load_tokenizer
    from corp_cli.hf.sweep import ImageEmbeddingMeasure, TextMeasure

    if isinstance(prep, TextPreprocessing):
        from corp_cli.hf.text import open_text_source

        source = open_text_source(data, samples=samples, seed=seed)
        measure: Any = TextMeasure(load_tokenizer(getattr(model, SOURCE_ATTR)), source.texts, prep, batch_size)
        return measure, source, f"{prep.max_length}-token sequence", len(source.texts)
    from corp_cli.data import open_source
    from corp_cli.sweep import batch_provider

    source_img = open_source(data, samples=samples, seed=seed)
    pairs = batch_provider(source_img, prep.transform(), batch_size, workers, cache_bytes, prep.input_size)
    classifier = getattr(model, "classifier", None) is not None
    measure = ImageEmbeddingMeasure(lambda: (x for x, _ in pairs()), classifier=classifier)
    return measure, source_img, "image", source_img.num_items

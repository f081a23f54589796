"""Calibration for HF encoders: text through the model's own tokenizer, images through corp's image path."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from corp_cli.adapters import adapter_for
from corp_cli.calibrate import PARTS, calibrate, collect_statistics
from corp_cli.errors import InputError
from corp_cli.hf.models import SOURCE_ATTR, TextPreprocessing, load_hf_model_and_preprocessing, load_tokenizer
from corp_cli.hf.text import TextSource, length_order, open_text_source, text_batches
from corp_cli.models import LoadedModel, resolve_device
from corp_cli.stats import Statistics, new_meta

log = logging.getLogger(__name__)


def calibrate_text(
    loaded: LoadedModel,
    prep: TextPreprocessing,
    source: TextSource,
    *,
    batch_size: int = 32,
    parts: tuple[str, ...] = PARTS,
    product_dtype: torch.dtype = torch.float32,
    on_batch: Callable[[int], None] | None = None,
    tokenizer: Any = None,
) -> Statistics:
    """Stream the texts through the encoder once; only real tokens (no padding) are counted."""
    ad = adapter_for(loaded.model)
    tok = tokenizer if tokenizer is not None else load_tokenizer(getattr(loaded.model, SOURCE_ATTR))
    order = length_order(source.texts, tok, prep.max_length)
    batches = text_batches(source.texts, tok, batch_size, prep.max_length, order)
    sums = collect_statistics(loaded.model, batches, parts=parts, product_dtype=product_dtype, on_batch=on_batch)
    meta = new_meta(
        identity=loaded.identity,
        shapes=[ad.shape(i).to_dict() for i in range(len(ad.blocks))],
        parts=list(parts),
        preprocessing=prep.to_dict(),
        data=source.describe(),
        samples=sums.samples,
        tokens=sums.tokens,
        seed=source.seed,
        shard=source.shard,
        product_dtype=str(product_dtype).removeprefix("torch."),
    )
    return Statistics(blocks=sums.blocks, meta=meta)


def open_hf_calibration(
    model: str, *, data: str, samples: int | None, seed: int, shard: tuple[int, int] | None, device: str,
) -> tuple[Any, LoadedModel, Any]:
    """Open the data (text for text models, images for ViT/DeiT), then load the model: cheap checks first."""
    from corp_cli.hf.models import TEXT_TYPES, model_type_of, resolve_dir

    folder = resolve_dir(model)
    if model_type_of(folder) in TEXT_TYPES:
        source: Any = open_text_source(data, samples=samples, seed=seed, shard=shard)
    else:
        from corp_cli.data import open_source

        source = open_source(data, samples=samples, seed=seed, shard=shard)
    loaded, prep = load_hf_model_and_preprocessing(model, resolve_device(device))
    return source, loaded, prep


def calibrate_hf_opened(
    loaded: LoadedModel, prep: Any, source: Any, *, batch_size: int, workers: int, parts: tuple[str, ...], precision: str,
) -> tuple[Statistics, float]:
    """The pass over the data; text goes through the tokenizer, images through corp's image path."""
    if precision not in ("float32", "float64"):
        raise InputError(f"--precision must be float32 or float64, got {precision!r}")
    from corp_cli.commands import common as C

    dtype = getattr(torch, precision)
    t0 = time.perf_counter()
    if isinstance(source, TextSource):
        if not isinstance(prep, TextPreprocessing):
            raise InputError(f"{source.spec} is text, but {loaded.identity.name} is not a text model")
        with C.progress_bar(f"calibrating {loaded.identity.name}", source.num_items, unit="texts") as advance:
            stats = calibrate_text(loaded, prep, source, batch_size=batch_size, parts=parts, product_dtype=dtype, on_batch=advance)
    else:
        with C.progress_bar(f"calibrating {loaded.identity.name}", source.num_items) as advance:
            stats = calibrate(loaded, prep, source, batch_size=batch_size, workers=workers, parts=parts,
                              product_dtype=dtype, on_batch=advance)
    return stats, time.perf_counter() - t0


def run_hf_calibration(
    model: str, *, data: str, samples: int | None, seed: int, shard: tuple[int, int] | None,
    checkpoint: Path | None, device: str, batch_size: int, workers: int, parts: tuple[str, ...], precision: str,
) -> tuple[Statistics, LoadedModel, Any, float]:
    """What commands.calibrate.run_calibration does, for an HF model folder or hub id."""
    from corp_cli.hf.commands import check_hf_model_inputs

    check_hf_model_inputs(model, checkpoint, None, None, device)
    source, loaded, prep = open_hf_calibration(model, data=data, samples=samples, seed=seed, shard=shard, device=device)
    stats, seconds = calibrate_hf_opened(loaded, prep, source, batch_size=batch_size, workers=workers, parts=parts,
                                         precision=precision)
    return stats, loaded, prep, seconds

"""Hugging Face hub settings that must be read when corp runs, not when a library was imported."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_requested() -> bool:
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for v in _OFFLINE_ENV)


@contextlib.contextmanager
def offline_from_env() -> Iterator[None]:
    """Apply HF_*_OFFLINE as set now.

    huggingface_hub and datasets read these variables once, at import; without this a
    variable set later is ignored and a missing dataset costs ~25 s of network retries.
    """
    if not offline_requested():
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    candidates = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ]
    targets = [(m, a) for m, a in candidates if hasattr(m, a)]
    saved = [getattr(m, a) for m, a in targets]
    for m, a in targets:
        setattr(m, a, True)
    try:
        yield
    finally:
        for (m, a), v in zip(targets, saved):
            setattr(m, a, v)

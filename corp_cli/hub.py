"""Hugging Face hub settings that must be read when corp runs, not when a library was imported."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_requested() -> bool:
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for v in _OFFLINE_ENV)


# How long a reachability probe of the hub may take before the hub counts as unreachable.
PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> bool:
    """True when the hub's host cannot be resolved or connected to within PROBE_TIMEOUT_S.

    Without this, an offline machine spends ~30 s in huggingface_hub's retries (and
    prints a line per retry) before the one-line error; with it, the hub libraries run in
    offline mode at once, so the local cache still works and a miss fails fast.
    """
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # DNS lookups have no timeout of their own
    t.start()
    t.join(PROBE_TIMEOUT_S)
    if not ok:
        log.info("the Hugging Face hub (%s) is unreachable; using the local cache only", host)
    return not ok


@contextlib.contextmanager
def offline_from_env() -> Iterator[None]:
    """Apply HF_*_OFFLINE as set now.

    huggingface_hub and datasets read these variables once, at import; without this a
    variable set later is ignored and a missing dataset costs ~25 s of network retries.
    """
    if not (offline_requested() or hub_unreachable()):
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


def transformers_module() -> Any:
    """`transformers`, imported on first use (an optional dependency), with its own chatter off."""
    try:
        import transformers
    except ImportError:
        from corp_cli.errors import InputError

        raise InputError(
            "Hugging Face models and tokenizers need the optional `transformers` dependency: pip install 'corp-cli[hf]'"
        ) from None
    # its load reports and progress bars would clutter corp's own output (stdout is for results)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers

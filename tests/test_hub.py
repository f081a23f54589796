"""An unreachable hub is detected up front: a cache miss fails in one line, without retries."""

from __future__ import annotations

import time

import pytest

from corp_cli import hub
from corp_cli.errors import InputError


def test_unreachable_hub_switches_the_hub_libraries_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    from corp_cli.data import open_source

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    # as if the libraries had been imported on a machine with no offline variables set
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(datasets.config, attr):
            monkeypatch.setattr(datasets.config, attr, False)
    monkeypatch.setenv("HF_ENDPOINT", "https://corp-test-no-such-host.invalid")
    hub.hub_unreachable.cache_clear()
    try:
        assert hub.hub_unreachable()
        t = time.perf_counter()
        with pytest.raises(InputError, match="could not be loaded"):
            open_source("hf:corp-test/no-such-dataset@validation", samples=2)
        assert time.perf_counter() - t < 10, "the hub libraries retried the network"
    finally:
        hub.hub_unreachable.cache_clear()

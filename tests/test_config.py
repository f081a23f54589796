"""Presets in configs/ are valid, and the YAML reader is strict."""

from __future__ import annotations

from pathlib import Path

import pytest

from corp_cli.config import load_prune_config
from corp_cli.errors import InputError
from corp_cli.pruning import PruneOptions

from .conftest import REPO

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_builds_prune_options(path: Path) -> None:
    opts = PruneOptions(**load_prune_config(path))
    assert 0 < opts.mlp_sparsity < 1


def test_presets_exist() -> None:
    assert len(PRESETS) >= 3


def test_sparsity_key_sets_both_and_blocks_are_parsed(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("sparsity: 0.3\nlambda: auto\nblocks:\n  '2': {sparsity: 0.1}\n")
    opts = PruneOptions(**load_prune_config(p))
    assert opts.mlp_sparsity == opts.attn_sparsity == 0.3 and opts.lam is None
    assert opts.for_block(2).mlp_sparsity == 0.1 and opts.for_block(3).mlp_sparsity == 0.3


@pytest.mark.parametrize(
    "text, needle",
    [
        ("sparsty: 0.5\n", "unknown key 'sparsty'"),
        ("blocks:\n  0: {ranker2: energy}\n", "unknown key 'ranker2'"),
        ("blocks:\n  x: {sparsity: 0.1}\n", "not an integer"),
        ("- a\n- b\n", "expected a mapping"),
        ("target: [\n", "not valid YAML"),
    ],
)
def test_bad_configs_are_errors(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(InputError, match=needle.replace("[", r"\[")):
        PruneOptions(**load_prune_config(p))

"""Model names as users write them: short names resolve by a documented rule, misses list what corp can prune."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from corp_cli.cli import app
from corp_cli.errors import InputError, UnsupportedModelError
from corp_cli.registry import resolve

runner = CliRunner()


@pytest.mark.parametrize("short, full", [
    ("deit_base", "deit_base_patch16_224"),  # the prefix's patch-16 224-px model
    ("vit_small", "vit_small_patch16_224"),
    ("vit_huge", "vit_huge_patch14_224"),  # the only 224-px vit_huge
    ("eva02_small", "eva02_small_patch14_224"),
    ("deit_tiny_patch16_224", "deit_tiny_patch16_224"),  # full names are themselves
])
def test_short_names_resolve_to_the_plain_224px_model(short: str, full: str) -> None:
    fam, name = resolve(short)
    assert name == full and fam.claim(full)


def test_a_prefix_with_a_real_choice_lists_the_candidates_corp_can_prune() -> None:
    with pytest.raises(InputError) as e:
        resolve("deit")
    msg = str(e.value)
    assert "ambiguous" in msg and "deit_tiny_patch16_224" in msg and "deit_base_patch16_224" in msg


def test_unknown_names_suggest_only_models_corp_can_prune() -> None:
    with pytest.raises(InputError) as e:
        resolve("deit_bse_patch16_224")
    assert "deit_base_patch16_224" in str(e.value)
    assert "rdnet" not in str(e.value) and "davit" not in str(e.value)


def test_a_timm_model_of_another_architecture_says_what_corp_prunes() -> None:
    with pytest.raises(UnsupportedModelError) as e:
        resolve("resnet18")
    assert "timm.models.resnet" in str(e.value) and "timm-vit prunes" in str(e.value)


def test_the_cli_says_which_name_a_short_name_became(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    res = runner.invoke(app, ["calibrate", "deit_tiny", "--checkpoint", str(tiny_ckpt), "--data", "synthetic",
                              "--samples", "2", "--out", str(out), "--json", "-"])
    assert res.exit_code == 0, res.output
    assert "deit_tiny resolved to deit_tiny_patch16_224" in res.stderr
    assert '"name": "deit_tiny_patch16_224"' in res.stdout


def test_data_errors_name_the_flag_of_the_command(tiny_ckpt: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["prune", "deit_tiny_patch16_224", "--checkpoint", str(tiny_ckpt), "--calib-data",
                              "text:pydoc", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--calib-data" in res.stderr and "--data" not in res.stderr.replace("--calib-data", "")

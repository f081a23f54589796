"""timm model options (--model-arg, a preset's model_kwargs, a checkpoint's metadata): DINOv2 at 224 px."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from corp_cli.cli import app
from corp_cli.family import ModelOptions
from corp_cli.loading import load_dense
from corp_cli.masks import load_masks
from corp_cli.stats import Statistics

from .conftest import calib_images, masked_reference

runner = CliRunner()
NAME = "vit_small_patch14_dinov2"  # timm builds it for 518 px (37 x 37 patches) by default


@pytest.fixture(scope="module")
def ckpt518(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init, 2-block DINOv2-style backbone saved at its default 518 px."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, depth=2)
    assert tuple(model.patch_embed.img_size) == (518, 518) and model.pos_embed.shape[1] == 37 * 37 + 1
    path = tmp_path_factory.mktemp("dino") / "dino518.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def pruned224(ckpt518: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dino224") / "pruned"
    res = runner.invoke(app, ["prune", NAME, "--checkpoint", str(ckpt518), "--model-arg", "img_size=224",
                              "--model-arg", "depth=2", "--calib-data", "synthetic", "--samples", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "position embedding resampled from 37x37 to 16x16 patches" in res.stderr
    return out


@pytest.mark.slow
def test_dinov2_saved_at_518_prunes_at_224_and_reloads_as_the_masked_model(
    ckpt518: Path, pruned224: Path, tmp_path: Path,
) -> None:
    x = calib_images(2, seed=4)
    torch.save({"x": x}, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        "from corp_cli import load_pruned\n"
        f"m = load_pruned({str(pruned224)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})['x']\n"
        "assert tuple(m.patch_embed.img_size) == (224, 224) and m.pos_embed.shape[1] == 16 * 16 + 1\n"
        "with torch.no_grad():\n"
        f"    torch.save(m.forward_head(m.forward_features(x), pre_logits=True), {str(tmp_path / 'y.pt')!r})\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    dense = load_dense(NAME, ModelOptions(checkpoint=ckpt518, model_args={"img_size": 224, "depth": 2}))
    masks, _ = load_masks(pruned224 / "masks.safetensors")
    report = json.loads((pruned224 / "report.json").read_text())
    ref = masked_reference(dense, masks, Statistics.load(pruned224 / "stats.safetensors"), report["blocks"])
    with torch.no_grad():
        expected = ref.family.outputs(ref, {"pixel_values": x}).features
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-4, atol=1e-4)


def test_the_options_travel_in_every_artifact(pruned224: Path) -> None:
    stats = Statistics.load(pruned224 / "stats.safetensors")
    assert stats.meta["model"]["model_args"] == {"depth": 2, "img_size": 224}
    assert stats.meta["preprocessing"]["input_size"] == [3, 224, 224]  # the input size follows img_size
    _, meta = load_masks(pruned224 / "masks.safetensors")
    assert meta["model"]["model_args"] == {"depth": 2, "img_size": 224}
    from corp_cli.compact import read_pruned

    arch = read_pruned(pruned224)[1]["architecture"]
    assert arch["model_kwargs"] == {"depth": 2, "img_size": 224, "num_classes": 0}


def test_statistics_of_another_configuration_are_refused_naming_both(ckpt518: Path, pruned224: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["prune", NAME, "--checkpoint", str(ckpt518), "--model-arg", "depth=2", "--model-arg",
                              "img_size=252", "--stats", str(pruned224 / "stats.safetensors"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert "img_size=224" in res.stderr and "img_size=252" in res.stderr


def test_unknown_model_args_list_the_accepted_ones(ckpt518: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["calibrate", NAME, "--checkpoint", str(ckpt518), "--model-arg", "img_sise=224",
                              "--data", "synthetic", "--out", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 2
    assert "img_sise" in res.stderr and "img_size" in res.stderr and "dynamic_img_size" in res.stderr


def test_an_input_size_the_model_is_not_built_for_fails_up_front_naming_the_fix(ckpt518: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["calibrate", NAME, "--checkpoint", str(ckpt518), "--model-arg", "depth=2",
                              "--input-size", "224", "--data", "synthetic", "--out", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 2, res.output
    assert "built for 518x518" in res.stderr and "--model-arg img_size=224" in res.stderr


def test_a_preset_and_a_checkpoint_can_carry_the_options(ckpt518: Path, tmp_path: Path) -> None:
    preset = tmp_path / "dino224.yaml"
    preset.write_text("model_kwargs: {img_size: 224, depth: 2}\ntarget: mlp\n")
    out = tmp_path / "p"
    res = runner.invoke(app, ["prune", NAME, "--checkpoint", str(ckpt518), "--config", str(preset),
                              "--calib-data", "synthetic", "--samples", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["model"]["model_args"] == {"depth": 2, "img_size": 224}
    # a checkpoint whose metadata names the options needs no flags at all
    from safetensors.torch import load_file

    tagged = tmp_path / "tagged.safetensors"
    save_file(load_file(str(ckpt518)), str(tagged), metadata={"model_kwargs": json.dumps({"img_size": 224, "depth": 2})})
    loaded = load_dense(NAME, ModelOptions(checkpoint=tagged))
    assert tuple(loaded.model.patch_embed.img_size) == (224, 224) and loaded.identity.model_args == {"img_size": 224, "depth": 2}


def test_hugging_face_folders_refuse_model_args(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "vit"
    transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                 intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(folder)
    res = runner.invoke(app, ["calibrate", str(folder), "--model-arg", "image_size=64", "--data", "synthetic",
                              "--out", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 2 and "--model-arg" in res.stderr and "config.json" in res.stderr

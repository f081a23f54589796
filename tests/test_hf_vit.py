"""Hugging Face ViT/DeiT image classifiers (random init from a config, no download): compact == masked, reload, CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from corp_cli.calibration import collect_statistics  # noqa: E402
from corp_cli.compact import architecture, load_pruned  # noqa: E402
from corp_cli.pruning import PruneOptions, apply_masks, plan_masks  # noqa: E402
from corp_cli.stats import Statistics  # noqa: E402

from .conftest import adopt, save_model  # noqa: E402


def tiny(kind: str = "vit", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  image_size=32, patch_size=8, num_labels=10)
    if kind == "deit":
        return transformers.DeiTForImageClassification(transformers.DeiTConfig(**common)).eval()
    return transformers.ViTForImageClassification(transformers.ViTConfig(**common)).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)


def _stats(model: torch.nn.Module, x: torch.Tensor) -> Statistics:
    sums = collect_statistics(model, [x[:8], x[8:]], product_dtype=torch.float64)
    return Statistics(blocks=sums.blocks, meta={})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_pruned_hf_vit_and_deit_reload_as_their_own_class(tmp_path: Path, kind: str) -> None:
    """Per-block widths survive the reload (compact == masked: test_family_contract)."""
    dense = tiny(kind)
    stats = _stats(dense, images(16))
    opts = PruneOptions(target="both", mlp_sparsity=0.5, attn_sparsity=0.5, block_overrides={0: {"mlp_sparsity": 0.25}})
    pruned = copy.deepcopy(dense)
    masks = plan_masks(pruned, stats, opts)
    apply_masks(pruned, stats, masks, opts)
    layers = pruned.base_model.layers
    assert layers[0].mlp.fc1.out_features == 96 and layers[1].mlp.fc1.out_features == 64
    assert layers[1].attention.q_proj.out_features == 4 * 8 and layers[1].attention.v_proj.out_features == 64
    y = images(3, seed=1)
    with torch.no_grad():
        got = pruned(pixel_values=y).logits

    arch = architecture(adopt(pruned))
    assert arch["family"] == "hf-vit" and arch["tokenizer"] is None
    save_model(tmp_path, pruned)
    torch.save({"x": y, "y": got}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        "from corp_cli import load_pruned\n"
        f"m = load_pruned({str(tmp_path)!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    ok = torch.allclose(m(pixel_values=io['x']).logits, io['y'], rtol=0, atol=1e-6)\n"
        "print('class', type(m).__name__, m.base_model.layers[0].mlp.fc1.out_features)\n"
        "sys.exit(0 if ok else 3)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"class {type(dense).__name__} 96" in res.stdout


def test_cli_chain_on_a_local_hf_vit_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from corp_cli.cli import app

    folder = tmp_path / "vit"
    tiny("vit").save_pretrained(folder)
    out = tmp_path / "pruned"
    r = CliRunner().invoke(app, ["prune", str(folder), "--calib-data", "synthetic", "--samples", "8", "--sparsity", "0.5",
                                 "--batch-size", "4", "--workers", "0", "--out", str(out), "--json", "-"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["synthetic"] is True
    assert report["totals"]["params_after"] < report["totals"]["params_before"]
    model = load_pruned(out)
    assert isinstance(model, transformers.ViTForImageClassification)
    assert model.base_model.layers[0].attention.q_proj.out_features == 32
    r = CliRunner().invoke(app, ["evaluate", str(out), "--data", "synthetic", "--samples", "6", "--json", "-"])
    assert r.exit_code == 0, r.output
    fid = json.loads(r.stdout)["results"]["fidelity"]
    assert 0.0 < fid["feature_cosine_mean"] <= 1.0 and 0.0 <= fid["top1_agreement"] <= 1.0


def test_sweep_on_an_hf_vit_matches_prune_then_evaluate(tmp_path: Path) -> None:
    """The sweep's CORP point is the model `corp prune` writes, scored as `corp evaluate` scores it."""
    from typer.testing import CliRunner

    from corp_cli.cli import app

    runner = CliRunner()
    folder = tmp_path / "vit"
    tiny("vit").save_pretrained(folder)
    stats = tmp_path / "stats.safetensors"
    common = ["--batch-size", "4", "--workers", "0"]
    r = runner.invoke(app, ["calibrate", str(folder), "--data", "synthetic", "--samples", "8", "--out", str(stats), *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["sweep", str(folder), "--stats", str(stats), "--sparsities", "0.5", "--data", "synthetic",
                            "--samples", "6", "--out", str(tmp_path / "sweep"), "--json", "-", *common])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["metric"] == "top1_agreement" and rep["per_item"] == "image"  # a classifier: agreement of its logits
    corp_row = next(p for p in rep["points"] if p["arm"] == "corp")
    r = runner.invoke(app, ["prune", str(folder), "--stats", str(stats), "--sparsity", "0.5", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", str(tmp_path / "p"), "--data", "synthetic", "--samples", "6", "--json", "-", *common])
    assert r.exit_code == 0, r.output
    fid = json.loads(r.stdout)["results"]["fidelity"]
    assert corp_row["feature_cosine_mean"] == pytest.approx(fid["feature_cosine_mean"], abs=1e-6)
    assert corp_row["top1_agreement"] == fid["top1_agreement"]
    r = runner.invoke(app, ["sweep", str(folder), "--stats", str(stats), "--labels", "--data", "synthetic",
                            "--out", str(tmp_path / "s2")])
    assert r.exit_code == 2 and "synthetic images have no labels" in r.output
    assert not (tmp_path / "s2").exists()


def test_unsupported_hf_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from corp_cli.cli import app

    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = CliRunner().invoke(app, ["prune", str(folder), "--calib-data", "text:pydoc", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "model_type 'gpt2' is not supported" in r.output


def test_hub_id_offline_miss_is_one_clear_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from corp_cli.cli import app

    r = CliRunner().invoke(app, ["prune", "hf-model:nobody/no-such-model", "--calib-data", "text:pydoc",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "could not fetch 'nobody/no-such-model'" in r.output and "Traceback" not in r.output

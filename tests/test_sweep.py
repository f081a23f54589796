"""`corp sweep`: one statistics file, both arms at every sparsity, sweep.csv / sweep.json / sweep.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from corp_cli.cli import app
from corp_cli.errors import InputError
from corp_cli.sweep import have_matplotlib, parse_sparsities

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    ckpt = root / "dense.safetensors"
    save_file(timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict(), str(ckpt))
    stats = root / "stats.safetensors"
    res = runner.invoke(app, ["calibrate", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), "--data", "synthetic",
                              "--samples", "4", "--workers", "0", "--out", str(stats)])
    assert res.exit_code == 0, res.stderr
    return ckpt, stats


def test_sweep_writes_csv_json_and_plot(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    ckpt, stats = inputs  # one sparsity keeps this fast; parse_sparsities covers the lists
    out = tmp_path / "sweep"
    res = runner.invoke(app, [
        "sweep", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), "--stats", str(stats), "--sparsities", "0.5",
        "--target", "both", "--data", "synthetic", "--samples", "3", "--batch-size", "3", "--workers", "0",
        "--out", str(out),
    ])
    assert res.exit_code == 0, res.stderr
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["sparsity"], r["arm"]) for r in rows] == [
        ("0.0", "dense"), ("0.5", "corp"), ("0.5", "no-compensation"),
    ]
    assert all(r["metric"] == "top1_agreement" for r in rows)  # synthetic images: fidelity, not accuracy
    flops = {r["sparsity"]: int(r["flops_per_item"]) for r in rows}
    assert flops["0.0"] > flops["0.5"] and float(rows[1]["flops_reduction"]) > 0.3
    # both arms share masks, so the same FLOPs, but compensation changes the weights and so the outputs
    pairs = {(r["sparsity"], r["arm"]): r for r in rows}
    assert pairs[("0.5", "corp")]["flops_per_item"] == pairs[("0.5", "no-compensation")]["flops_per_item"]
    assert pairs[("0.5", "corp")]["kl_mean"] != pairs[("0.5", "no-compensation")]["kl_mean"]

    rep = json.loads((out / "sweep.json").read_text())
    assert rep["sparsities"] == [0.5] and rep["metric"] == "top1_agreement"
    assert rep["stats"]["fingerprint"].startswith("sha256:") and rep["options"]["target"] == "both"
    assert rep["dense"]["top1_agreement"] == 1.0 and len(rep["points"]) == 2
    assert rep["data"]["count"] == 3
    png = out / "sweep.png"
    if have_matplotlib():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert "sweep.png" in rep["files"]
    else:
        assert not png.exists() and "matplotlib" in res.stderr


def test_sweep_refuses_nonempty_out_and_foreign_stats(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    ckpt, stats = inputs
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    base = ["sweep", "deit_tiny_patch16_224", "--stats", str(stats), "--data", "synthetic", "--samples", "2"]
    res = runner.invoke(app, [*base, "--checkpoint", str(ckpt), "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.stderr
    other = tmp_path / "other.safetensors"
    torch.manual_seed(5)
    save_file(timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict(), str(other))
    res = runner.invoke(app, [*base, "--checkpoint", str(other), "--out", str(tmp_path / "new")])
    assert res.exit_code == 2 and not (tmp_path / "new").exists()


def test_parse_sparsities() -> None:
    assert parse_sparsities("0.1,0.2,...,0.7") == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert parse_sparsities("0.5, 0.25,0.5") == [0.25, 0.5]
    for bad in ("0.1,...,0.5", "0.5,1.0", "a,b", "0.3,0.2,...,0.7"):
        with pytest.raises(InputError):
            parse_sparsities(bad)

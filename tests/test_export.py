"""`corp export`: the exported files run in a fresh process that has neither corp nor timm."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from corp_cli import export as export_mod
from corp_cli.calibration import collect_statistics
from corp_cli.cli import app
from corp_cli.families.timm_vit import QKPrunedAttention
from corp_cli.errors import NumericalError
from corp_cli.pruning import PruneOptions, apply_masks, plan_masks
from corp_cli.stats import Statistics

from .conftest import calib_images, random_model, save_model

DEPTH = 3
# Fails the child if loading the export pulled corp or timm in behind our back.
NO_CORP = "assert 'corp_cli' not in sys.modules and 'timm' not in sys.modules, sorted(m for m in sys.modules if m.split('.')[0] in ('corp_cli', 'timm'))\n"


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random deit_tiny with half its MLP units and half its Q/K dims pruned, saved as corp would.

    Three blocks instead of twelve: export time grows with depth, and every block is the same.
    """
    model = random_model(depth=DEPTH)
    x = calib_images(6)
    stats = Statistics(blocks=collect_statistics(model, [x[:3], x[3:]]).blocks, meta={})
    opts = PruneOptions(target="both", mlp_sparsity=0.5, attn_sparsity=0.5)
    apply_masks(model, stats, plan_masks(model, stats, opts), opts)
    assert all(isinstance(b.attn, QKPrunedAttention) and b.attn.qk_dim == 32 for b in model.blocks)
    assert all(b.mlp.fc1.out_features == 384 for b in model.blocks)
    out = tmp_path_factory.mktemp("pruned")
    return save_model(out, model)


@pytest.fixture(scope="module")
def probe(pruned_dir: Path) -> tuple[Path, torch.Tensor]:
    """Inputs of two batch sizes and the pruned model's outputs on them, saved for the children."""
    from corp_cli.compact import load_pruned

    model = load_pruned(pruned_dir)
    g = torch.Generator().manual_seed(1)
    xs = {"x1": torch.randn(1, 3, 224, 224, generator=g), "x3": torch.randn(3, 3, 224, 224, generator=g)}
    with torch.no_grad():
        ys = {k.replace("x", "y"): model(v) for k, v in xs.items()}
    path = pruned_dir.parent / "probe.safetensors"
    save_file({**xs, **ys}, str(path))
    return path, ys["y3"]


def _run_child(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout

@pytest.mark.slow

def test_torch_export_runs_without_corp_or_timm(pruned_dir: Path, probe: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    out = tmp_path / "sub" / "model.pt2"
    res = CliRunner().invoke(app, ["export", str(pruned_dir), "--format", "torch-export", "--out", str(out), "--json", "-"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["dynamic_batch"] is True and summary["input_shape"] == ["batch", 3, 224, 224]
    assert summary["max_abs_diff"] is not None and summary["max_abs_diff"] < 1e-4
    side = json.loads((tmp_path / "sub" / "model.pt2.json").read_text())
    assert side["architecture"]["base_model"] == "deit_tiny_patch16_224"
    assert [b["qk_dim"] for b in side["architecture"]["blocks"]] == [32] * DEPTH
    assert side["dynamic_batch"] is True and side["load"].startswith("torch.export.load")
    assert side["inputs"] == [{"name": "image", "shape": ["batch", 3, 224, 224], "dtype": "float32",
                               "description": "normalised images; see preprocessing"}]
    assert side["outputs"][0]["name"] == "logits" and side["outputs"][0]["shape"] == ["batch", 1000]
    assert side["family"] == "timm-vit" and side["dynamic_dims"] == {"batch": [1, 1 << 16]}
    assert side["source"]["sha256"] and side["sha256"]
    assert [p.name for p in (tmp_path / "sub").iterdir() if p.name.startswith(".")] == []  # no temp left

    probe_path, _ = probe
    stdout = _run_child(f"""
        import sys, torch
        from safetensors.torch import load_file
        t = load_file({str(probe_path)!r})
        m = torch.export.load({str(out)!r}).module()
        {NO_CORP}
        with torch.no_grad():
            for b in ("1", "3"):  # two batch sizes: the batch dimension really is dynamic
                y = m(t["x" + b])
                assert y.shape == t["y" + b].shape, (y.shape, t["y" + b].shape)
                d = (y - t["y" + b]).abs().max().item()
                assert d < 1e-4, d
                print("diff", b, d)
        {NO_CORP}
    """)
    assert stdout.count("diff") == 2


def test_static_fallback_when_batch_cannot_be_dynamic(
    pruned_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*_: object) -> object:
        raise RuntimeError("symbolic batch not supported here")

    monkeypatch.setattr(export_mod, "_dynamic_dim", refuse)
    out = tmp_path / "m.pt2"
    with caplog.at_level("WARNING", logger="corp_cli.export"):
        res = export_mod.export_model(pruned_dir, "torch-export", out, batch_size=2)
    assert res.dynamic_batch is False and res.input_shape == [2, 3, 224, 224]
    assert "could not be made dynamic" in caplog.text and "static batch of 2" in caplog.text
    assert "could not be made dynamic" in json.loads((tmp_path / "m.pt2.json").read_text())["notes"][0]
    ep = torch.export.load(str(out))
    with torch.no_grad():
        assert ep.module()(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


def test_failed_verification_writes_nothing(pruned_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bad(name: str, got: torch.Tensor, expected: torch.Tensor) -> float:
        raise NumericalError(f"exported {name} disagrees (test)")

    monkeypatch.setattr(export_mod, "_check", bad)
    out = tmp_path / "m.pt2"
    with pytest.raises(NumericalError):
        export_mod.export_model(pruned_dir, "torch-export", out, dynamic_batch=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_overwrite(pruned_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt2"
    out.write_bytes(b"keep me")
    res = CliRunner().invoke(app, ["export", str(pruned_dir), "--out", str(out)])
    assert res.exit_code == 2
    assert "--overwrite" in res.output and len(res.output.strip().splitlines()) == 1
    assert out.read_bytes() == b"keep me"


def test_onnx_without_the_package_says_how_to_install(pruned_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_mod, "onnx_available", lambda: False)
    res = CliRunner().invoke(app, ["export", str(pruned_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'corp-cli[onnx]'" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_a_usage_error(pruned_dir: Path) -> None:
    res = CliRunner().invoke(app, ["export", str(pruned_dir), "--format", "tflite"])
    assert res.exit_code == 2 and "torch-export, onnx" in res.output

@pytest.mark.slow

def test_onnx_runs_in_onnxruntime_without_corp_or_timm(pruned_dir: Path, probe: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    res = export_mod.export_model(pruned_dir, "onnx", out)
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-4
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    meta = json.loads(props["corp"])
    assert meta["architecture"]["base_model"] == "deit_tiny_patch16_224"
    assert meta["dynamic_batch"] is res.dynamic_batch and meta["inputs"][0]["name"] == "image"

    probe_path, _ = probe
    stdout = _run_child(f"""
        import sys
        import numpy as np
        import onnxruntime as ort
        from safetensors.numpy import load_file
        t = load_file({str(probe_path)!r})
        s = ort.InferenceSession({str(out)!r}, providers=["CPUExecutionProvider"])
        {NO_CORP}
        assert "torch" not in sys.modules  # the ONNX file needs no torch either
        batches = ("1", "3") if {res.dynamic_batch!r} else ("1",)
        for b in batches:
            (y,) = s.run(None, {{"image": t["x" + b]}})
            d = float(np.abs(y - t["y" + b]).max())
            assert d < 1e-4, d
            print("diff", b, d)
    """)
    assert stdout.count("diff") == (2 if res.dynamic_batch else 1)

"""What a new user hits first: backbones without a classifier, batch-job logs, help, closed pipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from corp_cli.cli import app
from corp_cli.commands import common as C

runner = CliRunner()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(a headless random deit_tiny checkpoint, its pruned DIR, an ImageNet-style synset folder)."""
    root = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0)
    ckpt = root / "backbone.safetensors"
    save_file(model.state_dict(), str(ckpt))
    images = root / "val"
    g = torch.Generator().manual_seed(0)
    for synset in ("n01440764", "n01443537"):  # real ImageNet synsets: the labels a head would need
        (images / synset).mkdir(parents=True)
        for k in range(3):
            px = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(images / synset / f"{k}.png")
    out = root / "pruned"
    res = runner.invoke(app, ["prune", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), "--calib-data", str(images),
                              "--workers", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return ckpt, out, images


def test_a_backbone_is_evaluated_on_its_features_without_labels(backbone: tuple[Path, Path, Path]) -> None:
    ckpt, pruned, images = backbone
    res = runner.invoke(app, ["evaluate", str(pruned), "--data", str(images), "--workers", "0",
                              "--reference", "deit_tiny_patch16_224", "--reference-checkpoint", str(ckpt), "--json", "-"])
    assert res.exit_code == 0, res.output
    assert "note: deit_tiny_patch16_224 has no classifier: scoring the fidelity of its pooled features, no labels" in res.stderr
    rep = json.loads(res.stdout)
    fid = rep["results"]["fidelity"]
    assert "accuracy" not in rep["results"] and rep["data"]["labels"] is False
    assert "top1_agreement" not in fid and "kl_mean" not in fid  # logits of a backbone mean nothing
    assert 0.0 < fid["feature_cosine_mean"] < 1.0 and 0.0 <= fid["nn_agreement"] <= 1.0
    assert fid["compared"] == 6


def test_labels_asked_for_on_a_backbone_are_refused(backbone: tuple[Path, Path, Path]) -> None:
    _, pruned, images = backbone
    res = runner.invoke(app, ["evaluate", str(pruned), "--data", str(images), "--labels"])
    assert res.exit_code == 2 and "has no classifier" in res.stderr


def test_a_backbone_sweep_scores_feature_fidelity(backbone: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ckpt, pruned, images = backbone
    res = runner.invoke(app, ["sweep", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), "--stats",
                              str(pruned / "stats.safetensors"), "--data", str(images), "--workers", "0",
                              "--sparsities", "0.5", "--out", str(tmp_path / "sw"), "--json", "-"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["metric"] == "feature_cosine_mean" and rep["dense"]["value"] == 1.0
    assert all(p["top1_agreement"] is None for p in rep["points"])


def test_plain_progress_is_quiet_for_short_runs_and_bounded_for_long_ones() -> None:
    now = [0.0]
    lines: list[str] = []
    p = C.PlainProgress("calibrating m", 100, "images", every=30.0, clock=lambda: now[0], write=lines.append)
    for _ in range(10):  # 10 images in 10 s: shorter than the interval, nothing is printed
        now[0] += 1.0
        p.advance(1)
    assert lines == []
    for _ in range(90):  # then one image every 2 s: a line per 10% (every 20 s here), none in between
        now[0] += 2.0
        p.advance(1)
    p.close()
    assert 8 <= len(lines) <= 10, lines
    assert lines[0].startswith("calibrating m: ") and "images/s" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("calibrating m: 100/100 images (100%)") and lines[-1].endswith("done")


def test_plain_progress_without_a_total_prints_by_time() -> None:
    now = [0.0]
    lines: list[str] = []
    p = C.PlainProgress("calibrating m", None, "texts", every=30.0, clock=lambda: now[0], write=lines.append)
    for _ in range(100):
        now[0] += 1.0
        p.advance(5)
    assert len(lines) == 3 and "texts/s" in lines[0]  # at 30, 60 and 90 s


def test_a_batch_log_gets_plain_progress_lines(monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path, tmp_path: Path) -> None:
    monkeypatch.setattr(C, "PLAIN_PROGRESS_EVERY_S", 0.0)
    res = runner.invoke(app, ["calibrate", "deit_tiny_patch16_224", "--checkpoint", str(tiny_ckpt), "--data", "synthetic",
                              "--samples", "4", "--batch-size", "2", "--out", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("calibrating deit_tiny_patch16_224: ")]
    assert lines and lines[-1].startswith("calibrating deit_tiny_patch16_224: 4/4 images (100%)"), res.stderr


def test_calibrate_help_shows_the_options_of_its_default_form() -> None:
    res = runner.invoke(app, ["calibrate", "--help"])
    assert res.exit_code == 0
    for flag in ("--data", "--samples", "--out", "--parts", "--shard"):
        assert flag in res.output
    assert "corp calibrate merge" in res.output


def test_no_compensation_says_so_in_the_table_and_the_summary(tiny_ckpt: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["prune", "deit_tiny_patch16_224", "--checkpoint", str(tiny_ckpt), "--calib-data", "synthetic",
                              "--samples", "2", "--target", "mlp", "--no-compensation", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert "(no compensation)" in res.stdout and "no compensation (the 'none' errors are the ones applied)" in res.stdout


def _closed_early(args: list[str], cwd: Path) -> int:
    """Run corp with stdout read for one line (or none), then closed, as `| head -1` does."""
    code = "import sys; sys.argv = ['corp'] + sys.argv[1:]; from corp_cli.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    assert proc.stdout is not None
    proc.stdout.close()  # before anything is read: the first write hits a closed pipe
    proc.wait(timeout=300)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    return proc.returncode


@pytest.mark.slow
def test_a_closed_stdout_ends_the_command_quietly(tiny_ckpt: Path, tmp_path: Path) -> None:
    assert _closed_early(["--help"], tmp_path) == 0
    assert _closed_early(["prune", "--help"], tmp_path) == 0
    out = tmp_path / "s.safetensors"
    code = _closed_early(["calibrate", "deit_tiny_patch16_224", "--checkpoint", str(tiny_ckpt), "--data", "synthetic",
                          "--samples", "2", "--out", str(out)], tmp_path)
    assert code == 141  # what a shell shows for a writer whose reader went away
    from corp_cli.stats import Statistics

    assert Statistics.load(out).meta["samples"] == 2  # the artifact is whole: written before anything was printed

"""The method on a trained model: real DeiT-tiny weights and real ImageNet / CIFAR-10 images."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from corp_cli import load_pruned
from corp_cli.calibration import calibrate
from corp_cli.data import make_batches, open_source
from corp_cli.family import ModelOptions
from corp_cli.loading import load_dense
from corp_cli.pruning import PruneOptions, apply_masks, plan_masks

from .conftest import CIFAR_CKPT, CIFAR_DIR, IMAGENET_SAMPLE, IN1K_CKPT, needs_shared_data

pytestmark = [needs_shared_data, pytest.mark.slow]


def _split_imagenet(tmp: Path) -> tuple[Path, Path]:
    """250 classes for calibration, the other 250 for evaluation (disjoint images)."""
    synsets = sorted(p.name for p in IMAGENET_SAMPLE.iterdir() if p.is_dir())
    calib, held = tmp / "calib", tmp / "eval"
    for i, s in enumerate(synsets):
        dst = (calib if i % 2 == 0 else held) / s
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(IMAGENET_SAMPLE / s, dst)
    return calib, held


def _top1(model: torch.nn.Module, source_spec: Path, transform, class_names=None, samples: int | None = None) -> float:
    src = open_source(str(source_spec), samples=samples, labels=True, class_names=class_names)
    hits = total = 0
    with torch.inference_mode():
        for x, y in make_batches(src, transform, batch_size=50, num_workers=2):
            hits += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return hits / total


def test_compensation_rescues_half_the_mlp_of_real_deit_tiny(tmp_path: Path) -> None:
    calib_dir, eval_dir = _split_imagenet(tmp_path)
    loaded = load_dense("deit_tiny_patch16_224", ModelOptions(checkpoint=IN1K_CKPT))
    prep = loaded.preprocessing
    tf = prep.transform()
    stats = calibrate(loaded, open_source(str(calib_dir), samples=None), batch_size=50, workers=2)
    dense_acc = _top1(loaded.model, eval_dir, tf)
    accs = {}
    for comp in (True, False):
        model = copy.deepcopy(loaded.model)
        opts = PruneOptions(target="mlp", mlp_sparsity=0.5, compensation=comp)
        apply_masks(model, stats, plan_masks(model, stats, opts), opts)
        accs[comp] = _top1(model, eval_dir, tf)
    print(f"real deit_tiny, 50% MLP, 250 calib / 250 eval: dense {dense_acc:.3f}, "
          f"compensated {accs[True]:.3f}, uncompensated {accs[False]:.3f}")
    assert dense_acc > 0.7
    assert accs[True] > 0.45
    assert accs[False] < 0.3
    assert accs[True] > accs[False] + 0.25


def test_cifar_checkpoint_calibrates_prunes_and_reloads_with_its_own_preprocessing(tmp_path: Path) -> None:
    if not CIFAR_CKPT.is_file() or not CIFAR_DIR.is_dir():
        pytest.skip("CIFAR-10 checkpoint/images not present in ../shared/data")
    from corp_cli.cli import app

    runner = CliRunner()
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", "deit_tiny_patch16_224", "--checkpoint", str(CIFAR_CKPT),
                              "--calib-data", str(CIFAR_DIR / "train"), "--samples", 200, "--target", "mlp",
                              "--sparsity", "0.3", "--out", str(out), "--batch-size", "50", "--json", "-"])
    assert res.exit_code == 0, res.output
    from corp_cli.compact import read_pruned

    meta = read_pruned(out)[1]
    prep = meta["preprocessing"]
    # the checkpoint's own preprocessing (resize to 224x224, no crop, CIFAR mean/std) travels along
    assert prep["crop_pct"] == 1.0 and prep["crop_mode"] == "squash"
    assert prep["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert meta["base"]["num_classes"] == 10
    classes = json.loads(meta["classes"])
    pruned = load_pruned(out)
    assert pruned.num_classes == 10
    from corp_cli.preprocess import Preprocessing

    tf = Preprocessing.from_dict(prep).transform()
    dense = load_dense("deit_tiny_patch16_224", ModelOptions(checkpoint=CIFAR_CKPT)).model
    dense_acc = _top1(dense, CIFAR_DIR / "test", tf, classes, samples=300)
    pruned_acc = _top1(pruned, CIFAR_DIR / "test", tf, classes, samples=300)
    print(f"CIFAR-10 deit_tiny, 30% MLP: dense {dense_acc:.3f}, pruned {pruned_acc:.3f}")
    assert dense_acc > 0.7
    assert pruned_acc > dense_acc - 0.1

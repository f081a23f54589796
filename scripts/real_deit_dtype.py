"""Does a bf16 calibration forward change the pruned model? Real DeiT-tiny, held-out top-1.

    python scripts/real_deit_dtype.py [--data ../shared/data/imagenet-sample]
    python scripts/real_deit_dtype.py --checkpoint ../shared/data/deit_tiny_patch16_224.cifar10.safetensors \
        --calib-data ../shared/data/cifar10/train --eval-data ../shared/data/cifar10/test

Calibrates the real DeiT-tiny ImageNet weights on one half of the shared ImageNet sample
(alternate classes) twice, with an fp32 and a bf16 (autocast) forward (per-batch products
float32, sums float64 either way), prunes each (50% MLP + Q/K, and 50% MLP only), and
scores both on the other half, with the dense model beside them. `--calib-data` and
`--eval-data` give the two halves instead (e.g. the CIFAR-10 fine-tune's 1000 train and
1000 test images: four times the held-out images, half the sampling error).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from corp_cli import api
from corp_cli.evaluate import evaluate
from corp_cli.family import ModelOptions
from corp_cli.loading import load_dense
from corp_cli.sources import open_data

ROOT = Path(__file__).resolve().parents[1]


def split(data: Path, tmp: Path) -> tuple[Path, Path]:
    synsets = sorted(p.name for p in data.iterdir() if p.is_dir())
    calib, held = tmp / "calib", tmp / "eval"
    for i, s in enumerate(synsets):
        dst = (calib if i % 2 == 0 else held) / s
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(data / s, dst)
    return calib, held


def top1(loaded, held: Path) -> float:
    source = open_data(str(held), "image", samples=None, labels=True, class_names=loaded.classes)
    run = evaluate(loaded, loaded.preprocessing.batches(source, 50, 2))
    return run.result["accuracy"]["top1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample")
    ap.add_argument("--checkpoint", type=Path, default=ROOT.parent / "shared" / "data" / "deit_tiny_patch16_224.in1k.safetensors")
    ap.add_argument("--calib-data", type=Path, help="calibration images (with --eval-data: no split of --data)")
    ap.add_argument("--eval-data", type=Path, help="held-out labelled images")
    args = ap.parse_args()
    if (args.calib_data is None) != (args.eval_data is None):
        ap.error("give --calib-data and --eval-data together")
    with tempfile.TemporaryDirectory() as tmp:
        if args.calib_data is not None:
            calib, held = args.calib_data.resolve(), args.eval_data.resolve()
        else:
            calib, held = split(args.data.resolve(), Path(tmp))
        dense = load_dense("deit_tiny_patch16_224", ModelOptions(checkpoint=args.checkpoint))
        print(f"dense top-1 on the held-out half: {100 * top1(dense, held):.1f}%\n")
        print("| calibration forward | target | top-1 with compensation |")
        print("|---|---|---|")
        for dtype in ("fp32", "bf16"):
            source = open_data(str(calib), "image", samples=None)
            stats = api.calibrate(dense, source, batch_size=50, workers=2,
                                  forward_dtype=torch.bfloat16 if dtype == "bf16" else None)
            for target in ("both", "mlp", "attn"):
                result = api.prune(dense, stats, target=target, sparsity=0.5)
                print(f"| {dtype} | {target} | {100 * top1(result.loaded, held):.1f}% |", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Calibration + pruning cost relative to one plain forward pass over the same images.

Measured side by side in one run: the images are decoded once and held in memory, then
(1) a plain forward pass over them, (2) corp's calibration pass (forward + streaming
sums), (3) ranking + compensation + compaction. Prints the ratio (2 + 3) / (1); the
floor is one forward pass plus the Gram products (about 2x for ViT MLPs).

    python scripts/bench_prune.py [--model deit_small_patch16_224] [--images 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import timm
import torch

from corp_cli.calibration import collect_statistics
from corp_cli.data import make_batches, open_source
from corp_cli.preprocess import resolve_preprocessing
from corp_cli.pruning import PruneOptions, apply_masks, plan_masks
from corp_cli.stats import Statistics

SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data", default=str(SHARED_IMAGES) if SHARED_IMAGES.is_dir() else "synthetic")
    ap.add_argument("--precision", choices=["float32", "float64"], default="float32")
    ap.add_argument("--target", default="both")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()  # timing does not depend on the weights
    prep = resolve_preprocessing(model)
    src = open_source(args.data, samples=args.images, seed=0)
    t = time.perf_counter()
    batches = [x for x, _ in make_batches(src, prep.transform(), args.batch_size, num_workers=2)]
    t_decode = time.perf_counter() - t
    n = sum(len(b) for b in batches)

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x in batches:
                model.forward_features(x)
        return time.perf_counter() - t0

    with torch.inference_mode():
        model.forward_features(batches[0])  # warm-up
    t_fwd_a = forward()
    t0 = time.perf_counter()
    sums = collect_statistics(model, batches, product_dtype=getattr(torch, args.precision))
    t_cal = time.perf_counter() - t0
    t_fwd_b = forward()
    t_fwd = min(t_fwd_a, t_fwd_b)

    stats = Statistics(blocks=sums.blocks, meta={})
    pruned = copy.deepcopy(model)
    opts = PruneOptions(target=args.target, mlp_sparsity=0.5, attn_sparsity=0.5)
    t0 = time.perf_counter()
    apply_masks(pruned, stats, plan_masks(pruned, stats, opts), opts)
    t_prune = time.perf_counter() - t0

    result = {
        "model": args.model,
        "images": n,
        "data": args.data,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "product_precision": args.precision,
        "decode_s": round(t_decode, 2),
        "forward_s": round(t_fwd, 2),
        "calibrate_s": round(t_cal, 2),
        "prune_s": round(t_prune, 2),
        "ratio_calibrate_plus_prune_to_forward": round((t_cal + t_prune) / t_fwd, 3),
        "target": "<= 2.5 on CPU",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

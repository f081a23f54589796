"""One-shot vs sequential calibration (dense and self targets), held-out, on the shared real DeiT-tiny.

    python scripts/bench_sequential_quality.py [--settings mlp,both] [--data ../shared/data/imagenet-sample]
    python scripts/bench_sequential_quality.py --checkpoint ../shared/data/deit_tiny_patch16_224.cifar10.safetensors \
        --calib-data ../shared/data/cifar10/train --eval-data ../shared/data/cifar10/test

Calibrates on one half of the shared ImageNet sample (even-indexed classes of the 500; the
split of scripts/real_deit_dtype.py) and scores top-1 on the other half. For every setting
(`mlp`: --target mlp --sparsity 0.5; `both`: --target both --sparsity 0.5; `budget`:
--target both --flops-budget 0.617, where sequential re-fits the one-shot allocation's masks;
`budget-seq`: the same budget, allocated block by block on the sequential statistics; with
`--one-shot-masks` every setting re-fits the one-shot masks),
it prunes one-shot (dense statistics) and sequentially with each target, from the same images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from real_deit_dtype import split, top1 as _top1  # the same split and scoring as that study (scripts/ is on the path)

from corp_cli import api
from corp_cli.family import ModelOptions
from corp_cli.loading import load_dense
from corp_cli.sources import open_data

ROOT = Path(__file__).resolve().parents[1]


def top1(loaded, held: Path) -> float:
    return 100 * _top1(loaded, held)
SETTINGS = {"mlp": {"target": "mlp", "sparsity": 0.5}, "both": {"target": "both", "sparsity": 0.5},
            "budget": {"target": "both", "flops_budget": 0.617},
            "budget-seq": {"target": "both", "flops_budget": 0.617}}
# Under `budget` sequential re-fits the one-shot allocation's masks; under `budget-seq` it allocates itself.
REFIT_ONE_SHOT = {"budget"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample")
    ap.add_argument("--checkpoint", type=Path,
                    default=ROOT.parent / "shared" / "data" / "deit_tiny_patch16_224.in1k.safetensors")
    ap.add_argument("--calib-data", type=Path, help="calibration images (with --eval-data: no split of --data)")
    ap.add_argument("--eval-data", type=Path, help="held-out labelled images")
    ap.add_argument("--settings", default="mlp,both,budget")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--targets", default="dense,self,blend", help="sequential targets to compare")
    ap.add_argument("--no-one-shot", action="store_true", help="skip the one-shot prune (for a rerun of some targets)")
    ap.add_argument("--one-shot-masks", action="store_true",
                    help="every sequential variant re-fits the one-shot prune's masks (not only under a budget)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.calib_data is not None:
            calib, held = args.calib_data.resolve(), args.eval_data.resolve()
        else:
            calib, held = split(args.data.resolve(), Path(tmp))
        dense = load_dense("deit_tiny_patch16_224", ModelOptions(checkpoint=args.checkpoint))
        n_cal = open_data(str(calib), "image", samples=None).num_items
        print(f"calibration {n_cal} images ({calib}), held-out {held}; torch threads {torch.get_num_threads()}")
        print(f"dense top-1 on the held-out half: {top1(dense, held):.1f}%\n")
        t = time.perf_counter()
        stats = None if args.no_one_shot else api.calibrate(dense, open_data(str(calib), "image", samples=None),
                                                              batch_size=args.batch_size, workers=2)
        t_cal = time.perf_counter() - t
        cols = " | ".join(f"sequential {t}" for t in args.targets.split(","))
        print(f"| setting | one-shot | {cols} | seconds (one-shot calibrate+prune / each sequential) |")
        print("|---|---|" + "---|" * len(args.targets.split(",")) + "---|")
        for name in args.settings.split(","):
            kw = SETTINGS[name]
            seq_kw = dict(kw)
            masks = None
            if stats is None:
                row, secs = ["-"], ["-"]
            else:
                t = time.perf_counter()
                one = api.prune(dense, stats, **kw)
                t_one = t_cal + time.perf_counter() - t
                row, secs = [f"{top1(one.loaded, held):.1f}%"], [f"{t_one:.0f}"]
                if name in REFIT_ONE_SHOT or args.one_shot_masks:  # re-fit the units the one-shot prune chose
                    seq_kw = {"target": kw["target"]}
                    masks = one.masks
            for target in args.targets.split(","):
                t = time.perf_counter()
                r = api.prune(dense, sequential=True, sequential_target=target, masks=masks,
                              data=open_data(str(calib), "image", samples=None), batch_size=args.batch_size,
                              workers=2, **seq_kw)
                secs.append(f"{time.perf_counter() - t:.0f}")
                row.append(f"{top1(r.loaded, held):.1f}%")
            print(f"| {name} ({', '.join(f'{k}={v}' for k, v in kw.items())}) | {' | '.join(row)} | {' / '.join(secs)} |",
                  flush=True)


if __name__ == "__main__":
    main()

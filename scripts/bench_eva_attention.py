"""EVA-02 attention pruning: compensated vs uncompensated error for each new part, on real images.

Random-init EVA-02 weights of the eva02_tiny / eva02_small shapes (timm, seed 0; no pretrained
weights are needed for the question asked: does the compensation lower the error the removal
causes?) and the shared ImageNet sample (../shared/data/imagenet-sample): calibrate on the
first --calib images, measure on the next --held images (disjoint). For each new part at
--sparsity (Q/K rotary pairs, value/output dims, whole heads, and all three at once), with and
without compensation, it prints the predicted error summed over the blocks (the report's, in
each part's own units: scaled logits for Q/K, the projection output for V/O and heads) and the
measured held-out error of the model's output features, relative to the dense features:
mean ||f - f_dense||^2 / mean ||f_dense||^2, and the classifier logits' the same way.

    python scripts/bench_eva_attention.py [--models eva02_tiny_patch14_224,eva02_small_patch14_224]
        [--calib 64] [--held 64] [--sparsity 0.5] [--data DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch

from corp_cli import api
from corp_cli.data import make_batches, open_source
from corp_cli.preprocess import resolve_preprocessing

SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
PARTS = {"Q/K pairs": "qk", "V/O dims": "vo", "heads": "heads", "Q/K + V/O + heads": "qk,vo,heads"}


def _outputs(loaded: api.Loaded, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = [], []
    with torch.inference_mode():
        for x in batches:
            out = loaded.family.outputs(loaded, {"pixel_values": x})
            feats.append(out.features.double())
            logits.append(loaded.model(x).double())  # the (random) 1000-class head, which is not pruned
    return torch.cat(feats), torch.cat(logits)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).square().sum(1).mean() / ref.square().sum(1).mean())


def _predicted(blocks: list[dict], key: str) -> tuple[float, float]:
    comp = unc = 0.0
    for b in blocks:
        for part in ("attn", "vo"):
            if part not in b:
                continue
            e = b[part]
            c, u = e[f"predicted{key}_compensated"], e[f"predicted{key}_uncompensated"]
            comp += sum(c) if isinstance(c, list) else c
            unc += sum(u) if isinstance(u, list) else u
    return comp, unc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="eva02_tiny_patch14_224,eva02_small_patch14_224")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--held", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data", default=str(SHARED_IMAGES))
    args = ap.parse_args()
    print(f"images: {args.calib} calibration + {args.held} held-out from {args.data}; sparsity {args.sparsity}; "
          "random-init weights (timm, seed 0)")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        dense = api.adopt(model)
        prep = resolve_preprocessing(model)
        src = open_source(args.data, samples=args.calib + args.held, seed=0)
        images = torch.cat([x for x, _ in make_batches(src, prep.transform(), args.batch_size, num_workers=0)])
        calib = list(images[:args.calib].split(args.batch_size))
        held = list(images[args.calib:args.calib + args.held].split(args.batch_size))
        t0 = time.perf_counter()
        stats = api.calibrate(dense, calib, parts=("mlp", "attn", "vo"))
        t_cal = time.perf_counter() - t0
        f_dense, l_dense = _outputs(dense, held)
        print(f"\n{name} (calibration {t_cal:.1f} s)\n")
        print("| part | compensation | predicted error (sum over blocks) | held-out feature error | held-out logit error | prune s |")
        print("|---|---|---|---|---|---|")
        for label, target in PARTS.items():
            for comp in (True, False):
                t0 = time.perf_counter()
                res = api.prune(dense, stats, target=target, sparsity=args.sparsity, compensation=comp)
                t_pr = time.perf_counter() - t0
                f, lg = _outputs(res.loaded, held)
                parts = []
                if "qk" in target:
                    c, u = _predicted(res.blocks, "_logit_error")
                    parts.append(f"Q/K {c if comp else u:.4g}")
                if "vo" in target or "heads" in target:
                    c, u = _predicted(res.blocks, "_error")
                    parts.append(f"o {c if comp else u:.4g}")
                print(f"| {label} | {'yes' if comp else 'no'} | {', '.join(parts)} | {_rel(f, f_dense):.4g} | "
                      f"{_rel(lg, l_dense):.4g} | {t_pr:.1f} |")


if __name__ == "__main__":
    main()

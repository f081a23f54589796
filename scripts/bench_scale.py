"""Scale: calibration + pruning time against a plain forward, peak memory and statistics size, per model.

    python scripts/bench_scale.py --device cpu [--models deit_small_patch16_224,deit_base_patch16_224] [--images 64]
    python scripts/bench_scale.py --device cuda [--dtype bf16]   # deit_base .. vit_huge

For each randomly initialised model (no download; time and memory do not depend on the
weights) it measures, side by side in one run and on the same images:
- a plain forward (`forward_features`) over the images, in batches;
- calibration (MLP + Q/K statistics) over the same images, in the same batches;
- pruning (50% of the MLP and of the Q/K dims, with compensation);
and prints the ratio (calibrate + prune) / forward, the peak memory of calibration
(CUDA: max allocated; CPU: peak RSS above the resident model), and the statistics size.
A first table gives the statistics memory per block of larger models, from their shapes.
"""

from __future__ import annotations

import argparse
import gc
import time

import timm
import torch

from corp_cli.benchmark import _CpuPeak, _CudaPeak
from corp_cli.calibration import collect_statistics
from corp_cli.plan import block_stats_bytes, human
from corp_cli.registry import family_of
from corp_cli.stats import Statistics

SIZES_FOR = {"cpu": "deit_small_patch16_224,deit_base_patch16_224",
             "cuda": "deit_base_patch16_224,vit_large_patch16_224,vit_huge_patch14_224"}
SHAPE_TABLE = ("deit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224", "eva02_large_patch14_224")


def shape_table() -> None:
    print("| model | blocks | MLP width | heads x dim | statistics per block | all blocks |")
    print("|---|---|---|---|---|---|")
    for name in SHAPE_TABLE:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        fam = family_of(model)
        s = fam.shape(model, 0)
        per = block_stats_bytes(s.mlp_hidden, s.num_heads, s.head_dim, ("mlp", "attn"))
        n = fam.num_blocks(model)
        print(f"| {name} | {n} | {s.mlp_hidden} | {s.num_heads} x {s.head_dim} | {human(per)} | {human(n * per)} |")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(name: str, dev: torch.device, images: int, batch: int, dtype: str) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(dev)
    fam = family_of(model)
    size = int(model.patch_embed.img_size[0])
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, 3, size, size, generator=g).to(dev) for _ in range(images // batch)]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast(dev.type, enabled=False)
    with torch.inference_mode(), autocast:
        model.forward_features(batches[0][:2])  # warm-up: kernels, allocator
        sync(dev)
        t = time.perf_counter()
        for x in batches:
            model.forward_features(x)
        sync(dev)
        forward_s = time.perf_counter() - t
    gc.collect()
    probe = _CudaPeak(dev) if dev.type == "cuda" else _CpuPeak()
    probe.start()
    t = time.perf_counter()
    sums = collect_statistics(model, batches, family=fam, forward_dtype=torch.bfloat16 if dtype == "bf16" else None)
    sync(dev)
    calib_s = time.perf_counter() - t
    peak = probe.stop()
    stats = Statistics(blocks=sums.blocks, meta={})
    stats_bytes = sum(t.numel() * t.element_size() for b in sums.blocks for p in b.values() for t in p.values())
    t = time.perf_counter()
    _prune(model, stats)
    sync(dev)
    prune_s = time.perf_counter() - t
    return {"model": name, "images": len(batches) * batch, "batch": batch, "forward_s": forward_s, "calibrate_s": calib_s,
            "prune_s": prune_s, "ratio": (calib_s + prune_s) / forward_s, "peak": peak, "stats": stats_bytes}


def _prune(model: torch.nn.Module, stats: Statistics) -> None:
    from corp_cli.pruning import PruneOptions, apply_masks, plan_masks

    opts = PruneOptions(target="both", mlp_sparsity=0.5, attn_sparsity=0.5)
    apply_masks(model, stats, plan_masks(model, stats, opts), opts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=None)
    ap.add_argument("--images", type=int, default=None, help="default: 64 on CPU, 512 on CUDA")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 64 on CUDA")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    images = args.images or (512 if dev.type == "cuda" else 64)
    batch = args.batch_size or (64 if dev.type == "cuda" else 16)
    print("Statistics memory (float64 sums: MLP Gram D^2 x 8 bytes, sum, |h| histogram; per head the q/k Grams):\n")
    shape_table()
    print(f"\nMeasured on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'} "
          f"({torch.get_num_threads()} threads), {args.dtype} forward, {images} images in batches of {batch}, "
          "50% MLP + Q/K:\n")
    print("| model | forward s | calibrate s | prune s | (calibrate+prune)/forward | calibration peak | statistics |")
    print("|---|---|---|---|---|---|---|")
    for name in (args.models or SIZES_FOR[dev.type]).split(","):
        r = measure(name, dev, images, batch, args.dtype)
        print(f"| {r['model']} | {r['forward_s']:.1f} | {r['calibrate_s']:.1f} | {r['prune_s']:.1f} | {r['ratio']:.2f} | "
              f"{human(r['peak'])} | {human(r['stats'])} |", flush=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""How long `--flops-budget` takes to choose the widths of DeiT-Base (12 blocks, 12 heads, MLP 3072), CPU.

The allocation's time does not depend on the weights or the data, only on the widths: a
randomly initialised deit_base_patch16_224 is calibrated on a few synthetic images (all
three statistics parts) and the allocation is timed for several targets and budgets, with
the threads torch would use. Prints one markdown row per run (seconds, achieved FLOPs ratio).

    PYTHONPATH=$PWD python scripts/bench_allocation.py [--model deit_base_patch16_224] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from corp_cli import api
from corp_cli.allocation import allocate
from corp_cli.data import open_source
from corp_cli.pruning import PruneOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_base_patch16_224")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = api.adopt(timm.create_model(args.model, pretrained=False).eval())
    t0 = time.perf_counter()
    stats = api.calibrate(loaded, open_source("synthetic", samples=args.samples), parts=("mlp", "attn", "vo"),
                          batch_size=args.samples)
    print(f"{args.model}: calibrated on {args.samples} synthetic images in {time.perf_counter() - t0:.1f}s, "
          f"{torch.get_num_threads()} threads")
    print("| target | budget | allocation seconds | FLOPs ratio |")
    print("|---|---|---|---|")
    for target in ("both", "all", "mlp,qk,vo,heads"):
        for budget in (0.8, 0.5):
            t0 = time.perf_counter()
            alloc = allocate(loaded.family, loaded.model, stats, PruneOptions(target=target, flops_budget=budget))
            print(f"| {target} | {budget} | {time.perf_counter() - t0:.2f} | {alloc.flops / alloc.dense_flops:.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()

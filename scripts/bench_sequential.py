"""Time of a sequential prune vs one-shot (calibrate + prune), side by side in one run.

    python scripts/bench_sequential.py [--models deit_tiny_patch16_224,deit_base_patch16_224] [--samples 64]

Random-init weights (the time does not depend on them) and random 224x224 inputs held in
memory, so that image decoding is not timed. For each model: one-shot = corp_cli.calibrate +
corp_cli.prune (dense statistics, then the solves); sequential = corp_cli.prune(sequential=True)
with each target (dense, self, blend), all at --target both --sparsity 0.5 on the
same batches. Prints each time and the ratio to one-shot (the issue's goal: <= 2.5x).
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from corp_cli import api


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="deit_tiny_patch16_224,deit_base_patch16_224")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--target", default="both")
    ap.add_argument("--targets", default="dense,self,blend", help="sequential targets to time")
    ap.add_argument("--rankings", default="stream", help="--sequential-ranking values to time (stream,dense)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.samples} images of 224x224 in memory, "
          f"--target {args.target} --sparsity 0.5")
    # every (target, ranking) column; a dense ranking adds the one-shot pre-pass
    targets = [(t, r) for r in args.rankings.split(",") for t in args.targets.split(",")]
    print("| model | one-shot calibrate + prune (s) | " + " | ".join(f"sequential {t}{'' if r == 'stream' else f', {r} ranking'} (s) | ratio" for t, r in targets) + " |")
    print("|---|---|" + "---|---|" * len(targets))
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.samples, 3, 224, 224, generator=g)
        batches = list(x.split(args.batch_size))
        loaded = api.adopt(model)
        # untimed: the first prune of a process pays the allocator's and the kernels' warm-up, which would
        # otherwise land on whichever column runs first
        api.prune(loaded, sequential=True, sequential_target="self", data=batches, target=args.target, sparsity=0.5)
        t = time.perf_counter()
        stats = api.calibrate(loaded, batches)
        api.prune(loaded, stats, target=args.target, sparsity=0.5)
        one = time.perf_counter() - t
        row = [f"{one:.1f}"]
        for target, ranking in targets:
            t = time.perf_counter()
            api.prune(loaded, sequential=True, sequential_target=target, sequential_ranking=ranking, data=batches,
                      target=args.target, sparsity=0.5)
            sec = time.perf_counter() - t
            row += [f"{sec:.1f}", f"{sec / one:.2f}x"]
        print(f"| {name} | {' | '.join(row)} |", flush=True)


if __name__ == "__main__":
    main()

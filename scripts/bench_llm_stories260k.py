"""Real decoder LM: CORP MLP pruning of the TinyStories Llama (../shared/data/llama-stories260k), CPU only.

Calibrate once on one half of its 300 stories (`text:stories.txt@calib`, every story, 512-token
windows), evaluate on the other half (`@eval`). For MLP sparsity 30% and 50%, with every MLP
ranker, with and without compensation, it prints a markdown table of held-out perplexity (the
dense model's beside it) and the next-token fidelity to the dense model (mean KL, top-1
agreement). The numbers are those of `corp sweep` (the same library calls); the table says
the command that gives each row.

    python scripts/bench_llm_stories260k.py [--data DIR] [--sparsities 0.3,0.5] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from corp_cli import api  # noqa: E402
from corp_cli.loading import load_dense  # noqa: E402
from corp_cli.pruning import MLP_RANKERS, PruneOptions  # noqa: E402
from corp_cli.sources import open_data  # noqa: E402
from corp_cli.sweep import EvalMeasure, run_sweep  # noqa: E402

log = logging.getLogger("bench_llm_stories260k")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llama-stories260k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="the llama-stories260k folder (model + stories.txt)")
    ap.add_argument("--sparsities", default="0.3,0.5", help="MLP sparsities, comma list")
    ap.add_argument("--quick", action="store_true", help="energy ranker only (a smoke run)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.manual_seed(0)

    folder = args.data
    stories = folder / "stories.txt"
    loaded = load_dense(folder)
    unit = loaded.family.text_unit
    calib = open_data(f"text:{stories}@calib", "text", samples=None, text_unit=unit)
    held_out = open_data(f"text:{stories}@eval", "text", samples=None, text_unit=unit)
    t0 = time.perf_counter()
    stats = api.calibrate(loaded, calib, batch_size=32)
    log.info("calibrated on %d stories (%d tokens) in %.1fs", len(calib), stats.meta["tokens"], time.perf_counter() - t0)

    batches = list(loaded.preprocessing.batches(held_out, 64))
    sparsities = [float(s) for s in args.sparsities.split(",")]
    rankers = ("energy",) if args.quick else MLP_RANKERS
    rows: list[tuple[str, dict, list[dict]]] = []
    for ranker in rankers:
        measure = EvalMeasure(lambda: batches, labelled=False, classifier=False, remap=None,
                              device=torch.device("cpu"), lm=True)
        dense, points = run_sweep(loaded, stats, sparsities, PruneOptions(target="mlp", ranker=ranker), measure)
        rows.append((ranker, dense, points))
        log.info("%s: %s", ranker, ", ".join(f"{p['sparsity']:g} {p['arm']} {p['perplexity']:.3f}" for p in points))

    dense = rows[0][1]
    tokens = sum(int(b["attention_mask"][:, 1:].sum()) for b, _ in batches)
    print(f"stories260k, held-out perplexity on {len(held_out)} stories ({tokens} predicted tokens); "
          f"calibration: {len(calib)} other stories, {stats.meta['tokens']} tokens; dense perplexity "
          f"**{dense['perplexity']:.3f}**\n")
    print("| ranker | MLP sparsity | params | perplexity, CORP | perplexity, no compensation | KL / token, CORP | "
          "KL / token, none | top-1 agreement, CORP | top-1 agreement, none |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ranker, _, points in rows:
        by = {(p["sparsity"], p["arm"]): p for p in points}
        for s in sparsities:
            c, u = by[(s, "corp")], by[(s, "no-compensation")]
            print(f"| {ranker} | {100 * s:.0f}% | {c['params']:,} | **{c['perplexity']:.3f}** | {u['perplexity']:.3f} | "
                  f"{c['kl_mean']:.3f} | {u['kl_mean']:.3f} | {100 * c['top1_agreement']:.1f}% | "
                  f"{100 * u['top1_agreement']:.1f}% |")
    print(f"\ndense: {dense['params']:,} params. Each row is what\n"
          f"  corp calibrate {folder} --data text:{stories}@calib --out stats.safetensors\n"
          f"  corp sweep {folder} --stats stats.safetensors --data text:{stories}@eval --target mlp "
          f"--ranker RANKER --sparsities {args.sparsities} --out sweep-RANKER\n"
          "reports (perplexity and fidelity columns of sweep.csv).")


if __name__ == "__main__":
    main()

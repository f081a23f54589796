"""Sequential vs one-shot MLP pruning of the TinyStories Llama (../shared/data/llama-stories260k): held-out perplexity.

    python scripts/bench_sequential_llm.py [--data DIR] [--sparsities 0.3,0.5] [--targets dense,self,blend]

Calibrates on one half of its 300 stories (`text:stories.txt@calib`), scores the other half
(`@eval`), as scripts/bench_llm_stories260k.py does; for each MLP sparsity, one-shot CORP
(dense statistics) and `--sequential` with each target, all with the energy ranker.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from corp_cli import api  # noqa: E402
from corp_cli.evaluate import evaluate  # noqa: E402
from corp_cli.loading import load_dense  # noqa: E402
from corp_cli.sources import open_data  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llama-stories260k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--targets", default="dense,self,blend")
    args = ap.parse_args()
    torch.manual_seed(0)
    stories = args.data / "stories.txt"
    loaded = load_dense(args.data)
    unit = loaded.family.text_unit

    def calib() -> object:
        return open_data(f"text:{stories}@calib", "text", samples=None, text_unit=unit)

    held = list(loaded.preprocessing.batches(open_data(f"text:{stories}@eval", "text", samples=None, text_unit=unit), 64))

    def ppl(model_loaded: object) -> str:
        return f"{evaluate(model_loaded, held).result['perplexity']:.3f}"  # type: ignore[arg-type]

    stats = api.calibrate(loaded, calib(), batch_size=32)
    print(f"stories260k: dense held-out perplexity {evaluate(loaded, held).result['perplexity']:.3f}\n")
    targets = args.targets.split(",")
    print(f"| MLP sparsity | one-shot | {' | '.join('sequential ' + t for t in targets)} |")
    print("|---|---|" + "---|" * len(targets))
    for s in (float(x) for x in args.sparsities.split(",")):
        row = [ppl(api.prune(loaded, stats, target="mlp", sparsity=s).loaded)]
        for t in targets:
            r = api.prune(loaded, sequential=True, sequential_target=t, data=calib(), batch_size=32, target="mlp",
                          sparsity=s)
            row.append(ppl(r.loaded))
        print(f"| {100 * s:.0f}% | {' | '.join(row)} |", flush=True)


if __name__ == "__main__":
    main()

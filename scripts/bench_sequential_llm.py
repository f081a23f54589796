"""Sequential vs one-shot MLP pruning of the TinyStories Llama (../shared/data/llama-stories260k): held-out perplexity.

    python scripts/bench_sequential_llm.py [--data DIR] [--sparsities 0.3,0.5] [--targets dense,self,blend]
        [--rankings stream,dense] [--no-one-shot] [--round-to N]

Calibrates on one half of its 300 stories (`text:stories.txt@calib`), scores the other half
(`@eval`), as scripts/bench_llm_stories260k.py does; for each MLP sparsity, one-shot CORP
(dense statistics) and `--sequential` with each ranking (`--sequential-ranking`) and target, all
with the energy ranker.
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
    ap.add_argument("--rankings", default="stream", help="--sequential-ranking values, each run with every target")
    ap.add_argument("--no-one-shot", action="store_true", help="leave the one-shot column out")
    ap.add_argument("--round-to", type=int, default=None,
                    help="kept-width multiple (corp's default unless given; 1 reproduces rows measured before it was 8)")
    args = ap.parse_args()
    extra = {} if args.round_to is None else {"round_to": args.round_to}
    torch.manual_seed(0)
    stories = args.data / "stories.txt"
    loaded = load_dense(args.data)
    unit = loaded.family.text_unit

    def calib() -> object:
        return open_data(f"text:{stories}@calib", "text", samples=None, text_unit=unit)

    held = list(loaded.preprocessing.batches(open_data(f"text:{stories}@eval", "text", samples=None, text_unit=unit), 64))

    def ppl(model_loaded: object) -> str:
        return f"{evaluate(model_loaded, held).result['perplexity']:.3f}"  # type: ignore[arg-type]

    print(f"stories260k: dense held-out perplexity {evaluate(loaded, held).result['perplexity']:.3f}\n")
    stats = None if args.no_one_shot else api.calibrate(loaded, calib(), batch_size=32)
    columns = [(r, t) for r in args.rankings.split(",") for t in args.targets.split(",")]
    head = ([] if stats is None else ["one-shot"]) + [
        f"sequential {t}" + ("" if r == "stream" else f", {r} ranking") for r, t in columns]
    print(f"| MLP sparsity | {' | '.join(head)} |")
    print("|---|" + "---|" * len(head))
    for s in (float(x) for x in args.sparsities.split(",")):
        row = [] if stats is None else [ppl(api.prune(loaded, stats, target="mlp", sparsity=s, **extra).loaded)]
        for r, t in columns:
            res = api.prune(loaded, sequential=True, sequential_target=t, sequential_ranking=r, data=calib(),
                            batch_size=32, target="mlp", sparsity=s, **extra)
            row.append(ppl(res.loaded))
        print(f"| {100 * s:.0f}% | {' | '.join(row)} |", flush=True)


if __name__ == "__main__":
    main()

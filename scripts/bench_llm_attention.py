"""Real decoder LM, attention pruning: the TinyStories Llama (../shared/data/llama-stories260k, GQA 8 query / 4 kv
heads of width 8, rotary), CPU only.

Calibrate once on one half of its stories (`text:stories.txt@calib`, 512-token windows), evaluate on the
other half (`@eval`): held-out perplexity, mean KL and top-1 agreement to the dense model, and the KV-cache
bytes per token, for

1. each attention part alone at 50%, with and without compensation: rotary Q/K pairs (--target qk
   --attn-sparsity 0.5), value dims (--target vo --vo-sparsity 0.5), kv heads with their query heads
   (--target heads --head-sparsity 0.5), query heads inside each group (--q-head-sparsity 0.5);
2. FLOP ratios 0.8 / 0.7 / 0.6 with the allocator: --target all (mlp,qk,vo), all + heads, and MLP only
   at the same --flops-budget; and one --kv-budget 0.5 row beside --flops-budget 0.8.

Prints markdown tables; every row says the `corp prune` flags that give it.

    python scripts/bench_llm_attention.py [--data DIR] [--ratios 0.8,0.7,0.6]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from corp_cli import allocation, api  # noqa: E402
from corp_cli.errors import InputError  # noqa: E402
from corp_cli.loading import load_dense  # noqa: E402
from corp_cli.sources import open_data  # noqa: E402
from corp_cli.sweep import EvalMeasure  # noqa: E402

log = logging.getLogger("bench_llm_attention")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llama-stories260k"


def _row(label: str, flags: str, result: api.PruneResult, measure: EvalMeasure) -> dict[str, Any]:
    m, _ = measure(result.loaded, dense=False)
    t = result.report()["totals"]
    return {"label": label, "flags": flags, "ppl": m["perplexity"], "kl": m["kl_mean"], "top1": m["top1_agreement"],
            "flops": t["flops_after"] / t["flops_before"], "kv": t["kv_ratio"]}


def _chosen(result: api.PruneResult) -> str:
    """The widths the allocator chose, block by block: MLP units / query heads / kv heads / Q/K dims / value dims."""
    shapes = [result.loaded.family.shape(result.model, i) for i in range(result.loaded.family.num_blocks(result.model))]
    return ", ".join(f"{s.mlp_hidden}/{s.num_heads}/{s.kv_heads}/{s.qk_dim}/{s.v_dim}" for s in shapes)


def _split(folder: Path) -> tuple[Any, Any, Any]:
    """The model and its stories, halved: calibration (@calib) and held-out (@eval) documents."""
    model = load_dense(folder)
    text = folder / "stories.txt"
    halves = [open_data(f"text:{text}@{half}", "text", samples=None, text_unit=model.family.text_unit)
              for half in ("calib", "eval")]
    return model, halves[0], halves[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="the llama-stories260k folder (model + stories.txt)")
    ap.add_argument("--ratios", default="0.8,0.7,0.6", help="FLOP ratios for the allocator rows, comma list")
    ap.add_argument("--targets", default="mlp,qk,vo;mlp,qk,vo,heads;mlp", help="allocator targets, ';' list")
    ap.add_argument("--qk-weight", type=float, default=None,
                    help="weight of a Q/K logit error against output errors (default allocation.QK_LOGIT_WEIGHT)")
    ap.add_argument("--allocator-only", action="store_true", help="skip the per-part rows")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.manual_seed(0)
    loaded, calib, held_out = _split(args.data)
    started = time.perf_counter()
    stats = api.calibrate(loaded, calib, batch_size=32, parts=("mlp", "attn", "vo"))  # every part's sums, once
    log.info("calibration: %d stories, %d tokens, %.1fs", len(calib), stats.meta["tokens"], time.perf_counter() - started)
    batches = list(loaded.preprocessing.batches(held_out, 64))
    measure = EvalMeasure(lambda: batches, labelled=False, classifier=False, remap=None, device=torch.device("cpu"),
                          lm=True)
    dense, _ = measure(loaded, dense=True)
    tokens = sum(int(b["attention_mask"][:, 1:].sum()) for b, _ in batches)
    print(f"stories260k, held-out perplexity on {len(held_out)} stories ({tokens} predicted tokens); calibration: "
          f"{len(calib)} other stories, {stats.meta['tokens']} tokens; dense perplexity **{dense['perplexity']:.3f}**\n")

    if args.qk_weight is not None:
        allocation.QK_LOGIT_WEIGHT = args.qk_weight
    parts = [] if args.allocator_only else [("Q/K pairs 50%", "--target qk --attn-sparsity 0.5", {"target": "qk", "attn_sparsity": 0.5}),
             ("value dims 50%", "--target vo --vo-sparsity 0.5", {"target": "vo", "vo_sparsity": 0.5}),
             ("kv heads 50%", "--target heads --head-sparsity 0.5", {"target": "heads", "head_sparsity": 0.5}),
             ("query heads 50% in each group", "--target heads --head-sparsity 0 --q-head-sparsity 0.5",
              {"target": "heads", "head_sparsity": 0.0, "q_head_sparsity": 0.5})]
    if parts:
        print("| part | flags | KV cache | perplexity, CORP | perplexity, none | KL, CORP | KL, none | top-1, CORP | top-1, none |")
        print("|---|---|---|---|---|---|---|---|---|")
    for label, flags, kw in parts:
        t = time.perf_counter()
        c = _row(label, flags, api.prune(loaded, stats, **kw), measure)
        u = _row(label, flags, api.prune(loaded, stats, compensation=False, **kw), measure)
        log.info("%s: %.3f vs %.3f (%.1fs)", label, c["ppl"], u["ppl"], time.perf_counter() - t)
        print(f"| {label} | `{flags}` | {c['kv']:.2f}x | **{c['ppl']:.3f}** | {u['ppl']:.3f} | {c['kl']:.3f} | "
              f"{u['kl']:.3f} | {100 * c['top1']:.1f}% | {100 * u['top1']:.1f}% |")

    print(f"\n| FLOP budget | target | flags | FLOPs kept | KV cache | perplexity | KL | top-1 | chosen per block: MLP units "
          f"/ query heads / kv heads / Q/K dims / value dims (Q/K weight {allocation.QK_LOGIT_WEIGHT:g}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = {"mlp,qk,vo": "all", "mlp,qk,vo,heads": "all + heads", "mlp": "MLP only"}
    for r in (float(x) for x in args.ratios.split(",")):
        for target in args.targets.split(";"):
            name = names.get(target, target)
            t = time.perf_counter()
            try:
                pruned = api.prune(loaded, stats, target=target, flops_budget=r)
            except InputError as e:  # e.g. the MLP alone cannot remove that much
                print(f"| {r:g} | {name} | `--target {target} --flops-budget {r:g}` | unreachable: {e} | | | | | |")
                continue
            row = _row(name, f"--target {target} --flops-budget {r:g}", pruned, measure)
            log.info("%g %s: %.3f (%.1fs)", r, name, row["ppl"], time.perf_counter() - t)
            print(f"| {r:g} | {name} | `{row['flags']}` | {row['flops']:.3f} | {row['kv']:.2f}x | **{row['ppl']:.3f}** | "
                  f"{row['kl']:.3f} | {100 * row['top1']:.1f}% | {_chosen(pruned)} |")
    if args.allocator_only:
        return
    both = api.prune(loaded, stats, target="mlp,qk,vo,heads", flops_budget=0.8, kv_budget=0.5)
    row = _row("all + heads", "--target mlp,qk,vo,heads --flops-budget 0.8 --kv-budget 0.5", both, measure)
    print(f"| 0.8, KV 0.5 | all + heads | `{row['flags']}` | {row['flops']:.3f} | {row['kv']:.2f}x | **{row['ppl']:.3f}** "
          f"| {row['kl']:.3f} | {100 * row['top1']:.1f}% | {_chosen(both)} |")


if __name__ == "__main__":
    main()

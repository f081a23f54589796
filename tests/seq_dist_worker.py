"""One rank of the two-process --sequential test (tests/test_sequential.py): its share of the batches, gloo."""

from __future__ import annotations

import os
import sys

import torch


def main(out: str, target: str, fail_rank: int, budget: float | None, ranking: str) -> None:
    import torch.distributed as dist

    from corp_cli import api, distributed
    from corp_cli import sequential as seq
    from corp_cli.errors import CorpError
    from corp_cli.pruning import PruneOptions

    from .test_sequential import _batches, _model, _rank_options as options

    d = distributed.from_env()
    assert d is not None
    dev = distributed.start(d, "cpu")
    x = torch.cat(_batches())
    mine = x[d.rank::d.world]  # this rank's samples, as a single process would select them
    loaded = api.adopt(_model())
    if d.rank == fail_rank:
        fam_cls = type(loaded.family)
        orig = fam_cls.run_block

        def run_block(self, model, i, hidden, ctx):  # type: ignore[no-untyped-def]
            if i == 1:
                raise RuntimeError("injected failure in block 1")
            return orig(self, model, i, hidden, ctx)

        fam_cls.run_block = run_block  # type: ignore[method-assign]
    try:
        # batches of 3, not the single process's 8 // 2: a batch may then hold samples of both folds
        run = seq.prune_sequential(loaded, list(mine.split(3)), options(budget), target=target, ranking=ranking,
                                   product_dtype=torch.float64, sync=distributed.BlockSync(d, dev),
                                   batch_size=len(_batches()[0]))
    except CorpError as e:
        sys.stderr.write(f"rank {d.rank} error: {e}\n")
        distributed.stop()
        sys.exit(3)
    with torch.inference_mode():
        y = loaded.model.forward_features(x)
    torch.save({"masks": [(m.mlp, m.attn) for m in run.masks], "blocks": run.blocks, "y": y,
                "samples": run.samples, "tokens": run.tokens,
                "allocation": run.allocation}, f"{out}.{d.rank}.pt")
    dist.barrier()
    distributed.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) if sys.argv[4] != "-" else None,
         sys.argv[5] if len(sys.argv) > 5 else "stream")

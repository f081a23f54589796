"""Q/K-pruned attention on CPU with and without zero-padding q/k to v's width, side by side.

PyTorch's fused CPU attention kernel needs equal q/k/v head dims; corp pads narrow q/k
with zeros (adding exactly 0 to every logit) to stay on it (`corp_cli.attention.sdpa_mixed_width`).
This times one pruned model (a `corp prune` folder, timm or Hugging Face) both ways,
interleaving the two settings run by run so machine noise hits them alike, checks the
outputs agree, and prints the ratio.

    python scripts/bench_qk_padding.py pruned-minilm/ --batch-sizes 1,8 --runs 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

import corp_cli.attention as compact
from corp_cli import load_pruned


def _inputs(model: torch.nn.Module, batch: int) -> Any:
    """Full-length token ids for a text encoder, else a random image batch of the model's size."""
    gen = torch.Generator().manual_seed(0)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "vocab_size"):
        ids = torch.randint(0, int(cfg.vocab_size), (batch, 128), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if cfg is not None:  # HF image encoder
        return {"pixel_values": torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)}
    return torch.randn(batch, *model.pretrained_cfg.get("input_size", (3, 224, 224)), generator=gen)


def _forward(model: torch.nn.Module, x: Any) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    return out if isinstance(out, torch.Tensor) else out[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pruned", help="a corp prune output folder with Q/K-pruned blocks")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    model = load_pruned(args.pruned).eval()
    rows = []
    with torch.inference_mode():
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            x = _inputs(model, batch)
            times: dict[bool, list[float]] = {True: [], False: []}
            outs: dict[bool, torch.Tensor] = {}
            for pad in (True, False, True, False):  # warm-up, both settings
                compact.PAD_NARROW_QK_ON_CPU = pad
                outs[pad] = _forward(model, x)
            for _ in range(args.runs):
                for pad in (True, False):
                    compact.PAD_NARROW_QK_ON_CPU = pad
                    t0 = time.perf_counter()
                    _forward(model, x)
                    times[pad].append(time.perf_counter() - t0)
            compact.PAD_NARROW_QK_ON_CPU = True
            padded, plain = (1000 * statistics.median(times[p]) for p in (True, False))
            rows.append({
                "batch": batch, "padded_ms": round(padded, 2), "unpadded_ms": round(plain, 2),
                "speedup_from_padding": round(plain / padded, 3),
                "max_abs_diff": float((outs[True] - outs[False]).abs().max()),
            })
    print(json.dumps({"model": args.pruned, "threads": torch.get_num_threads(), "runs": args.runs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""`--round-to` 1 vs 8 vs 64: CPU speed (timed as `corp benchmark` times) and held-out top-1, in one run.

For each model it calibrates once, prunes with `--target both` at one sparsity for every
round-to value (only the MLP's kept count is rounded; Q/K dims are not), and then:
- times every pruned model and the dense one with corp_cli.benchmark.time_forward (the code of
  `corp benchmark`), INTERLEAVED: each repeat times every model once per batch size, in a
  rotating order, and the table gives the median over repeats of each repeat's median latency
  (and the fastest single pass, the least disturbed by other processes), so load from other
  processes falls on all models alike;
- scores top-1 on held-out images (DeiT-tiny with the real ImageNet weights: the 500 shared
  images split by synset position, even -> calibration (250), odd -> evaluation (250), as
  tests/test_real_deit.py does). DeiT-Base is random-init (no real weights here): speed only.

The machine's load (`uptime`) is printed before and after the timing: numbers on a shared
machine are noisy, compare the ratios within one run.

    PYTHONPATH=$PWD python scripts/bench_round_to.py [--models deit-tiny,deit-base] [--sparsity 0.3]
        [--round-to 1,8,64] [--batch-sizes 1,64] [--repeats 5] [--runs 3] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from corp_cli import api  # noqa: E402
from corp_cli.benchmark import BenchConfig, prepare, time_forward  # noqa: E402
from corp_cli.calibration import calibrate  # noqa: E402
from corp_cli.data import make_batches, open_source  # noqa: E402
from corp_cli.family import Loaded, ModelOptions  # noqa: E402
from corp_cli.flops import model_counts  # noqa: E402
from corp_cli.loading import load_dense  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flops_budget import _imagenet_halves  # noqa: E402  (the same even/odd synset split)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODELS = {
    # name -> (timm architecture, real checkpoint or None for random init)
    "deit-tiny": ("deit_tiny_patch16_224", SHARED / "deit_tiny_patch16_224.in1k.safetensors"),
    "deit-base": ("deit_base_patch16_224", None),
}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime unavailable"


def _load(name: str) -> Loaded:
    arch, ckpt = MODELS[name]
    if ckpt is not None:
        return load_dense(arch, ModelOptions(checkpoint=ckpt))
    import timm

    torch.manual_seed(0)
    return api.adopt(timm.create_model(arch, pretrained=False).eval())  # speed does not depend on the weights


def _top1(model: torch.nn.Module, held: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    hits = total = 0
    with torch.inference_mode():
        for x, y in held:
            hits += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return hits / total


def _widths(loaded: Loaded) -> dict[str, list[int]]:
    fam, model = loaded.family, loaded.model
    shapes = [fam.shape(model, i) for i in range(fam.num_blocks(model))]
    return {"mlp": [s.mlp_hidden for s in shapes], "qk": [s.qk_dim for s in shapes]}


def _compact(ws: list[int]) -> str:
    return str(ws[0]) if len(set(ws)) == 1 else ",".join(map(str, ws))


def study(name: str, args: argparse.Namespace, calib_dir: Path, eval_dir: Path) -> dict[str, Any]:
    dense = _load(name)
    real = MODELS[name][1] is not None
    samples = None if real else args.base_samples  # random-init: the statistics only rank, widths do not depend on them
    t0 = time.perf_counter()
    stats = calibrate(dense, open_source(str(calib_dir), samples=samples, seed=0), batch_size=50, workers=2)
    calib_s = time.perf_counter() - t0
    held = (list(make_batches(open_source(str(eval_dir), samples=None, labels=True), dense.preprocessing.transform(),
                              batch_size=50, num_workers=2)) if real else [])
    variants: dict[str, Loaded] = {"dense": dense}
    rows: dict[str, dict[str, Any]] = {"dense": {"widths": _widths(dense)}}
    for rt in args.round_to:
        opts = {"target": "both", "sparsity": args.sparsity, "round_to": rt}
        if args.flops_budget is not None:
            opts = {"target": "both", "flops_budget": args.flops_budget, "round_to": rt}
        result = api.prune(dense, stats, **opts)
        key = f"round-to {rt}"
        variants[key] = result.loaded
        rows[key] = {"widths": _widths(result.loaded)}
    for key, loaded in variants.items():
        counts = model_counts(loaded.model, family=loaded.family)
        rows[key].update({"params": counts["params"], "gflops": counts["flops"] / 1e9})
        if real:
            rows[key]["top1"] = _top1(loaded.model, held)
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(tuple(args.batch_sizes), torch.float32, torch.device("cpu"), warmup=1, runs=args.runs)
    timed = {k: prepare(v, cfg) for k, v in variants.items()}
    load_before = _uptime()
    order = list(timed)
    lat: dict[tuple[str, int], list[float]] = {(k, bs): [] for k in order for bs in args.batch_sizes}
    best: dict[tuple[str, int], list[float]] = {(k, bs): [] for k in order for bs in args.batch_sizes}
    for rep in range(args.repeats):
        rot = order[rep % len(order):] + order[:rep % len(order)]  # rotate who goes first
        for bs in args.batch_sizes:
            for k in rot:
                row = time_forward(timed[k], bs, cfg)
                lat[(k, bs)].append(row["latency_ms_median"])
                best[(k, bs)].append(row["latency_ms_min"])
        print(f"  {name}: repeat {rep + 1}/{args.repeats} done ({_uptime()})", file=sys.stderr, flush=True)
    load_after = _uptime()
    for k in order:
        rows[k]["latency_ms"] = {bs: statistics.median(lat[(k, bs)]) for bs in args.batch_sizes}
        rows[k]["latency_ms_all"] = {bs: [round(v, 2) for v in lat[(k, bs)]] for bs in args.batch_sizes}
        # the fastest single pass: least disturbed by other processes on a shared machine
        rows[k]["latency_ms_min"] = {bs: min(best[(k, bs)]) for bs in args.batch_sizes}
    return {"model": name, "arch": MODELS[name][0], "weights": "real in1k" if real else "random init",
            "calib_samples": stats.meta["samples"], "eval_images": sum(len(y) for _, y in held),
            "calibrate_s": round(calib_s, 1), "load_before": load_before, "load_after": load_after, "rows": rows}


def markdown(res: dict[str, Any], batch_sizes: list[int]) -> str:
    base = f"round-to {1}" if "round-to 1" in res["rows"] else None
    head = ["variant", "MLP kept", "Q/K kept", "GFLOPs", "top-1"]
    for bs in batch_sizes:
        head += [f"ms b{bs}", f"vs dense b{bs}"] + ([f"vs rt1 b{bs}"] if base else []) + [f"min ms b{bs}"] + (
            [f"min vs rt1 b{bs}"] if base else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = res["rows"]["dense"]
    for k, r in res["rows"].items():
        cells = [k, _compact(r["widths"]["mlp"]), _compact(r["widths"]["qk"]), f"{r['gflops']:.2f}",
                 f"{r['top1']:.3f}" if "top1" in r else "n/a (random init)"]
        for bs in batch_sizes:
            ms = r["latency_ms"][bs]
            cells += [f"{ms:.1f}", f"{dense['latency_ms'][bs] / ms:.2f}x"]
            if base:
                cells.append(f"{res['rows'][base]['latency_ms'][bs] / ms:.2f}x")
            low = r["latency_ms_min"][bs]
            cells.append(f"{low:.1f}")
            if base:
                cells.append(f"{res['rows'][base]['latency_ms_min'][bs] / low:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="deit-tiny,deit-base")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--flops-budget", type=float, default=None, help="allocate widths under this budget instead")
    ap.add_argument("--round-to", default="1,8,64")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3, help="timed passes per model, batch size and repeat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-samples", type=int, default=64, help="calibration images for the random-init models")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.round_to = [int(x) for x in args.round_to.split(",")]
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    calib_dir, eval_dir = _imagenet_halves(Path(os.environ.get("TMPDIR", "/tmp")) / "corp-in1k-halves")
    results = []
    for name in args.models.split(","):
        res = study(name, args, calib_dir, eval_dir)
        results.append(res)
        setting = (f"--flops-budget {args.flops_budget}" if args.flops_budget is not None
                   else f"--sparsity {args.sparsity}")
        print(f"\n{res['model']} ({res['arch']}, {res['weights']}), --target both {setting}, "
              f"{res['calib_samples']} calibration / {res['eval_images']} held-out images, "
              f"{args.threads} threads, {args.repeats} interleaved repeats x {args.runs} runs")
        print(f"load before: {res['load_before']}\nload after:  {res['load_after']}")
        print(markdown(res, args.batch_sizes), flush=True)
        if args.json:  # after every model, so a run stopped later keeps what it measured
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

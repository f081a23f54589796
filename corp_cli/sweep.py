"""Accuracy (or fidelity) vs sparsity, with and without compensation, from ONE statistics file;
or vs FLOPs, for FLOPs budgets shared across blocks by the allocator against one uniform sparsity;
or either of them with every point pruned sequentially (re-calibrated on the pruned model).

Each point prunes a fresh deep copy of the already-loaded dense model; the dense model's
outputs on the evaluation set are computed once (by the first call of the Measure) and
replayed as the fidelity reference. Classifiers are scored on top-1 (labelled data) or
top-1 agreement with the dense model; models without a classifier (backbones, text
encoders) on the cosine of their pooled feature to the dense model's; causal language models
on held-out perplexity (with next-token KL and agreement to the dense model beside it).
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from corp_cli.errors import InputError
from corp_cli.evaluate import evaluate
from corp_cli.family import Batch, Loaded, Outputs
from corp_cli.flops import model_counts
from corp_cli.pruning import PART_SPARSITY, PruneOptions, apply_masks, plan_masks
from corp_cli.sequential import DEFAULT_RANKING
from corp_cli.stats import Statistics

log = logging.getLogger(__name__)

ARMS = (("corp", True), ("no-compensation", False))
# A FLOPs-budget sweep: the allocator's widths, and one sparsity for every block at the same FLOPs.
BUDGET_ARMS = ("allocated", "uniform")
CSV_COLUMNS = (
    "sparsity", "arm", "compensated", "metric", "value", "top1", "top5", "top1_agreement", "kl_mean",
    "feature_cosine_mean", "nn_agreement", "params", "tokens", "flops_per_item", "flops_reduction",
    "seconds",
)
# what a language model's rows add (after "value"); other models' CSVs keep CSV_COLUMNS exactly
LM_COLUMNS = ("perplexity", "nll_mean")
BUDGET_CSV_COLUMNS = (*CSV_COLUMNS, "flops_budget")
# What each metric is, for plots and tables; fractions are shown as percentages.
METRIC_LABELS = {
    "top1": "top-1 accuracy (%)",
    "top1_agreement": "top-1 agreement with dense (%)",
    "feature_cosine_mean": "feature cosine to dense (mean)",
    "perplexity": "held-out perplexity (lower is better)",
}
# metrics whose values span orders of magnitude: plotted on a log axis
LOG_METRICS = ("perplexity",)
PERCENT_METRICS = ("top1", "top1_agreement")
Batches = Iterable[tuple[Batch, Tensor | None]]


def parse_budgets(text: str) -> list[float]:
    """FLOPs fractions in (0, 1), '0.9,0.7' or a run 'a,b,...,c'; largest first."""
    values = parse_sparsities(text, flag="--flops-budgets")
    bad = [v for v in values if v <= 0.0]
    if bad:
        raise InputError(f"--flops-budgets must lie in (0, 1), got {bad}")
    return sorted(values, reverse=True)


def parse_sparsities(text: str, flag: str = "--sparsities") -> list[float]:
    """'0.1,0.3,0.5' or an arithmetic run written 'a,b,...,c' (step b-a, c included)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if "..." in parts:
            if len(parts) != 4 or parts[2] != "...":
                raise InputError(f"{flag}: write a run as a,b,...,c (e.g. 0.1,0.2,...,0.7), got {text!r}")
            a, b, c = float(parts[0]), float(parts[1]), float(parts[3])
            step = b - a
            if step == 0 or (c - a) * step < 0:
                raise InputError(f"{flag} {text!r}: the run must go from a towards c in steps of b - a")
            if step < 0:
                a, b, c, step = c, c - step, a, -step
            n = int(math.floor((c - a) / step + 1e-9)) + 1
            values = [round(a + i * step, 10) for i in range(n)]
        else:
            values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise InputError(f"{flag} is empty")
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise InputError(f"{flag} must lie in [0, 1), got {bad}")
    return sorted(set(values))


def batch_provider(
    prep: Any, source: Any, batch_size: int, workers: int, cache_bytes: int,
) -> Callable[[], Batches]:
    """A function giving the evaluation batches again and again, decoded once when they fit in memory."""
    per_item = 4 * math.prod(prep.input_size) if prep.kind == "image" else 3 * 8 * prep.max_length
    n = prep.count(source)
    if n is None or n * per_item > cache_bytes:
        log.info("evaluation set not cached (%s items); decoding it for every point", n)
        return lambda: prep.batches(source, batch_size, workers)
    cache: list[tuple[Batch, Tensor | None]] = []
    done = [False]

    def get() -> Batches:
        if done[0]:
            return cache
        return _filling(cache, done, prep.batches(source, batch_size, workers))

    return get


def _filling(cache: list[tuple[Batch, Tensor | None]], done: list[bool], it: Iterator[Any]) -> Iterator[Any]:
    cache.clear()
    for item in it:
        cache.append(item)
        yield item
    done[0] = True


Measured = tuple[dict[str, Any], float]  # (flat metric fields, seconds)


class Measure(Protocol):
    """Scores one model of the sweep; the first call gets the dense model and keeps it as the reference."""

    metric: str
    progress: Callable[[int], None] | None  # told how many items each evaluation has done

    def __call__(self, loaded: Loaded, *, dense: bool) -> Measured: ...


class _BoundedOutputs(list):  # type: ignore[type-arg]
    """Reference outputs kept up to a byte budget; past it, none are kept (`overflow`) and the dense model reruns."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget, self.bytes, self.overflow = budget, 0, False

    def append(self, out: Outputs) -> None:
        if self.overflow:
            return
        self.bytes += sum(t.numel() * t.element_size() for t in (out.logits, out.features) if t is not None)
        if self.bytes > self.budget:
            self.overflow = True
            self.clear()
            return
        super().append(out)


class EvalMeasure:
    """Top-1 against labels, or fidelity (agreement, KL, feature cosine, NN agreement) to the dense outputs.

    A language model (`lm`) is scored on perplexity; its dense next-token logits (B x N x vocabulary
    per batch) are kept as the reference only within `reference_bytes`, else the dense model reruns.
    """

    def __init__(
        self, batches: Callable[[], Batches], *, labelled: bool, classifier: bool, remap: Tensor | None,
        device: torch.device, progress: Callable[[int], None] | None = None, lm: bool = False,
        reference_bytes: int = 1 << 30,
    ) -> None:
        self.batches, self.labelled, self.remap, self.device, self.progress = batches, labelled, remap, device, progress
        self.classifier = classifier
        self.lm = lm
        self.metric = ("perplexity" if lm else "top1" if labelled else "top1_agreement" if classifier
                       else "feature_cosine_mean")
        self._ref: list[Outputs] = _BoundedOutputs(reference_bytes) if lm else []
        self._dense: Loaded | None = None

    def __call__(self, loaded: Loaded, *, dense: bool) -> Measured:
        if self.lm:
            return self._lm(loaded, dense=dense)
        if dense:
            run = evaluate(loaded, self.batches(), remap=self.remap, device=self.device, on_batch=self.progress,
                           keep_outputs=self._ref)
            if run.result["samples"] == 0:
                raise InputError("the evaluation data yielded no items")
            if self.labelled and "accuracy" not in run.result:
                raise InputError("the evaluation data has no usable labels")
            fid: dict[str, Any] = {"feature_cosine_mean": 1.0, "nn_agreement": 1.0}
            if self.classifier:
                fid.update({"top1_agreement": 1.0, "kl_mean": 0.0})
        else:
            run = evaluate(loaded, self.batches(), reference_outputs=self._ref, remap=self.remap, device=self.device,
                           on_batch=self.progress)
            fid = run.result.get("fidelity") or {}
        acc = run.result.get("accuracy") or {}
        fields = {"top1": acc.get("top1"), "top5": acc.get("top5"), "top1_agreement": fid.get("top1_agreement"),
                  "kl_mean": fid.get("kl_mean"), "feature_cosine_mean": fid.get("feature_cosine_mean"),
                  "nn_agreement": fid.get("nn_agreement")}
        return fields, run.seconds

    def _lm(self, loaded: Loaded, *, dense: bool) -> Measured:
        if dense:
            self._dense = loaded
            run = evaluate(loaded, self.batches(), device=self.device, on_batch=self.progress, keep_outputs=self._ref)
            if run.result["samples"] == 0 or not run.result.get("tokens"):
                raise InputError("the evaluation data yielded no tokens to predict")
            if getattr(self._ref, "overflow", False):
                log.info("dense next-token logits exceed the cache budget: the dense model reruns at every point")
            fid: dict[str, Any] = {"top1_agreement": 1.0, "kl_mean": 0.0}
        else:
            live = getattr(self._ref, "overflow", False)
            run = evaluate(loaded, self.batches(), reference=self._dense if live else None,
                           reference_outputs=None if live else self._ref, device=self.device, on_batch=self.progress)
            fid = run.result.get("fidelity") or {}
        fields = {"perplexity": run.result["perplexity"], "nll_mean": run.result["nll_mean"],
                  "top1_agreement": fid.get("top1_agreement"), "kl_mean": fid.get("kl_mean")}
        return fields, run.seconds


def _row(sparsity: float | None, arm: str, compensated: bool | None, fields: dict[str, Any], counts: dict[str, Any],
         dense_flops: int, metric: str, seconds: float) -> dict[str, Any]:
    row = {
        "sparsity": sparsity, "arm": arm, "compensated": compensated, "metric": metric, **fields,
        "params": counts["params"], "tokens": counts["tokens"], "flops_per_item": counts["flops"],
        "flops_reduction": 1.0 - counts["flops"] / dense_flops, "seconds": round(seconds, 3),
    }
    row["value"] = row[metric]
    return row


def _dense_point(dense: Loaded, measure: Measure,
                 on_point: Callable[[dict[str, Any]], None] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dense model's counts and scored row, the first point of every sweep."""
    counts = model_counts(dense.model, family=dense.family)
    fields, seconds = measure(dense, dense=True)
    row = _row(0.0, "dense", None, fields, counts, counts["flops"], measure.metric, seconds)
    if on_point is not None:
        on_point(row)
    return counts, row


def _pruned_point(dense: Loaded, stats: Statistics, masks: list[Any], opts: PruneOptions, measure: Measure,
                  dense_flops: int, sparsity: float | None, arm: str) -> dict[str, Any]:
    """A copy of the dense model pruned to `masks` under `opts`, counted and scored: one sweep row."""
    model = copy.deepcopy(dense.model)
    apply_masks(model, stats, masks, opts, family=dense.family)
    counts = model_counts(model, family=dense.family)
    fields, seconds = measure(replace(dense, model=model), dense=False)
    return _row(sparsity, arm, opts.compensation, fields, counts, dense_flops, measure.metric, seconds)


def run_sweep(
    dense: Loaded,
    stats: Statistics,
    sparsities: list[float],
    base: PruneOptions,
    measure: Measure,
    *,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(dense row, one row per sparsity and arm), each scored by `measure` on `measure.metric`."""
    metric = measure.metric
    fam = dense.family
    dense_counts, dense_row = _dense_point(dense, measure, on_point)
    rows: list[dict[str, Any]] = []
    for s in sparsities:
        opts = replace(base, mlp_sparsity=s, attn_sparsity=s, vo_sparsity=s, head_sparsity=s)
        masks = plan_masks(dense.model, stats, opts, family=fam)  # ranking is the same for both arms
        for arm, compensated in ARMS:
            row = _pruned_point(dense, stats, masks, replace(opts, compensation=compensated), measure,
                                dense_counts["flops"], s, arm)
            rows.append(row)
            log.info("sparsity %.3g %s: %s=%.4f", s, arm, metric, row["value"])
            if on_point is not None:
                on_point(row)
    return dense_row, rows


def run_budget_sweep(
    dense: Loaded,
    stats: Statistics,
    budgets: list[float],
    base: PruneOptions,
    measure: Measure,
    *,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(dense row, rows): per budget, the allocator's widths and one uniform sparsity at the same FLOPs (or just under)."""
    from corp_cli.allocation import allocate, uniform_sparsity

    metric = measure.metric
    fam = dense.family
    dense_counts, dense_row = _dense_point(dense, measure, on_point)
    rows: list[dict[str, Any]] = []
    for budget in budgets:
        opts = replace(base, flops_budget=budget)
        alloc = allocate(fam, dense.model, stats, opts)
        arms = [("allocated", None, plan_masks(dense.model, stats, opts, family=fam, widths=alloc.widths))]
        # uniform at the FLOPs the allocation reached, so neither arm gets more compute
        s, _ = uniform_sparsity(fam, dense.model, base, alloc.flops / alloc.dense_flops)
        uni = replace(base, **{PART_SPARSITY[p]: s for p in base.parts})
        arms.append(("uniform", s, plan_masks(dense.model, stats, uni, family=fam)))
        for arm, sparsity, masks in arms:
            row = _pruned_point(dense, stats, masks, base if sparsity is None else uni, measure, dense_counts["flops"],
                                sparsity if sparsity is not None else float("nan"), arm)
            row["sparsity"] = sparsity
            row["flops_budget"] = budget
            rows.append(row)
            log.info("budget %.3g %s: %s=%.4f at %.4f of the dense FLOPs", budget, arm, metric, row["value"],
                     row["flops_per_item"] / dense_counts["flops"])
            if on_point is not None:
                on_point(row)
    return dense_row, rows


# why a sequential sweep calibrates at every point (printed once at the start, and in sweep.json)
SEQUENTIAL_NOTE = ("sequential: re-calibrating at every point (sequential statistics, taken on the "
                   "already-pruned model, cannot be reused across points)")


class _Fitted(NamedTuple):
    """A sequential prune's statistics, masks and (under a budget) allocation, without its model."""

    stats: Statistics
    masks: list[Any]
    allocation: dict[str, Any] | None


def _sequential_point(dense: Loaded, calib: Any, opts: PruneOptions, measure: Measure, dense_flops: int,
                      sparsity: float | None, arm: str, seq: dict[str, Any]) -> tuple[dict[str, Any], _Fitted]:
    """`corp prune --sequential` with `opts` on a copy of the dense model, scored: (its row, what the other
    arms reuse of it)."""
    from corp_cli import api

    res = api.prune(dense, options=opts, sequential=True, data=calib, **seq)  # on a deep copy
    counts = model_counts(res.loaded.model, family=dense.family)
    fields, seconds = measure(res.loaded, dense=False)
    row = _row(sparsity, arm, True, fields, counts, dense_flops, measure.metric, seconds)
    row["prune_seconds"] = round(res.seconds, 3)  # the sequential calibration and prune of this point
    return row, _Fitted(res.stats, res.masks, res.allocation)  # the pruned copy dropped: one in memory at a time


def _emit(rows: list[dict[str, Any]], new: list[dict[str, Any]], what: str, metric: str,
          on_point: Callable[[dict[str, Any]], None] | None) -> None:
    for row in new:
        rows.append(row)
        log.info("%s %s (sequential): %s=%.4f", what, row["arm"], metric, row["value"])
        if on_point is not None:
            on_point(row)


def run_sequential_sweep(
    dense: Loaded,
    calib: Any,
    sparsities: list[float],
    base: PruneOptions,
    measure: Measure,
    *,
    target: str,
    ranking: str = DEFAULT_RANKING,
    batch_size: int = 32,
    workers: int = 0,
    forward_dtype: torch.dtype | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """run_sweep with `corp prune --sequential` at every point: (dense row, one row per sparsity and arm).

    `calib` is the calibration data (what api.prune(sequential=True) takes as `data`: an opened
    source, or a spec), streamed again at every point, since each sparsity prunes the earlier
    blocks differently. The corp arm is the sequential prune (`ranking` as prune's
    sequential_ranking); the no-compensation arm applies the same masks to a fresh copy without any
    correction (the sequential sums only enter its report).
    """
    from corp_cli.sequential import check_dense_ranking, check_ranking, check_target

    check_target(target)
    check_dense_ranking(check_ranking(ranking), masks=False, budgeted=base.budgeted)
    if base.flops_budget is not None:
        raise InputError("run_sequential_sweep takes sparsities: give FLOPs budgets to run_sequential_budget_sweep")
    seq = {"sequential_target": target, "sequential_ranking": ranking, "batch_size": batch_size, "workers": workers,
           "forward_dtype": forward_dtype}
    dense_counts, dense_row = _dense_point(dense, measure, on_point)
    flops = dense_counts["flops"]
    rows: list[dict[str, Any]] = []
    for s in sparsities:
        opts = replace(base, mlp_sparsity=s, attn_sparsity=s, vo_sparsity=s, head_sparsity=s, compensation=True)
        corp, res = _sequential_point(dense, calib, opts, measure, flops, s, "corp", seq)
        plain = _pruned_point(dense, res.stats, res.masks, replace(opts, compensation=False), measure, flops, s,
                              "no-compensation")
        _emit(rows, [corp, plain], f"sparsity {s:g}", measure.metric, on_point)
    return dense_row, rows


def run_sequential_budget_sweep(
    dense: Loaded,
    calib: Any,
    budgets: list[float],
    base: PruneOptions,
    measure: Measure,
    *,
    target: str,
    batch_size: int = 32,
    workers: int = 0,
    forward_dtype: torch.dtype | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """run_budget_sweep with `corp prune --sequential` in every arm: (dense row, three rows per budget).

    The arms are run_budget_sweep's, each pruned sequentially: "allocated" is `corp prune
    --sequential --flops-budget b` (every block's widths chosen on its sequential statistics);
    "uniform" is a sequential prune at the one sparsity whose FLOPs come closest, from below, to
    what the allocated arm reached (allocation.uniform_sparsity, from the shapes alone, as
    run_budget_sweep finds it); "no-compensation" is the allocated arm's masks with no correction,
    as run_sequential_sweep's. The ranking is the pruned stream's (a budget refuses dense ranking).
    """
    from corp_cli.allocation import uniform_sparsity
    from corp_cli.sequential import check_target

    check_target(target)
    seq = {"sequential_target": target, "batch_size": batch_size, "workers": workers, "forward_dtype": forward_dtype}
    dense_counts, dense_row = _dense_point(dense, measure, on_point)
    flops = dense_counts["flops"]
    rows: list[dict[str, Any]] = []
    for budget in budgets:
        opts = replace(base, flops_budget=budget, compensation=True)
        alloc, res = _sequential_point(dense, calib, opts, measure, flops, None, "allocated", seq)
        # its masks uncompensated, before the uniform prune, so that one prune's statistics are held at a time
        plain = _pruned_point(dense, res.stats, res.masks, replace(opts, compensation=False), measure, flops, None,
                              "no-compensation")
        # uniform at the FLOPs the allocation reached, so neither arm gets more compute
        assert res.allocation is not None  # a budgeted sequential prune reports its allocation
        alloc["allocation"] = res.allocation  # what it chose, block by block (sweep.json; the CSV leaves it out)
        s, _ = uniform_sparsity(dense.family, dense.model, base, res.allocation["flops_ratio"])
        uni = replace(base, compensation=True, **{PART_SPARSITY[p]: s for p in base.parts})
        uniform, _ = _sequential_point(dense, calib, uni, measure, flops, s, "uniform", seq)
        for row in (alloc, plain, uniform):
            row["flops_budget"] = budget
        _emit(rows, [alloc, plain, uniform], f"budget {budget:g}", measure.metric, on_point)
    return dense_row, rows


def csv_text(rows: list[dict[str, Any]], columns: tuple[str, ...] = CSV_COLUMNS) -> str:
    cols = list(columns)
    if any("perplexity" in r for r in rows):
        at = cols.index("value") + 1
        cols[at:at] = LM_COLUMNS
    columns = tuple(cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
    return buf.getvalue()


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def metric_scale(metric: str) -> float:
    return 100.0 if metric in PERCENT_METRICS else 1.0


def plot(path: Path, dense_row: dict[str, Any], rows: list[dict[str, Any]], title: str, item: str = "image") -> None:
    """Metric vs sparsity for both arms (left axis), GFLOPs per item (right axis)."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never needs a display
    import matplotlib.pyplot as plt

    metric = dense_row["metric"]
    k = metric_scale(metric)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for arm, style in (("corp", "o-"), ("no-compensation", "s--")):
            pts = [r for r in rows if r["arm"] == arm]
            ax.plot([100 * r["sparsity"] for r in pts], [k * r["value"] for r in pts], style, label=arm)
        ax.axhline(k * dense_row["value"], color="grey", lw=1, ls=":", label="dense")
        if metric in LOG_METRICS:
            ax.set_yscale("log")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        pts = [r for r in rows if r["arm"] == "corp"]
        ax2.plot([100 * r["sparsity"] for r in pts], [r["flops_per_item"] / 1e9 for r in pts], "^:", color="tab:green",
                 label=f"GFLOPs / {item}")
        ax2.set_ylabel(f"GFLOPs / {item}", color="tab:green")
        ax2.set_ylim(bottom=0)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left" if metric in LOG_METRICS else "lower left",
                  fontsize=8)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def plot_budgets(path: Path, dense_row: dict[str, Any], rows: list[dict[str, Any]], title: str, item: str = "image") -> None:
    """Metric vs GFLOPs per item, for the allocated and the uniform arm (and a sequential sweep's uncompensated one)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    metric = dense_row["metric"]
    k = metric_scale(metric)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        labels = {"allocated": "allocated (--flops-budget)", "uniform": "uniform sparsity",
                  "no-compensation": "allocated, no compensation"}
        for arm, style in (("allocated", "o-"), ("uniform", "s--"), ("no-compensation", "x:")):
            pts = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["flops_per_item"])
            if pts:
                ax.plot([r["flops_per_item"] / 1e9 for r in pts], [k * r["value"] for r in pts], style,
                        label=labels[arm])
        ax.plot([dense_row["flops_per_item"] / 1e9], [k * dense_row["value"]], "k*", label="dense")
        ax.set_xlabel(f"GFLOPs / {item}")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)

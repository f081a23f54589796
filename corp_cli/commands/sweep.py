"""`corp sweep`: prune at many sparsities from one statistics file, both arms, evaluate, CSV/JSON/plot."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from corp_cli import defaults as D
from corp_cli.commands import common as C
from corp_cli.commands.evaluate import open_eval_source

log = logging.getLogger(__name__)

CSV_FILE, JSON_FILE, PNG_FILE = "sweep.csv", "sweep.json", "sweep.png"
PLOT_HINT = "pip install 'corp-cli[plot]' (or: pip install matplotlib) to get sweep.png"


@C.handle_errors
def sweep_cmd(
    model: C.ModelArg,
    data: Annotated[str, typer.Option("--data", help="Evaluation data: an image folder, hf:NAME\\[:CONFIG]\\[@SPLIT] or synthetic; text:pydoc@eval, text:FILE or hf:NAME for text models.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (sweep.csv, sweep.json, sweep.png).")],
    stats_path: Annotated[Path | None, typer.Option("--stats", help="Statistics from `corp calibrate` (used for every point; no re-calibration). Required unless --sequential.")] = None,
    sparsities: Annotated[str | None, typer.Option("--sparsities", help=f"Comma list, or a run a,b,...,c (default: {D.SWEEP_SPARSITIES}).")] = None,
    flops_budgets: Annotated[str | None, typer.Option("--flops-budgets", help=f"Instead of sparsities: FLOPs fractions (e.g. {D.SWEEP_FLOPS_BUDGETS}); each is pruned with the widths the allocator chooses (prune --flops-budget) and with one uniform sparsity at the same FLOPs, and both are plotted against FLOPs. With --sequential both arms are pruned sequentially (prune --sequential --flops-budget, and prune --sequential at the uniform sparsity of the FLOPs the allocated arm reached), beside a third: the allocated arm's masks with no compensation.")] = None,
    target: Annotated[str | None, typer.Option("--target", help=f"A comma list of mlp, qk, vo, heads; attn = qk, both = mlp,qk, all = mlp,qk,vo (default: {D.TARGET} where the model allows Q/K pruning, else mlp).")] = None,
    ranker: Annotated[str | None, typer.Option("--ranker", help=f"MLP ranking: {', '.join(D.MLP_RANKERS)} (default: {D.RANKER}).")] = None,
    qk_ranker: Annotated[str | None, typer.Option("--qk-ranker", help=f"Q/K ranking: {', '.join(D.QK_RANKERS)} (default: {D.QK_RANKER}).")] = None,
    round_to: Annotated[int | None, typer.Option("--round-to", min=1, help=f"Keep MLP survivor counts multiples of N (default: {D.ROUND_TO}).")] = None,
    labels: Annotated[bool | None, typer.Option("--labels/--no-labels", help="Plot top-1 accuracy (labels) or agreement with the dense model (default: labels when the model has a classifier and the data has them).")] = None,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="Evaluate on this many images or texts (default: all).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for choosing the --samples subset (and the --calib-samples one).")] = D.SEED,
    sequential: Annotated[bool, typer.Option("--sequential", help="Prune every point as `corp prune --sequential` does, re-calibrating at every point from --calib-data (sequential statistics cannot be reused across points; not with --stats).")] = False,
    sequential_target: Annotated[str | None, typer.Option("--sequential-target", help="With --sequential: dense, self or blend (default: blend; see `corp prune --sequential-target`).")] = None,
    sequential_ranking: Annotated[str | None, typer.Option("--sequential-ranking", help="With --sequential: stream or dense, as for `corp prune --sequential-ranking`; the no-compensation arm takes the same masks (not with --flops-budgets) (default: stream).")] = None,
    calib_data: Annotated[str | None, typer.Option("--calib-data", help="With --sequential: the calibration data, as for `corp prune --calib-data`.")] = None,
    calib_samples: Annotated[int | None, typer.Option("--calib-samples", min=1, help=f"With --sequential: calibrate on this many items (default: {D.CALIB_SAMPLES}).")] = None,
    cache_mb: Annotated[int, typer.Option("--cache-mb", min=0, help="Keep decoded evaluation batches in memory up to this size (and, for language models, the dense next-token logits; beyond it the dense model reruns at every point).")] = D.SWEEP_CACHE_MB,
    checkpoint: C.CheckpointOpt = None,
    num_classes: C.NumClassesOpt = None,
    model_arg: C.ModelArgOpt = None,
    pretrained_cfg: C.PretrainedCfgOpt = None,
    seq_len: C.SeqLenOpt = None,
    device: C.DeviceOpt = D.DEVICE,
    batch_size: C.BatchSizeOpt = D.EVAL_BATCH_SIZE,
    workers: C.WorkersOpt = None,
    overwrite: C.OverwriteOpt = False,
    json_out: C.JsonOpt = None,
) -> None:
    """Accuracy (or fidelity) vs sparsity for CORP and the uncompensated baseline, with FLOPs; or vs FLOPs budgets.

    Classifiers are scored on top-1 (labelled data) or agreement with the dense model;
    backbones and text encoders on the cosine of their pooled feature to the dense model's;
    causal language models on held-out perplexity.
    """
    from corp_cli.artifacts import atomic_dir, check_out_dir, write_bytes_atomic, write_json_atomic
    from corp_cli.devices import environment
    from corp_cli.errors import InputError
    from corp_cli.evaluate import label_remap
    from corp_cli.loading import load_dense
    from corp_cli.prune_checks import check_for_model
    from corp_cli.pruning import PruneOptions, stats_parts_for
    from corp_cli.stats import Statistics, check_matches, require_parts
    from corp_cli.sweep import (
        BUDGET_CSV_COLUMNS, CSV_COLUMNS, EvalMeasure, batch_provider, csv_text, have_matplotlib, parse_budgets, parse_sparsities, plot, plot_budgets,
        SEQUENTIAL_NOTE, run_budget_sweep, run_sequential_budget_sweep, run_sequential_sweep, run_sweep,
    )

    t0 = time.perf_counter()
    if sparsities is not None and flops_budgets is not None:
        raise InputError("give --sparsities or --flops-budgets, not both")
    budgets = parse_budgets(flops_budgets) if flops_budgets is not None else None
    points = budgets if budgets is not None else parse_sparsities(sparsities or D.SWEEP_SPARSITIES)
    seq_target, seq_ranking = _check_sequential(sequential, sequential_target, sequential_ranking, stats_path, calib_data,
                                                calib_samples, budgets)
    flags = {"target": target, "ranker": ranker, "qk_ranker": qk_ranker, "round_to": round_to}
    PruneOptions(**{k: v for k, v in flags.items() if v is not None})  # option values checked before any loading
    check_out_dir(out, overwrite=overwrite)
    stats = Statistics.load(C.existing_file(stats_path, "--stats")) if stats_path is not None else None
    loaded = load_dense(model, C.model_options(checkpoint, num_classes, pretrained_cfg, model_arg, seq_len=seq_len), device)
    # the same target, warning and refusals as `corp prune` (corp_cli.prune_checks)
    base = check_for_model(PruneOptions(**{k: v for k, v in flags.items() if v is not None}),  # type: ignore[arg-type]
                           loaded.family, loaded.model, target_given=target is not None, flags=flags)
    n_workers = C.workers_for(loaded.modality, workers)
    if stats is not None:
        require_parts(stats, stats_parts_for(base.parts))
        check_matches(stats, loaded.identity)
    dev = next(loaded.model.parameters()).device
    source = open_eval_source(data, loaded, samples, seed, labels)
    calib = None
    if seq_target is not None:
        from corp_cli.sources import open_data

        calib = open_data(calib_data, loaded.modality, samples=calib_samples or D.CALIB_SAMPLES, seed=seed,  # type: ignore[arg-type]
                          flag="--calib-data", text_unit=loaded.family.text_unit)
    remap = label_remap(source, loaded.identity.num_classes, loaded.classes) if source.labels else None
    batches = batch_provider(loaded.preprocessing, source, batch_size, n_workers, cache_mb * 2**20)
    measure = EvalMeasure(batches, labelled=source.labels, classifier=loaded.family.has_classifier(loaded.model),
                          remap=remap, device=dev, lm=loaded.family.evaluation(loaded.model) == "lm",
                          reference_bytes=cache_mb * 2**20)
    unit = C.sample_unit(loaded.preprocessing.to_dict())
    item = "image" if loaded.modality == "image" else f"{loaded.family.tokens_per_item(loaded.model)}-token sequence"
    count = loaded.preprocessing.count(source)
    arms = 3 if seq_target is not None and budgets is not None else 2
    total = count * (1 + arms * len(points)) if count is not None else None
    what = "FLOPs budgets" if budgets is not None else "sparsities"
    with C.progress_bar(f"sweeping {len(points)} {what} x {arms} arms", total, unit=unit) as advance:
        measure.progress = advance
        if seq_target is not None:
            C.err.print(SEQUENTIAL_NOTE, markup=False, highlight=False, soft_wrap=True)  # one line, never wrapped
            if budgets is not None:
                dense_row, rows = run_sequential_budget_sweep(loaded, calib, budgets, base, measure, target=seq_target,
                                                              batch_size=batch_size, workers=n_workers)
            else:
                dense_row, rows = run_sequential_sweep(loaded, calib, points, base, measure, target=seq_target,
                                                       ranking=seq_ranking, batch_size=batch_size, workers=n_workers)
        elif budgets is not None:
            assert stats is not None
            dense_row, rows = run_budget_sweep(loaded, stats, budgets, base, measure)
        else:
            assert stats is not None
            dense_row, rows = run_sweep(loaded, stats, points, base, measure)
    report: dict[str, Any] = {
        "command": "sweep",
        "model": loaded.identity.to_dict(),
        "stats": None if stats is None else {
            "path": str(stats_path), "fingerprint": stats.fingerprint(), "samples": stats.meta.get("samples"),
            "synthetic": stats.meta.get("synthetic")},
        "sequential": None if seq_target is None else {
            "target": seq_target, "ranking": seq_ranking, "recalibrated_per_point": True, "note": SEQUENTIAL_NOTE,
            "calib_data": calib.describe()},
        "data": source.describe(),
        "synthetic": bool(getattr(source, "synthetic", False)),
        "preprocessing": loaded.preprocessing.to_dict(),
        "options": base.to_dict(),
        **({"flops_budgets": points} if budgets is not None else {"sparsities": points}),
        "metric": dense_row["metric"],
        "per_item": item,
        "dense": dense_row,
        "points": rows,
        "environment": environment(dev),
    }
    plotted = have_matplotlib()
    report["files"] = [CSV_FILE, JSON_FILE] + ([PNG_FILE] if plotted else [])
    with atomic_dir(out) as tmp:
        columns = BUDGET_CSV_COLUMNS if budgets is not None else CSV_COLUMNS
        write_bytes_atomic(tmp / CSV_FILE, csv_text([dense_row, *rows], columns).encode())
        if plotted:
            title = f"{loaded.identity.name} on {source.spec} ({source.describe()['count'] or '?'} {unit}), target {base.target}"
            if seq_target is not None:
                title += f", sequential {seq_target}, {seq_ranking} ranking (re-calibrated per point)"
            (plot_budgets if budgets is not None else plot)(tmp / PNG_FILE, dense_row, rows, title, item)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        write_json_atomic(tmp / JSON_FILE, report)
    if not plotted:
        C.err.print(f"note: wrote {CSV_FILE} and {JSON_FILE} but no plot: matplotlib is not installed; {PLOT_HINT}", markup=False)
    if not C.write_json(json_out, {"out": str(out), **report}):
        print_report(out, report)


def _check_sequential(sequential: bool, target: str | None, ranking: str | None, stats_path: Path | None,
                      calib_data: str | None, calib_samples: int | None,
                      budgets: list[float] | None) -> tuple[str | None, str | None]:
    """The sequential target and ranking ((None, None): a one-shot sweep), or the one-line refusal of a combination
    that does not apply."""
    from corp_cli.errors import InputError

    if not sequential:
        given = [f for f, v in (("--sequential-target", target), ("--sequential-ranking", ranking),
                                ("--calib-data", calib_data), ("--calib-samples", calib_samples)) if v is not None]
        if given:
            raise InputError(f"{', '.join(given)} apply with --sequential only")
        if stats_path is None:
            raise InputError("sweep needs --stats (from `corp calibrate`), or --sequential with --calib-data")
        return None, None
    if calib_data is None and stats_path is None:
        raise InputError("--sequential needs --calib-data: every point calibrates on the already-pruned model")
    from corp_cli.prune_checks import sequential_choice

    choice = sequential_choice(True, stats_given=stats_path is not None, target=target, ranking=ranking,
                               masks_given=False, budgeted=budgets is not None)
    assert choice is not None
    return choice.target, choice.ranking


def _fmt(x: float | None, metric: str) -> str:
    from corp_cli.sweep import PERCENT_METRICS

    if x is None:
        return "-"
    return f"{100 * x:.2f}" if metric in PERCENT_METRICS else f"{x:.4f}"


def print_report(out: Path, report: dict[str, Any]) -> None:
    from corp_cli.sweep import METRIC_LABELS

    metric = report["metric"]
    item = report["per_item"]
    if "flops_budgets" in report:
        _print_budgets(out, report)
        return
    seq = (f", sequential {report['sequential']['target']}, {report['sequential']['ranking']} ranking"
           if report.get("sequential") else "")
    table = Table(title=f"corp sweep -> {out}  ({METRIC_LABELS[metric]} vs sparsity{seq})")
    for col in ("sparsity", "corp", "no-compensation", f"GFLOPs/{item}", "FLOP cut"):
        table.add_column(col, justify="right")
    d = report["dense"]
    table.add_row("dense", _fmt(d["value"], metric), _fmt(d["value"], metric), f"{d['flops_per_item'] / 1e9:.3f}", "")
    by = {(r["sparsity"], r["arm"]): r for r in report["points"]}
    for s in report["sparsities"]:
        c, u = by[(s, "corp")], by[(s, "no-compensation")]
        table.add_row(
            f"{s:g}", _fmt(c["value"], metric), _fmt(u["value"], metric),
            f"{c['flops_per_item'] / 1e9:.3f}", f"-{100 * c['flops_reduction']:.1f}%",
        )
    C.out.print(table)
    _print_files(out, report)


def _print_files(out: Path, report: dict[str, Any]) -> None:
    synth = "  [SYNTHETIC data: smoke test only]" if report["synthetic"] or (report["stats"] or {}).get("synthetic") or (
        (report.get("sequential") or {}).get("calib_data", {}).get("synthetic")) else ""
    C.out.print(f"wrote {', '.join(report['files'])} in {out}; {report['seconds']:.1f}s{synth}")


def _print_budgets(out: Path, report: dict[str, Any]) -> None:
    from corp_cli.sweep import METRIC_LABELS

    metric = report["metric"]
    item = report["per_item"]
    table = Table(title=f"corp sweep -> {out}  ({METRIC_LABELS[metric]} vs FLOPs budget)")
    by = {(r["flops_budget"], r["arm"]): r for r in report["points"]}
    plain = any(arm == "no-compensation" for _, arm in by)  # a sequential sweep's third arm
    if report.get("sequential"):
        table.title = f"{table.title}, sequential {report['sequential']['target']}"
    for col in ("budget", "allocated", *(("no comp.",) if plain else ()), "uniform",
                "uniform sparsity", f"GFLOPs/{item} (alloc / uniform)"):
        table.add_column(col, justify="right")
    d = report["dense"]
    dense = (_fmt(d["value"], metric),) * (3 if plain else 2)
    table.add_row("dense", *dense, "", f"{d['flops_per_item'] / 1e9:.3f}")
    for b in report["flops_budgets"]:
        a, u = by[(b, "allocated")], by[(b, "uniform")]
        table.add_row(f"{b:g}", _fmt(a["value"], metric),
                      *((_fmt(by[(b, "no-compensation")]["value"], metric),) if plain else ()),
                      _fmt(u["value"], metric), f"{u['sparsity']:.3f}",
                      f"{a['flops_per_item'] / 1e9:.3f} / {u['flops_per_item'] / 1e9:.3f}")
    C.out.print(table)
    _print_files(out, report)

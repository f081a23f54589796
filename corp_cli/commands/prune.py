"""`corp prune`: rank, compensate and compact; write masks, the compacted checkpoint and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from corp_cli import defaults as D
from corp_cli.commands import common as C


@C.handle_errors
def prune_cmd(
    model: C.ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Output directory (masks.safetensors, model.safetensors, report.json).")],
    stats_path: Annotated[Path | None, typer.Option("--stats", help="Statistics from `corp calibrate`. Without it, calibrates first from --calib-data.")] = None,
    calib_data: Annotated[str | None, typer.Option("--calib-data", help=f"Calibration data when --stats is not given (default {D.CALIB_DATA['image']} for images, {D.CALIB_DATA['text']} for text).")] = None,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help=f"Calibration images or texts when calibrating here (default {D.CALIB_SAMPLES}).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for choosing the calibration subset when calibrating here (default 0).")] = None,
    sparsity: Annotated[float | None, typer.Option("--sparsity", help=f"Fraction removed, for every part the target prunes (default: {D.MLP_SPARSITY}).")] = None,
    mlp_sparsity: Annotated[float | None, typer.Option("--mlp-sparsity", help="Fraction of MLP hidden units removed (overrides --sparsity).")] = None,
    attn_sparsity: Annotated[float | None, typer.Option("--attn-sparsity", help="Fraction of each head's Q/K dims removed (overrides --sparsity).")] = None,
    vo_sparsity: Annotated[float | None, typer.Option("--vo-sparsity", help="Fraction of each head's value/output dims removed (overrides --sparsity).")] = None,
    head_sparsity: Annotated[float | None, typer.Option("--head-sparsity", help="Fraction of each block's heads removed (overrides --sparsity).")] = None,
    q_head_sparsity: Annotated[float | None, typer.Option("--q-head-sparsity", help="Grouped-query attention: fraction of the query heads removed inside each kept key/value group (the same count in every group; with --target heads).")] = None,
    kv_budget: Annotated[float | None, typer.Option("--kv-budget", help="Decoders: keep at most this fraction (0-1] of the dense KV-cache bytes per token; with or without --flops-budget, the allocator chooses every block's heads and Q/K and value widths.")] = None,
    flops_budget: Annotated[float | None, typer.Option("--flops-budget", help="Keep at most this fraction (0-1) of the dense FLOPs: every block's widths of every part in --target are chosen to minimise the predicted error (instead of the sparsities).")] = None,
    target: Annotated[str | None, typer.Option("--target", help=f"What to prune, a comma list of mlp, qk (Q/K dims), vo (value/output dims), heads; attn = qk, both = mlp,qk, all = mlp,qk,vo (default: {D.TARGET} where the model allows Q/K pruning, else mlp).")] = None,
    ranker: Annotated[str | None, typer.Option("--ranker", help=f"MLP ranking: {', '.join(D.MLP_RANKERS)} (default: {D.RANKER}).")] = None,
    qk_ranker: Annotated[str | None, typer.Option("--qk-ranker", help=f"Q/K ranking: {', '.join(D.QK_RANKERS)} (default: {D.QK_RANKER}).")] = None,
    vo_ranker: Annotated[str | None, typer.Option("--vo-ranker", help=f"Value/output dim ranking within each head: {', '.join(D.VO_RANKERS)} (default: {D.VO_RANKER}).")] = None,
    head_ranker: Annotated[str | None, typer.Option("--head-ranker", help=f"Head ranking: {', '.join(D.HEAD_RANKERS)} (default: {D.HEAD_RANKER}: the compensated error of removing the head).")] = None,
    lam: Annotated[str | None, typer.Option("--lambda", help="Ridge lambda: auto (data-scaled shrinkage) or a number (default: auto).")] = None,
    no_compensation: Annotated[bool, typer.Option("--no-compensation", help="Drop units with no correction (the baseline).")] = False,
    round_to: Annotated[int | None, typer.Option("--round-to", help=f"Keep MLP survivor counts multiples of N (default: {D.ROUND_TO}, kernel-friendly; 1 keeps the exact fractions).")] = None,
    min_keep: Annotated[int | None, typer.Option("--min-keep", help=f"Never keep fewer MLP units per block (default: {D.MIN_KEEP}).")] = None,
    min_qk_dim: Annotated[int | None, typer.Option("--min-qk-dim", help=f"Never keep fewer Q/K dims per head (default: {D.MIN_QK_DIM}).")] = None,
    qk_fold: Annotated[str | None, typer.Option("--qk-fold", help="Fold the logit correction into q only, or balanced between q and k (default: balanced).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML preset (see configs/); explicit flags win over it.")] = None,
    masks_path: Annotated[Path | None, typer.Option("--masks", help="Reapply these masks instead of ranking.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Calibration forward dtype when calibrating here: fp32 (default), or bf16/fp16 under autocast.")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="Calibrate block by block on the already-pruned model's activations, each block's correction fit toward --sequential-target (calibrates here: not with --stats).")] = False,
    sequential_target: Annotated[str | None, typer.Option("--sequential-target", help="With --sequential: dense (fit the pruned block to the dense model's residual stream and logits), self (to its own output on the pruned stream), or blend (the dense fit shrunk toward the self fit by 2-fold cross-validation) (default: blend, what the held-out evidence favours).")] = None,
    sequential_ranking: Annotated[str | None, typer.Option("--sequential-ranking", help="With --sequential: stream (every block ranks its units on its pruned-stream statistics) or dense (the units a one-shot prune with the same options chooses, from a first dense pass; only the corrections fit sequentially; not with --masks or a budget) (default: stream).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check every input and print the plan (calibration memory, kept widths) without running it.")] = False,
    max_memory: Annotated[str | None, typer.Option("--max-memory", help="Refuse to calibrate when the expected peak exceeds this (e.g. 8G; default: the device's free memory).")] = None,
    checkpoint: C.CheckpointOpt = None,
    num_classes: C.NumClassesOpt = None,
    model_arg: C.ModelArgOpt = None,
    pretrained_cfg: C.PretrainedCfgOpt = None,
    mean: C.MeanOpt = None,
    std: C.StdOpt = None,
    input_size: C.InputSizeOpt = None,
    interpolation: C.InterpOpt = None,
    crop_pct: C.CropPctOpt = None,
    crop_mode: C.CropModeOpt = None,
    seq_len: C.SeqLenOpt = None,
    device: C.DeviceOpt = D.DEVICE,
    batch_size: C.BatchSizeOpt = D.CALIB_BATCH_SIZE,
    workers: C.WorkersOpt = None,
    overwrite: C.OverwriteOpt = False,
    json_out: C.JsonOpt = None,
) -> None:
    """Prune MODEL with CORP: remove MLP units, Q/K dims, value/output dims or heads, fold the closed-form compensation in."""
    from corp_cli import prune_job, report_plot

    C.quiet_unless_main_rank()
    job = prune_job.PruneJob(
        model=model, out=out, values={
            "sparsity": sparsity, "mlp_sparsity": mlp_sparsity, "attn_sparsity": attn_sparsity, "vo_sparsity": vo_sparsity,
            "head_sparsity": head_sparsity, "q_head_sparsity": q_head_sparsity, "kv_budget": kv_budget,
            "flops_budget": flops_budget, "target": target, "ranker": ranker, "qk_ranker": qk_ranker,
            "vo_ranker": vo_ranker, "head_ranker": head_ranker, "lam": lam, "round_to": round_to, "min_keep": min_keep,
            "min_qk_dim": min_qk_dim},
        no_compensation=no_compensation, qk_fold=qk_fold, stats_path=stats_path, calib_data=calib_data, samples=samples,
        seed=seed, config=config, masks_path=masks_path, dtype=dtype, sequential=sequential,
        sequential_target=sequential_target, sequential_ranking=sequential_ranking, dry_run=dry_run, max_memory=max_memory,
        model_options=lambda preset_args: C.model_options(
            checkpoint, num_classes, pretrained_cfg, model_arg, preset_args, seq_len=seq_len, mean=mean, std=std,
            input_size=input_size, interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode),
        seq_len=seq_len, device=device, batch_size=batch_size, workers=workers, overwrite=overwrite)
    done = prune_job.run(job, progress=C.progress_bar, workers_for=C.workers_for)
    if done.dry_run:
        _print_dry_run(done.plan, done.loaded, done.opts, out, json_out, model, done.options, stats=done.stats,
                       family=done.family, shape_model=done.shape_model)
        return
    report = done.report
    if report is None:
        return  # another rank writes
    drawn = str(done.plot) if done.plot is not None else None
    if not C.write_json(json_out, {"out": str(out), **report, **({"plot": drawn} if done.plotted else {})}):
        _print_summary(out, report)
    if json_out == "-" or not done.plotted:
        return  # stdout is the JSON alone, whose "plot" says where the picture is (null: not drawn)
    if drawn is not None:
        C.out.print(f"picture of the prune -> {drawn}", markup=False, highlight=False)
    else:
        C.err.print(f"note: no {report_plot.PNG_FILE}: matplotlib is not installed; {report_plot.HINT}", markup=False,
                    highlight=False)


def _print_dry_run(plan: Any, loaded: Any, opts: Any, out: Path, json_out: str | None, model: str, options: Any,
                   stats: Any = None, family: Any = None, shape_model: Any = None) -> None:
    """What a prune would do: the calibration plan (when it calibrates), and the widths every block keeps."""
    from corp_cli.pruning import planned_totals, planned_widths

    fam = family or (loaded.family if loaded is not None else None)
    shape_model = shape_model if shape_model is not None else (loaded.model if loaded is not None else None)
    if fam is None or shape_model is None:
        from corp_cli.loading import resolve_model

        fam, name = resolve_model(model, options)
        shape_model = fam.meta_model(name, options) or fam.load(name, options, "cpu").model
    widths = planned_widths(fam, shape_model, opts)
    totals = planned_totals(fam, shape_model, widths) if widths else None
    report = {"dry_run": True, "out": str(out), "options": opts.to_dict(), "widths": widths, "totals": totals,
              "calibration": plan.to_dict() if plan is not None else None,
              "stats": {"path": str(stats.path), "bytes": stats.path.stat().st_size} if stats is not None else None,
              **({"sequential": plan.sequential} if plan is not None and plan.sequential is not None else {})}
    if C.write_json(json_out, report):
        return
    if plan is not None:
        from corp_cli.commands.calibrate import print_plan

        print_plan(plan, "corp prune (calibration)")
    if not widths:
        C.out.print(f"corp prune plan -> {out}: the budget chooses every block's widths from the statistics "
                    "(after calibration)")
        return
    attn = any(w["heads_kept"] != w["num_heads"] or w["v_kept"] != w["head_dim"] for w in widths)
    table = Table(title=f"corp prune plan -> {out} (target {opts.target})")
    for col in ("block", "mlp kept", "qk kept", *(("heads", "vo kept") if attn else ())):
        table.add_column(col, justify="right")
    for w in widths:
        table.add_row(str(w["block"]), f"{w['mlp_kept']}/{w['mlp_hidden']}", f"{w['qk_kept']}/{w['head_dim']}",
                      *((f"{w['heads_kept']}/{w['num_heads']}", f"{w['v_kept']}/{w['head_dim']}") if attn else ()))
    C.out.print(table)
    assert totals is not None
    kv = (f"; KV cache {totals['kv_bytes_per_token_dense']:,} -> {totals['kv_bytes_per_token']:,} bytes per token "
          f"({totals['kv_ratio']:.3f} of dense)" if "kv_ratio" in totals else "")
    C.out.print(f"FLOPs per item ({totals['tokens']} tokens) {totals['flops_dense'] / 1e9:.2f}G -> "
                f"{totals['flops'] / 1e9:.2f}G ({totals['flops_ratio']:.3f} of dense){kv}")


def _print_allocation(out: Path, report: dict[str, Any]) -> None:
    alloc = report["allocation"]
    asked = " ".join(([f"--flops-budget {alloc['flops_budget']:g}"] if alloc.get("flops_budget") is not None else [])
                     + ([f"--kv-budget {alloc['kv_budget']:g}"] if alloc.get("kv_budget") is not None else []))
    kv = f", {alloc['kv_ratio']:.4f} of the dense KV cache" if "kv_ratio" in alloc else ""
    table = Table(title=f"corp prune -> {out}: {asked} (kept {alloc['flops_ratio']:.4f} of the dense FLOPs{kv}), "
                        "widths chosen per block")
    parts = [p for p in ("mlp", "heads", "qk", "vo") if any(p in b for b in alloc["blocks"])]
    for col in ("block", *[{"mlp": "mlp kept", "heads": "heads", "qk": "qk kept", "vo": "vo kept"}[p] for p in parts],
                "pred. err", "GFLOPs"):
        table.add_column(col, justify="right")
    for b in alloc["blocks"]:
        err = sum(b[p].get("weighted_error", b[p].get("predicted_error", 0.0)) for p in parts if p in b)
        table.add_row(str(b["block"]), *[f"{b[p]['kept']}/{b[p]['width']}" for p in parts], f"{err:.3g}",
                      f"{b['flops'] / 1e9:.3f}")
    C.out.print(table)


def _print_summary(out: Path, report: dict[str, Any]) -> None:
    if "allocation" in report:
        _print_allocation(out, report)
        _print_totals(report)
        return
    compensated = report["options"].get("compensation", True)
    table = Table(title=f"corp prune -> {out}{'' if compensated else '  (no compensation)'}", show_lines=False)
    vo = any("vo" in b for b in report["blocks"])
    seq = "sequential" in report
    cols = ["block", "mlp kept", "mlp err (comp / none)", "qk kept", "logit err (comp / none)"]
    for col in cols + (["heads", "vo kept", "out err (comp / none)"] if vo else []) + (["stream err"] if seq else []):
        table.add_column(col, justify="right")
    if seq:
        table.title = f"{table.title}  (sequential, {report['sequential']['target']} target)"
    for b in report["blocks"]:
        mlp = b.get("mlp")
        attn = b.get("attn")
        row = [
            str(b["block"]),
            f"{mlp['kept']}/{mlp['width']}" if mlp else "-",
            f"{mlp['predicted_error_compensated']:.3g} / {mlp['predicted_error_uncompensated']:.3g}" if mlp else "-",
            f"{attn['qk_kept']}/{attn['head_dim']}" if attn else "-",
            f"{sum(attn['predicted_logit_error_compensated']):.3g} / {sum(attn['predicted_logit_error_uncompensated']):.3g}" if attn else "-",
        ]
        if vo:
            v = b.get("vo")
            row += [f"{v['heads_kept']}/{v['num_heads']}" if v else "-", f"{v['v_kept']}/{v['head_dim']}" if v else "-",
                    f"{v['predicted_error_compensated']:.3g} / {v['predicted_error_uncompensated']:.3g}" if v else "-"]
        if seq:
            row.append(f"{b['sequential']['measured_stream_error']:.3g}")
        table.add_row(*row)
    C.out.print(table)
    _print_totals(report)


def _print_totals(report: dict[str, Any]) -> None:
    t = report["totals"]
    if "kv_ratio" in t:
        C.out.print(f"KV cache {t['kv_bytes_per_token_before']:,} -> {t['kv_bytes_per_token_after']:,} bytes per token "
                    f"({t['kv_ratio']:.3f} of dense)")
    if "reload" in report:
        C.out.print(f"reload: {report['reload']}")
    plain = "" if report["options"].get("compensation", True) else ", no compensation (the 'none' errors are the ones applied)"
    synth = "  [SYNTHETIC calibration data]" if report["synthetic"] else ""
    C.out.print(
        f"params {t['params_before']:,} -> {t['params_after']:,} (-{100 * t['params_reduction']:.1f}%), "
        f"FLOPs {t['flops_before'] / 1e9:.2f}G -> {t['flops_after'] / 1e9:.2f}G (-{100 * t['flops_reduction']:.1f}%), "
        f"{report['seconds']:.1f}s{plain}{synth}"
    )


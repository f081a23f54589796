"""`corp prune`: rank, compensate and compact; write masks, the compacted checkpoint and a report."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from corp_cli import __version__
from corp_cli.artifacts import atomic_dir, check_out_dir, write_json_atomic
from corp_cli.commands import common as C
from corp_cli.calibrate import block_shapes
from corp_cli.commands.calibrate import (
    DEFAULT_DATA,
    DEFAULT_SAMPLES,
    calibrate_opened,
    check_model_inputs,
    load_model_and_preprocessing,
    open_calibration,
)
from corp_cli.compact import MODEL_FILE, architecture, save_pruned
from corp_cli.config import load_prune_config
from corp_cli.errors import ArtifactError, InputError
from corp_cli.flops import model_counts
from corp_cli.masks import load_masks, save_masks
from corp_cli.models import ModelIdentity
from corp_cli.prune import MLP_RANKERS, QK_RANKERS, BlockMasks, PruneOptions, apply_masks, plan_masks
from corp_cli.stats import Statistics, check_block_shapes, check_matches

log = logging.getLogger(__name__)

MASKS_FILE = "masks.safetensors"
REPORT_FILE = "report.json"
STATS_FILE = "stats.safetensors"
_DEFAULTS = PruneOptions()


def _lambda(text: str | None) -> float | None | str:
    """'auto' -> None (automatic), a number -> float, absent -> sentinel 'unset'."""
    if text is None:
        return "unset"
    if text.strip().lower() == "auto":
        return None
    try:
        v = float(text)
    except ValueError:
        raise InputError(f"--lambda must be 'auto' or a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise InputError(f"--lambda must be 'auto' or a finite number >= 0, got {text!r}")
    return v


def build_options(config: dict[str, Any], cli: dict[str, Any]) -> PruneOptions:
    """Defaults (PruneOptions) < --config YAML (as load_prune_config read it) < explicit CLI flags."""
    merged = dict(config)
    sparsity = cli.pop("sparsity")
    if sparsity is not None:
        merged["mlp_sparsity"] = merged["attn_sparsity"] = sparsity
    for k, v in cli.items():
        if k == "lam":
            if v != "unset":
                merged[k] = v  # None here means an explicit 'auto'
        elif v is not None:
            merged[k] = v
    for name in ("mlp_sparsity", "attn_sparsity"):
        v = merged.get(name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v)):
            raise InputError(f"--{name.replace('_', '-')} must be a number in [0, 1), got {v!r}")
    return PruneOptions(**merged)


# The options that choose masks; with --masks the file's own record of them is what applied.
MASK_CHOOSERS = ("mlp_sparsity", "attn_sparsity", "ranker", "qk_ranker", "round_to", "min_keep", "min_qk_dim")


def options_for_masks(
    opts: PruneOptions, masks: list[BlockMasks], mmeta: dict[str, Any], *,
    explicit_target: str | None, config: dict[str, Any] | None = None, config_path: Path | None = None,
) -> PruneOptions:
    """The options recorded for a --masks run: what the masks prune, and how the masks' own run chose them.

    The target is what the masks hold, so a --target (or a --config preset's target) that
    disagrees is an error rather than a record that says one thing while the checkpoint
    does another. A preset's other mask-choosing keys are superseded by the masks: said in
    a warning, since a preset is often shared between runs that rank and runs that reapply.
    """
    has_mlp = any(m.mlp is not None for m in masks)
    has_attn = any(m.attn is not None for m in masks)
    held = "both" if has_mlp and has_attn else "attn" if has_attn else "mlp"
    if explicit_target is not None and explicit_target != held:
        raise InputError(f"--masks hold target {held} (what they prune), but --target is {explicit_target}: "
                         "drop --target or use matching masks")
    config = config or {}
    if explicit_target is None and config.get("target", held) != held:
        raise InputError(f"--masks hold target {held} (what they prune), but --config {config_path} sets target "
                         f"{config['target']}: pass --target {held} or use matching masks")
    superseded = [k for k in (*MASK_CHOOSERS, "block_overrides") if k in config]
    if superseded:
        log.warning("--config %s: %s superseded by --masks, which fix the kept units", config_path, ", ".join(superseded))
    recorded = mmeta.get("options") or {}
    chosen = {k: recorded[k] for k in MASK_CHOOSERS if k in recorded}
    try:
        return replace(opts, target=held, **chosen)  # type: ignore[arg-type]
    except (TypeError, InputError) as e:
        raise ArtifactError(f"--masks: the options recorded in the masks file are invalid ({e})") from None


def check_plan(
    opts: PruneOptions, shapes: list[dict[str, int]], parts: list[str], masks: list[BlockMasks] | None,
) -> None:
    """What plan_masks/apply_masks would refuse, checked from shapes alone, before any expensive work."""
    nblocks = len(shapes)
    bad = [i for i in opts.block_overrides if not (isinstance(i, int) and 0 <= i < nblocks)]
    if bad:
        raise InputError(f"per-block overrides name block(s) {bad}, but the model has blocks 0..{nblocks - 1}")
    for i, shape in enumerate(shapes):
        try:
            o = opts.for_block(i)  # validates the block's overrides (sparsity range, floors)
        except TypeError as e:
            raise InputError(f"block {i} override has a value of the wrong type ({e})") from None
        if masks is not None:
            for part, kept in (("mlp", masks[i].mlp), ("attn", masks[i].attn)):
                if kept is not None and part not in parts:
                    raise InputError(f"--masks prune block {i}'s {part}, but the statistics have no {part} sums")
            continue
        if o.prune_mlp and o.mlp_sparsity > 0:
            if "mlp" not in parts:
                raise InputError("these statistics have no MLP sums; recalibrate with --parts mlp,attn")
            if o.min_keep > shape["mlp_hidden"]:
                raise InputError(f"block {i}: --min-keep {o.min_keep} exceeds its {shape['mlp_hidden']} MLP units")
        if o.prune_attn and o.attn_sparsity > 0:
            if "attn" not in parts:
                raise InputError("these statistics have no attention sums; recalibrate with --parts mlp,attn or use --target mlp")
            if o.min_qk_dim > shape["head_dim"]:
                raise InputError(f"block {i}: --min-qk-dim {o.min_qk_dim} exceeds the head dim {shape['head_dim']}")


def _check_masks_for(masks_path: Path, mmeta: dict[str, Any], identity: ModelIdentity, shapes: list[dict[str, int]], what: str) -> None:
    if mmeta["model"] != identity.to_dict():
        raise ArtifactError(f"--masks {masks_path} were made for {mmeta['model']}, not the {what} {identity.to_dict()}")
    if mmeta["block_shapes"] != shapes:
        raise ArtifactError(f"--masks {masks_path} were made for a model with different block shapes than the {what}")


def run_prune(
    loaded: Any, stats: Statistics, opts: PruneOptions, preset: list[BlockMasks] | None
) -> tuple[list[Any], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Rank (unless masks were given), compensate and compact; returns masks, report blocks, counts."""
    model = loaded.model
    nblocks = len(stats.blocks)
    masks = preset if preset is not None else plan_masks(model, stats, opts)
    before = model_counts(model)
    with C.progress_bar("pruning blocks", nblocks, unit="blocks") as advance:
        blocks = apply_masks(model, stats, masks, opts, on_block=lambda _i: advance(1))
    after = model_counts(model)
    return masks, blocks, before, after


@C.handle_errors
def prune_cmd(
    model: C.ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Output directory (masks.safetensors, model.safetensors, report.json).")],
    stats_path: Annotated[Path | None, typer.Option("--stats", help="Statistics from `corp calibrate`. Without it, calibrates first from --calib-data.")] = None,
    calib_data: Annotated[str | None, typer.Option("--calib-data", help=f"Calibration images when --stats is not given (default {DEFAULT_DATA}).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Calibration images when calibrating here.")] = DEFAULT_SAMPLES,
    seed: C.SeedOpt = 0,
    sparsity: Annotated[float | None, typer.Option("--sparsity", help=f"Fraction removed, for the MLP and the Q/K dims (default: {_DEFAULTS.mlp_sparsity}).")] = None,
    mlp_sparsity: Annotated[float | None, typer.Option("--mlp-sparsity", help="Fraction of MLP hidden units removed (overrides --sparsity).")] = None,
    attn_sparsity: Annotated[float | None, typer.Option("--attn-sparsity", help="Fraction of each head's Q/K dims removed (overrides --sparsity).")] = None,
    target: Annotated[str | None, typer.Option("--target", help=f"mlp, attn or both (default: {_DEFAULTS.target}).")] = None,
    ranker: Annotated[str | None, typer.Option("--ranker", help=f"MLP ranking: {', '.join(MLP_RANKERS)} (default: {_DEFAULTS.ranker}).")] = None,
    qk_ranker: Annotated[str | None, typer.Option("--qk-ranker", help=f"Q/K ranking: {', '.join(QK_RANKERS)} (default: {_DEFAULTS.qk_ranker}).")] = None,
    lam: Annotated[str | None, typer.Option("--lambda", help="Ridge lambda: auto (data-scaled shrinkage) or a number (default: auto).")] = None,
    no_compensation: Annotated[bool, typer.Option("--no-compensation", help="Drop units with no correction (the baseline).")] = False,
    round_to: Annotated[int | None, typer.Option("--round-to", help=f"Keep survivor counts multiples of N (default: {_DEFAULTS.round_to}).")] = None,
    min_keep: Annotated[int | None, typer.Option("--min-keep", help=f"Never keep fewer MLP units per block (default: {_DEFAULTS.min_keep}).")] = None,
    min_qk_dim: Annotated[int | None, typer.Option("--min-qk-dim", help=f"Never keep fewer Q/K dims per head (default: {_DEFAULTS.min_qk_dim}).")] = None,
    qk_fold: Annotated[str | None, typer.Option("--qk-fold", help="Fold the logit correction into q only, or balanced between q and k (default: balanced).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML preset (see configs/); explicit flags win over it.")] = None,
    masks_path: Annotated[Path | None, typer.Option("--masks", help="Reapply these masks instead of ranking.")] = None,
    checkpoint: C.CheckpointOpt = None,
    num_classes: C.NumClassesOpt = None,
    pretrained_cfg: C.PretrainedCfgOpt = None,
    mean: C.MeanOpt = None,
    std: C.StdOpt = None,
    input_size: C.InputSizeOpt = None,
    interpolation: C.InterpOpt = None,
    crop_pct: C.CropPctOpt = None,
    crop_mode: C.CropModeOpt = None,
    device: C.DeviceOpt = "auto",
    batch_size: C.BatchSizeOpt = 32,
    workers: C.WorkersOpt = C.DEFAULT_WORKERS,
    overwrite: C.OverwriteOpt = False,
    json_out: C.JsonOpt = None,
) -> None:
    """Prune MODEL with CORP: remove MLP units and Q/K dims, fold the closed-form compensation in."""
    t0 = time.perf_counter()
    # Validation order: options, paths and files (cheap) -> model weights -> calibration (expensive).
    if qk_fold not in (None, "balanced", "q"):
        raise InputError(f"--qk-fold must be balanced or q, got {qk_fold!r}")
    if stats_path is not None and calib_data is not None:
        raise InputError("give either --stats or --calib-data, not both")
    config_keys = load_prune_config(C.existing_file(config, "--config")) if config else {}
    opts = build_options(
        config_keys,
        {
            "sparsity": sparsity, "mlp_sparsity": mlp_sparsity, "attn_sparsity": attn_sparsity, "target": target,
            "ranker": ranker, "qk_ranker": qk_ranker, "lam": _lambda(lam),
            "compensation": False if no_compensation else None, "round_to": round_to, "min_keep": min_keep,
            "min_qk_dim": min_qk_dim, "qk_balanced": None if qk_fold is None else qk_fold == "balanced",
        },
    )
    check_out_dir(out, overwrite=overwrite)
    overrides = C.preprocessing_overrides(mean, std, input_size, interpolation, crop_pct, crop_mode)
    check_model_inputs(model, checkpoint, num_classes, pretrained_cfg, device)
    preset: list[BlockMasks] | None = None
    mmeta: dict[str, Any] = {}
    if masks_path is not None:
        chooser_flags = {"--sparsity": sparsity, "--mlp-sparsity": mlp_sparsity, "--attn-sparsity": attn_sparsity,
                         "--ranker": ranker, "--qk-ranker": qk_ranker, "--round-to": round_to, "--min-keep": min_keep,
                         "--min-qk-dim": min_qk_dim}
        given = [flag for flag, value in chooser_flags.items() if value is not None]
        if given:
            raise InputError(f"--masks fixes which units every block keeps; {', '.join(given)} only choose masks: drop them")
        # Against the file's own shapes for now; against the model's once they are known.
        preset, mmeta = load_masks(C.existing_file(masks_path, "--masks"))
        opts = options_for_masks(opts, preset, mmeta, explicit_target=target, config=config_keys, config_path=config)
    calibrated_here = stats_path is None
    if stats_path is not None:
        stats = Statistics.load(C.existing_file(stats_path, "--stats"))
        shapes = stats.meta["block_shapes"]
        if preset is not None:
            _check_masks_for(masks_path, mmeta, stats.identity, shapes, "statistics")  # type: ignore[arg-type]
        check_plan(opts, shapes, stats.parts, preset)
        loaded, prep = load_model_and_preprocessing(model, checkpoint, num_classes, pretrained_cfg, overrides, device)
        check_matches(stats, loaded.identity)
        check_block_shapes(stats, block_shapes(loaded.model))
    else:
        source, loaded, prep = open_calibration(
            model, data=calib_data or DEFAULT_DATA, samples=samples, seed=seed, shard=None, checkpoint=checkpoint,
            num_classes=num_classes, pretrained_cfg=pretrained_cfg, overrides=overrides, device=device,
        )
        shapes = block_shapes(loaded.model)
        parts = ["mlp", "attn"] if opts.prune_attn or (preset is not None and any(m.attn is not None for m in preset)) else ["mlp"]
        if preset is not None:
            _check_masks_for(masks_path, mmeta, loaded.identity, shapes, "model")  # type: ignore[arg-type]
        check_plan(opts, shapes, parts, preset)
        stats, _ = calibrate_opened(
            loaded, prep, source, batch_size=batch_size, workers=workers, parts=tuple(parts), precision="float32",
        )
    masks, blocks, before, after = run_prune(loaded, stats, opts, preset)
    arch = architecture(loaded.model, loaded.identity.name, {"num_classes": loaded.identity.num_classes})
    provenance = {
        "base": loaded.identity.to_dict(),
        "stats": {k: stats.meta[k] for k in ("data", "samples", "tokens", "synthetic", "seed", "shards", "tool_version")},
        "options": opts.to_dict(),
        "preprocessing": prep.to_dict(),
        "classes": loaded.checkpoint_meta.get("classes"),
    }
    shapes = stats.meta["block_shapes"]
    with atomic_dir(out) as tmp:
        if calibrated_here:
            stats.save(tmp / STATS_FILE)
        fingerprint = stats.fingerprint()
        provenance["stats"]["fingerprint"] = fingerprint
        save_masks(tmp / MASKS_FILE, masks, identity=loaded.identity, shapes=shapes, options=opts.to_dict(), stats_fingerprint=fingerprint)
        save_pruned(tmp / MODEL_FILE, loaded.model.cpu(), arch, provenance)
        report = _report(loaded, stats, opts, blocks, before, after, time.perf_counter() - t0, fingerprint)
        write_json_atomic(tmp / REPORT_FILE, report)
    if not C.write_json(json_out, {"out": str(out), **report}):
        _print_summary(out, report)


def _report(
    loaded: Any, stats: Statistics, opts: PruneOptions, blocks: list[dict[str, Any]],
    before: dict[str, Any], after: dict[str, Any], seconds: float, fingerprint: str,
) -> dict[str, Any]:
    return {
        "corp_version": __version__,
        "model": loaded.identity.to_dict(),
        "stats": {"fingerprint": fingerprint, "samples": stats.meta["samples"], "tokens": stats.meta["tokens"],
                  "skipped_samples": stats.meta.get("skipped_samples", 0),
                  "warnings": stats.meta["data"].get("warnings", []),
                  "synthetic": stats.meta["synthetic"], "data": stats.meta["data"]},
        "synthetic": stats.meta["synthetic"],
        "options": opts.to_dict(),
        "blocks": blocks,
        "totals": {
            "params_before": before["params"],
            "params_after": after["params"],
            "flops_before": before["flops"],
            "flops_after": after["flops"],
            "flops_reduction": 1.0 - after["flops"] / before["flops"],
            "params_reduction": 1.0 - after["params"] / before["params"],
        },
        "seconds": round(seconds, 3),
    }


def _print_summary(out: Path, report: dict[str, Any]) -> None:
    table = Table(title=f"corp prune -> {out}", show_lines=False)
    for col in ("block", "mlp kept", "mlp err (comp / none)", "qk kept", "logit err (comp / none)"):
        table.add_column(col, justify="right")
    for b in report["blocks"]:
        mlp = b.get("mlp")
        attn = b.get("attn")
        table.add_row(
            str(b["block"]),
            f"{mlp['kept']}/{mlp['width']}" if mlp else "-",
            f"{mlp['predicted_error_compensated']:.3g} / {mlp['predicted_error_uncompensated']:.3g}" if mlp else "-",
            f"{attn['qk_kept']}/{attn['head_dim']}" if attn else "-",
            f"{sum(attn['predicted_logit_error_compensated']):.3g} / {sum(attn['predicted_logit_error_uncompensated']):.3g}" if attn else "-",
        )
    C.out.print(table)
    t = report["totals"]
    synth = "  [SYNTHETIC calibration data]" if report["synthetic"] else ""
    C.out.print(
        f"params {t['params_before']:,} -> {t['params_after']:,} (-{100 * t['params_reduction']:.1f}%), "
        f"FLOPs {t['flops_before'] / 1e9:.2f}G -> {t['flops_after'] / 1e9:.2f}G (-{100 * t['flops_reduction']:.1f}%), "
        f"{report['seconds']:.1f}s{synth}"
    )


"""A prune of a named model, as `corp prune` runs it: the orchestration, with no printing.

Order: the options, paths and files (cheap), then the model's shapes and weights, then the
calibration (expensive), then the prune and the saved artifacts. Statistics given (`stats_path`)
are checked against the model; without them it calibrates first (corp_cli.calibration_job), or,
`sequential`, calibrates block by block on the pruned model. The command prints what comes back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from corp_cli import defaults as D
from corp_cli.errors import InputError, existing_file
from corp_cli.family import ModelOptions

log = logging.getLogger(__name__)

# the options that only choose masks (refused with --masks), as the CLI names them
CHOOSER_FLAGS = {"sparsity": "--sparsity", "mlp_sparsity": "--mlp-sparsity", "attn_sparsity": "--attn-sparsity",
                 "vo_sparsity": "--vo-sparsity", "head_sparsity": "--head-sparsity", "flops_budget": "--flops-budget",
                 "q_head_sparsity": "--q-head-sparsity", "kv_budget": "--kv-budget", "ranker": "--ranker",
                 "qk_ranker": "--qk-ranker", "vo_ranker": "--vo-ranker", "head_ranker": "--head-ranker",
                 "round_to": "--round-to", "min_keep": "--min-keep", "min_qk_dim": "--min-qk-dim"}
# PruneJob.values's keys: the PruneOptions the command takes as flags (`sparsity` sets every part's; `lam` as text)
VALUES = (*CHOOSER_FLAGS, "target", "lam")


@dataclass
class PruneJob:
    model: str
    out: Path
    # PruneOptions values given (None: not given); `lam` as a string (auto or a number), `qk_fold` balanced or q
    values: dict[str, Any] = field(default_factory=dict)
    no_compensation: bool = False
    qk_fold: str | None = None
    stats_path: Path | None = None
    calib_data: str | None = None
    samples: int | None = None
    seed: int | None = None
    config: Path | None = None
    masks_path: Path | None = None
    dtype: str | None = None
    sequential: bool = False
    sequential_target: str | None = None
    sequential_ranking: str | None = None
    dry_run: bool = False
    max_memory: str | None = None
    # the model options, given a --config preset's model_kwargs (built then, so their refusals come in order)
    model_options: Callable[[dict[str, Any] | None], ModelOptions] = lambda preset: ModelOptions(model_args=preset or {})
    seq_len: int | None = None
    device: str = D.DEVICE
    batch_size: int = D.CALIB_BATCH_SIZE
    workers: int | None = None
    overwrite: bool = False
    plot: bool = True


@dataclass
class PruneOutcome:
    """What a prune job did: nothing (another rank writes), a dry run's inputs, or the saved report."""

    opts: Any = None
    report: dict[str, Any] | None = None  # the saved report (None: dry run, or not this rank's to write)
    dry_run: bool = False
    plan: Any = None  # the calibration plan (dry run, calibrating here)
    loaded: Any = None
    stats: Any = None  # the statistics given (dry run with --stats)
    family: Any = None
    shape_model: Any = None  # the model on the meta device (dry run with --stats)
    options: ModelOptions | None = None
    plot: Path | None = None  # the picture of the prune, when drawn
    plotted: bool = False  # a picture was asked for (one-shot prunes; None above: matplotlib is missing)


def other_rank() -> bool:
    from corp_cli import distributed

    d = distributed.from_env()
    return d is not None and not d.main


def run(job: PruneJob, *, progress: Any = None, workers_for: Callable[[str, int | None], int] | None = None) -> PruneOutcome:
    """Check, calibrate (unless statistics are given), prune and save; see the module docstring."""
    from corp_cli import api
    from corp_cli.artifacts import check_out_dir
    from corp_cli.calibration import block_shapes
    from corp_cli.config import build_options, check_masks_for, check_plan, load_prune_config, options_for_masks, parse_lambda
    from corp_cli.devices import resolve_device
    from corp_cli.loading import resolve_model
    from corp_cli.masks import load_masks
    from corp_cli.plan import parse_bytes, planned_solve_flops
    from corp_cli.prune_checks import check_for_model, sequential_choice
    from corp_cli.pruning import stats_parts_for
    from corp_cli.stats import Statistics, check_block_shapes, check_matches, check_preprocessing

    if job.stats_path is not None and other_rank():
        return PruneOutcome()  # statistics given: nothing to share across a torchrun world, rank 0 prunes alone
    t0 = time.perf_counter()
    stats_path, masks_path, config = job.stats_path, job.masks_path, job.config
    # Validation order: options, paths and files (cheap) -> model weights -> calibration (expensive).
    unknown = sorted(set(job.values) - set(VALUES))
    if unknown:
        raise InputError(f"unknown prune option(s) {', '.join(unknown)}; the prune options are {', '.join(VALUES)}")
    if job.qk_fold not in (None, "balanced", "q"):
        raise InputError(f"--qk-fold must be balanced or q, got {job.qk_fold!r}")
    if stats_path is not None and job.calib_data is not None:
        raise InputError("give either --stats or --calib-data, not both")
    config_keys = load_prune_config(existing_file(config, "--config")) if config else {}
    preset_args = config_keys.pop("model_kwargs", None)
    v = job.values
    target = v.get("target")
    flags = {**{k: v.get(k) for k in VALUES}, "lam": parse_lambda(v.get("lam")),
             "compensation": False if job.no_compensation else None,
             "qk_balanced": None if job.qk_fold is None else job.qk_fold == "balanced"}
    opts = build_options(config_keys, dict(flags))
    sequential_choice(job.sequential, stats_given=stats_path is not None, target=job.sequential_target,
                      ranking=job.sequential_ranking, masks_given=masks_path is not None, budgeted=opts.budgeted)
    if stats_path is not None:
        given = [f for f, x in (("--samples", job.samples), ("--seed", job.seed), ("--workers", job.workers),
                                  ("--dtype", job.dtype), ("--seq-len", job.seq_len))
                 if x is not None]
        if given:
            raise InputError(f"{', '.join(given)} choose the calibration data, but --stats gives the statistics: drop them")
    out = job.out
    check_out_dir(out, overwrite=job.overwrite)
    options = job.model_options(preset_args)
    fam, name = resolve_model(job.model, options)
    preset = None
    mmeta: dict[str, Any] = {}
    if masks_path is not None:
        chosen = [flag for key, flag in CHOOSER_FLAGS.items() if v.get(key) is not None]
        if chosen:
            raise InputError(f"--masks fixes which units every block keeps; {', '.join(chosen)} only choose masks: drop them")
        # Against the file's own shapes for now; against the model's once they are known.
        preset, mmeta = load_masks(existing_file(masks_path, "--masks"))
        opts = options_for_masks(opts, preset, mmeta, explicit_target=target, config=config_keys, config_path=config)
    dev = resolve_device(job.device)
    # the default target is what the model allows; a target given is honoured or refused
    target_given = target is not None or "target" in config_keys or preset is not None

    def for_model(fam_: Any, model_: Any) -> None:
        nonlocal opts
        opts = check_for_model(opts, fam_, model_, target_given=target_given, flags=flags, config=config_keys,
                               config_path=config)

    if stats_path is not None:
        stats = Statistics.load(existing_file(stats_path, "--stats"))
        shapes = stats.meta["block_shapes"]
        if preset is not None:
            check_masks_for(masks_path, mmeta, stats.identity, shapes, "statistics")  # type: ignore[arg-type]
        if job.dry_run:
            meta_model = fam.meta_model(name, options)
            if meta_model is not None:
                for_model(fam, meta_model)
                check_plan(opts, shapes, stats.parts, preset)
                return PruneOutcome(opts=opts, dry_run=True, stats=stats, family=fam, shape_model=meta_model,
                                    options=options)
        loaded = fam.load(name, options, dev)
        for_model(loaded.family, loaded.model)
        check_plan(opts, shapes, stats.parts, preset)
        check_matches(stats, loaded.identity)
        check_block_shapes(stats, block_shapes(loaded))
        if {"preprocessing", "pretrained_cfg"} & set(options.given()):
            check_preprocessing(stats, loaded.preprocessing.to_dict())
        if job.dry_run:  # no meta-device model (a .pth checkpoint): checked on the weights, and nothing written
            return PruneOutcome(opts=opts, dry_run=True, stats=stats, loaded=loaded, options=options)
        writes, sequential = True, {}
    else:
        from corp_cli import calibration_job

        def check(fam_: Any, model_: Any) -> tuple[str, ...]:
            """On the model's shapes, before the weights: the target it allows, and the refusals."""
            for_model(fam_, model_)
            shapes_ = [fam_.shape(model_, i).to_dict() for i in range(fam_.num_blocks(model_))]
            # what the target needs (the MLP sums always: they are what a later run reuses most)
            parts_ = tuple(dict.fromkeys(["mlp", *stats_parts_for(opts.parts)]))
            check_plan(opts, shapes_, list(parts_), preset)
            return parts_

        def check_loaded(loaded_: Any) -> None:
            if preset is not None:
                check_masks_for(masks_path, mmeta, loaded_.identity, block_shapes(loaded_), "model")  # type: ignore[arg-type]

        from corp_cli.sequential import extra_bytes

        def solve_flops(fam_: Any, model_: Any) -> int | None:
            """The solves' FLOPs at the widths the sparsities imply (unknown under a budget or --masks)."""
            if opts.budgeted or preset is not None or job.sequential:
                return None
            return planned_solve_flops(fam_, model_, opts)

        cjob = calibration_job.CalibrationJob(
            model=job.model, options=options, data=job.calib_data, samples=job.samples or D.CALIB_SAMPLES,
            seed=job.seed or 0, device=job.device, batch_size=job.batch_size, workers=job.workers,
            dtype=job.dtype or "fp32", max_memory=parse_bytes(job.max_memory) if job.max_memory else None,
            data_flag="--calib-data", sequential_bytes=extra_bytes if job.sequential else None,
            solve_flops=solve_flops)
        crun = calibration_job.run(cjob, dry_run=job.dry_run, progress=progress, workers_for=workers_for,
                                   check=check, check_loaded=check_loaded)
        if job.dry_run:
            return PruneOutcome(opts=opts, dry_run=True, plan=crun.plan, loaded=crun.loaded, options=options)
        if not crun.writes and not job.sequential:
            return PruneOutcome(opts=opts)  # rank 0 prunes and writes (every rank prunes with --sequential)
        loaded, stats, writes = crun.loaded, crun.stats, crun.writes
        sequential = _sequential_inputs(job, crun) if job.sequential else {}
    # api.prune makes the checks above again on the same function calls (cheap), and dispatches
    result = api.prune(loaded, stats, options=opts, masks=preset, inplace=True, progress=progress,
                       sequential=job.sequential, sequential_target=job.sequential_target,
                       sequential_ranking=job.sequential_ranking, **sequential)
    if not writes:
        return PruneOutcome(opts=opts)  # rank 0 writes
    # the sums a sequential run fit to are not dense statistics another prune could reuse: not written, nor drawn
    plot = job.plot and not job.sequential
    report = api.save_pruned(result, out, overwrite=job.overwrite, save_stats=stats_path is None and not job.sequential,
                             started=t0, plot=plot)
    from corp_cli import report_plot

    png = out / report_plot.PNG_FILE
    return PruneOutcome(opts=opts, report=report, options=options, plot=png if png.is_file() else None, plotted=plot)


def _sequential_inputs(job: PruneJob, crun: Any) -> dict[str, Any]:
    """What api.prune(sequential=True) streams: the opened data, as the calibration job planned it."""
    from corp_cli import distributed
    from corp_cli.calibration_job import FORWARD_DTYPES

    # under torchrun every rank holds its share of the streams; the block sums are added across ranks
    sync = (distributed.BlockSync(crun.dist, next(crun.loaded.model.parameters()).device) if crun.dist is not None
            else None)
    return {"data": crun.source, "batch_size": job.batch_size, "workers": crun.workers,
            "forward_dtype": FORWARD_DTYPES[job.dtype or "fp32"],
            "scratch": (crun.plan.sequential or {}).get("storage") == "scratch", "sync": sync}


def prune_to(model: str, out: str | Path, *, model_options: ModelOptions | None = None, progress: Any = None,
             **options: Any) -> PruneOutcome:
    """`corp prune MODEL --out OUT ...` as a function: the same checks, calibration, prune and files.

    `options` are the command's, named as PruneJob's fields (calib_data, samples, stats_path,
    masks_path, config, sequential, sequential_target, dry_run, overwrite, ...) and, for the rest,
    as PruneJob.values (sparsity, target, ranker, flops_budget, lam: "auto" or a number, ...): a
    flag's name with `_` for `-`, except --stats (stats_path), --masks (masks_path) and --lambda
    (lam). `model_options` stands for the model's flags (--checkpoint, --model-arg, ...); a
    --config preset's model_kwargs yield to its model_args. Returns the PruneOutcome: `.report`
    (what report.json holds; None on a dry run) and `.opts` (the options applied).
    """
    job_fields = {f.name for f in fields(PruneJob)} - {"model", "out", "values", "model_options"}
    given = {k: v for k, v in options.items() if k in job_fields}
    values = {k: v for k, v in options.items() if k not in job_fields}
    for key in ("stats_path", "masks_path", "config"):
        if given.get(key) is not None:
            given[key] = Path(given[key])
    if values.get("lam") is not None:
        values["lam"] = str(values["lam"])  # the command's text: "auto" or a number
    mo = model_options or ModelOptions()
    given.setdefault("seq_len", mo.seq_len)
    job = PruneJob(model=str(model), out=Path(out), values=values, **given,
                   model_options=lambda preset: replace(mo, model_args={**(preset or {}), **mo.model_args}))
    return run(job, progress=progress)

"""A calibration of a named model, as `corp calibrate` and `corp prune --calib-data` run it.

Order: every cheap check (model, options, data), then the plan (memory, from the model's
shapes on the meta device), then the weights, then the pass, alone or as one rank of a
torch.distributed world. The same function serves the CLI and scripts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from corp_cli import defaults as D
from corp_cli import distributed
from corp_cli.errors import InputError
from corp_cli.family import Loaded, ModelOptions
from corp_cli.plan import CalibrationPlan, check_fits, plan_calibration
from corp_cli.stats import Statistics

log = logging.getLogger(__name__)

FORWARD_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CalibrationJob:
    model: str
    options: ModelOptions = field(default_factory=ModelOptions)
    data: str | None = None
    samples: int | None = D.CALIB_SAMPLES
    seed: int = D.SEED
    shard: tuple[int, int] | None = None
    device: str = D.DEVICE
    batch_size: int = D.CALIB_BATCH_SIZE
    workers: int | None = None
    parts: tuple[str, ...] | None = None
    precision: str = D.PRECISION
    dtype: str = "fp32"
    blocks: list[int] | None = None
    max_memory: int | None = None
    data_flag: str = "--data"  # the option naming the data in this command (for error messages)
    # prune --sequential: plan and load, then hand the opened data back instead of calibrating
    # (the caller streams it block by block); `sequential_bytes(family, model, samples)` adds that
    # pass's extra memory to the plan
    sequential_bytes: Callable[[Any, Any, int], int] | None = None
    # prune: the FLOPs of the solves it will run after calibrating, `solve_flops(family, model)` (None: unknown)
    solve_flops: Callable[[Any, Any], int | None] | None = None


@dataclass
class JobResult:
    plan: CalibrationPlan
    stats: Statistics | None = None
    loaded: Loaded | None = None
    seconds: float = 0.0
    dist: distributed.Dist | None = None
    source: Any = None  # the opened calibration data (a deferred, sequential job)
    workers: int = 0

    @property
    def writes(self) -> bool:
        """Whether this process writes artifacts and prints results (rank 0, or a single process)."""
        return self.dist is None or self.dist.main


def parse_blocks(text: str) -> list[int]:
    """0-11, 12-23 or 3,5,7-9 -> block indices (inclusive ranges)."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            lo, hi = int(a), int(b) if b else int(a)
            if lo < 0 or hi < lo:
                raise ValueError
            out |= set(range(lo, hi + 1))
    except ValueError:
        raise InputError(f"--blocks must look like A-B (e.g. 0-11) or a comma list of them, got {text!r}") from None
    return sorted(out)


def run(job: CalibrationJob, *, dry_run: bool = False, progress: Any = None,
        workers_for: Callable[[str, int | None], int] | None = None,
        check: Callable[[Any, Any], tuple[str, ...] | None] | None = None,
        check_loaded: Callable[[Loaded], None] | None = None) -> JobResult:
    """Plan, and unless dry_run, calibrate: returns the plan, and the (all-ranks) statistics.

    `check(family, model)` runs on the model's shapes (the meta-device model when there is one)
    before the plan and the weights: a caller's own refusals (prune's target and options) fail
    before anything expensive; it may return the statistics parts the caller needs.
    `check_loaded(loaded)` runs once the weights are loaded, before the pass.
    """
    from corp_cli import api
    from corp_cli.devices import resolve_device
    from corp_cli.loading import resolve_model
    from corp_cli.pruning import supported_parts
    from corp_cli.sources import open_data

    api.check_precision(job.precision)
    if job.dtype not in FORWARD_DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(FORWARD_DTYPES)}, got {job.dtype!r}")
    fam, name = resolve_model(job.model, job.options)
    dist = distributed.from_env()
    if dist is not None and job.shard is not None:
        raise InputError("--shard splits the data for separate jobs; under torchrun the ranks already split it: drop --shard")
    n_workers = workers_for(fam.modality, job.workers) if workers_for else (job.workers or 0)
    spec = job.data or D.CALIB_DATA[fam.modality]
    shard = (dist.rank, dist.world) if dist is not None else job.shard
    source = open_data(spec, fam.modality, samples=job.samples, seed=job.seed, shard=shard, flag=job.data_flag,
                       text_unit=fam.text_unit)
    dev = distributed.start(dist, job.device) if dist is not None else resolve_device(job.device)
    meta = fam.meta_model(name, job.options)
    loaded = None
    if meta is None:
        loaded = fam.load(name, job.options, dev)
    shape_model = meta if meta is not None else loaded.model  # type: ignore[union-attr]
    nblocks = fam.num_blocks(shape_model)
    if job.blocks is not None and job.blocks[-1] >= nblocks:
        raise InputError(f"--blocks names block {job.blocks[-1]}, but {name} has blocks 0-{nblocks - 1}")
    needed = check(fam, shape_model) if check is not None else None
    parts = job.parts or needed or supported_parts(fam, shape_model)
    forward_dtype = FORWARD_DTYPES[job.dtype]
    plan = plan_calibration(fam, shape_model, name=name, device=dev, batch_size=job.batch_size,
                            samples=source.num_items, parts=tuple(parts), blocks=job.blocks, tokens=job.options.seq_len,
                            product_dtype=getattr(torch, job.precision), forward_dtype=forward_dtype,
                            input_item_bytes=fam.item_bytes(shape_model))
    if job.solve_flops is not None and plan.flops:
        solves = job.solve_flops(fam, shape_model)
        if solves is not None:
            plan.flops["solves"] = solves
    if dist is not None:
        plan.notes.append(f"rank {dist.rank} of {dist.world}: this rank's share of the samples")
    if job.sequential_bytes is not None:
        from corp_cli.plan import available_memory, human

        extra = job.sequential_bytes(fam, shape_model, source.num_items)
        avail, _ = (job.max_memory, "") if job.max_memory is not None else available_memory(dev)
        where = ("an unlinked memory-mapped scratch file" if avail is not None and extra > avail // 2 else "memory")
        plan.sequential = {"extra_bytes": extra, "storage": "scratch" if where != "memory" else "memory"}
        plan.notes.append(f"--sequential keeps the dense and pruned streams at a block's input and a dense copy of "
                          f"the weights: {human(extra)} more, in {where}")
    if dry_run:
        from corp_cli.plan import available_memory, estimate_time, matmul_rate

        if plan.flops:
            plan.time = estimate_time(plan.flops, matmul_rate(dev, forward_dtype or torch.float32),
                                      matmul_rate(dev, torch.float64))

        plan.available_bytes, plan.limit_source = ((job.max_memory, "--max-memory") if job.max_memory is not None
                                                   else available_memory(dev))
        return JobResult(plan=plan, loaded=loaded, dist=dist)
    check_fits(plan, job.max_memory)
    if loaded is None:
        loaded = fam.load(name, job.options, dev)
    if check_loaded is not None:
        check_loaded(loaded)
    if job.sequential_bytes is not None:
        return JobResult(plan=plan, loaded=loaded, dist=dist, source=source, workers=n_workers)
    t0 = time.perf_counter()
    stats, error = None, None
    try:
        stats = api.calibrate(loaded, source, batch_size=job.batch_size, workers=n_workers, parts=tuple(parts),
                              precision=job.precision, progress=progress if (dist is None or dist.main) else None,
                              blocks=job.blocks, forward_dtype=forward_dtype, on_batch=_hooks(dist))
    except Exception as e:  # noqa: BLE001 - a rank's failure is reported to all ranks before anyone stops
        if dist is None:
            raise
        error = e
    if dist is not None:
        distributed.report(dist, error)
        assert stats is not None
        _reduce(stats, dist, dev, spec, fam.modality, job, fam.text_unit)
    return JobResult(plan=plan, stats=stats, loaded=loaded, seconds=time.perf_counter() - t0, dist=dist)


def _hooks(dist: distributed.Dist | None) -> Callable[[int], None] | None:
    if dist is None:
        return None
    done = [0]

    def on_batch(_n: int) -> None:
        done[0] += 1
        distributed.test_hooks(dist, done[0])

    return on_batch


def _reduce(stats: Statistics, dist: distributed.Dist, dev: torch.device, spec: str, modality: str,
            job: CalibrationJob, text_unit: str = "sentence") -> None:
    """All ranks' sums added; the metadata as a single process would write it for the same samples."""
    from corp_cli.sources import open_data

    distributed.all_sum(stats.blocks, dev)
    samples, tokens, skipped = distributed.sum_ints(
        [stats.meta["samples"], stats.meta["tokens"], stats.meta.get("skipped_samples", 0)], dev)
    whole = open_data(spec, modality, samples=job.samples, seed=job.seed, flag=job.data_flag,
                      text_unit=text_unit).describe()
    whole["skipped"] = skipped
    stats.meta.update(samples=samples, tokens=tokens, skipped_samples=skipped, data=whole,
                      shards={"indices": [0], "count": 1})

"""The Python API: calibrate, prune, save and load, on a model name or an in-memory model of any family.

    import timm, corp_cli
    model = timm.create_model("deit_tiny_patch16_224", pretrained=True)
    stats = corp_cli.calibrate(model, "path/to/images", samples=256)
    result = corp_cli.prune(model, stats, sparsity=0.5)
    corp_cli.save_pruned(result, "pruned/")
    again = corp_cli.load_pruned("pruned/")

The whole `corp prune` job (checks, calibration, sequential or one-shot prune, the files at
`out`) from Python, with the command's option names:

    done = corp_cli.prune_to("deit_tiny_patch16_224", "pruned/", calib_data="path/to/images", sparsity=0.5)
    done.report  # what report.json holds

The CLI commands are thin wrappers over these functions.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from corp_cli import __version__
from corp_cli.artifacts import atomic_dir, check_out_dir, write_json_atomic
from corp_cli.calibration import as_batch, block_shapes, check_parts, collect_statistics
from corp_cli.compact import load_pruned, save_pruned_checkpoint
from corp_cli.errors import ArtifactError, InputError
from corp_cli.family import Batch, Loaded, ModelOptions
from corp_cli.flops import model_counts
from corp_cli.masks import save_masks
from corp_cli.pruning import BlockMasks, PruneOptions, apply_masks, plan_masks, supported_parts
from corp_cli.stats import Statistics, check_block_shapes, check_matches, new_meta

MASKS_FILE = "masks.safetensors"
REPORT_FILE = "report.json"
STATS_FILE = "stats.safetensors"
PRECISIONS = ("float32", "float64")

# progress(description, total or None, unit) -> a context manager yielding advance(n)
Progress = Callable[[str, "int | None", str], AbstractContextManager[Callable[[int], None]]]

__all__ = ["adopt", "calibrate", "prune", "save_pruned", "load_pruned", "PruneResult", "PruneOptions", "Statistics"]


def _no_progress(_description: str, _total: int | None, _unit: str) -> AbstractContextManager[Callable[[int], None]]:
    return contextlib.nullcontext(lambda _n: None)


def adopt(model: nn.Module, model_kwargs: dict[str, Any] | None = None) -> Loaded:
    """Wrap an in-memory model of any registered family for calibrate/prune/save.

    `model_kwargs`: the constructor options (timm.create_model keywords) it was built with,
    when corp cannot read them off the module; it says so when it cannot.
    """
    from corp_cli.registry import family_of

    return family_of(model).adopt(model, model_kwargs)


def as_loaded(model: str | nn.Module | Loaded, options: ModelOptions | None = None,
              device: str | torch.device = "cpu") -> Loaded:
    """A model name / folder, an in-memory module of any registered family, or an already loaded model."""
    if isinstance(model, Loaded):
        return model
    if isinstance(model, nn.Module):
        return adopt(model)
    from corp_cli.loading import load_any

    return load_any(str(model), options, device)


def check_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be float32 or float64, got {precision!r}")
    return getattr(torch, precision)


def calibrate(
    model: str | nn.Module | Loaded,
    data: str | Any | Iterable[Tensor | Batch],
    *,
    options: ModelOptions | None = None,
    samples: int | None = None,
    seed: int = 0,
    shard: tuple[int, int] | None = None,
    batch_size: int = 32,
    workers: int = 0,
    parts: tuple[str, ...] | None = None,
    precision: str = "float32",
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    blocks: list[int] | None = None,
    forward_dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Statistics:
    """One streaming pass over `data`; the per-block float64 sums, with their provenance.

    `blocks` restricts the statistics to some blocks (merge the pieces with
    corp_cli.stats.merge); `forward_dtype` (torch.bfloat16, torch.float16) runs the forward
    under autocast, the per-batch products staying at `precision` and the sums float64.
    `parts` defaults to what the model can be pruned by (attention statistics only where
    its Q/K dims can be pruned). `data` is a data spec (an image folder, hf:NAME, text:pydoc, ...), an opened source,
    or an iterable of batches: image tensors (B, C, H, W) already preprocessed, or dicts of
    model inputs (text: input_ids + attention_mask; padding is never counted).
    """
    product_dtype = check_precision(precision)
    loaded = as_loaded(model, options, device)
    parts = supported_parts(loaded.family, loaded.model) if parts is None else tuple(parts)
    check_parts(loaded, parts)
    progress = progress or _no_progress
    if isinstance(data, str):
        from corp_cli.sources import open_data

        data = open_data(data, loaded.modality, samples=samples, seed=seed, shard=shard,
                         text_unit=loaded.family.text_unit)
    if hasattr(data, "describe") and hasattr(data, "spec"):
        from corp_cli.calibration import calibrate as calibrate_source

        with progress(f"calibrating {loaded.identity.name}", loaded.preprocessing.count(data), _unit(loaded)) as advance:
            return calibrate_source(loaded, data, batch_size=batch_size, workers=workers, parts=parts,
                                    product_dtype=product_dtype, on_batch=_both(advance, on_batch), blocks=blocks,
                                    forward_dtype=forward_dtype)
    digest = hashlib.sha256()
    with progress(f"calibrating {loaded.identity.name}", None, _unit(loaded)) as advance:
        sums = collect_statistics(loaded.model, _hashed(data, digest), family=loaded.family, parts=parts,
                                  product_dtype=product_dtype, on_batch=_both(advance, on_batch), blocks=blocks,
                                  forward_dtype=forward_dtype)
    fingerprint = digest.hexdigest()
    described = {"spec": "in-memory batches", "kind": "batches", "synthetic": False, "labels": False,
                 "samples": sums.samples, "selected": sums.samples, "count": sums.samples, "seed": None,
                 "shard": None, "fingerprint": fingerprint, "base_fingerprint": fingerprint, "skipped": 0,
                 "warnings": []}
    meta = new_meta(identity=loaded.identity, shapes=block_shapes(loaded), parts=list(parts),
                    preprocessing=loaded.preprocessing.to_dict(), data=described, samples=sums.samples,
                    tokens=sums.tokens, seed=0, shard=None, product_dtype=precision, blocks=blocks,
                    forward_dtype=forward_dtype)
    return Statistics(blocks=sums.blocks, meta=meta)


def _both(a: Callable[[int], None], b: Callable[[int], None] | None) -> Callable[[int], None]:
    if b is None:
        return a

    def both(n: int) -> None:
        a(n)
        b(n)

    return both


def _hashed(batches: Iterable[Tensor | Batch], digest: Any) -> Iterator[Batch]:
    """The batches as they are, with their bytes fed to `digest` (the data fingerprint of in-memory input)."""
    for x in batches:
        b = as_batch(x)
        for k in sorted(b):
            t = b[k].detach().to("cpu").contiguous()
            digest.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        yield b


def _unit(loaded: Loaded) -> str:
    from corp_cli.family import item_name

    return item_name(loaded.modality)


@dataclass
class PruneResult:
    """A pruned model and everything `save_pruned` writes about it."""

    loaded: Loaded
    masks: list[BlockMasks]
    blocks: list[dict[str, Any]]
    options: PruneOptions
    stats: Statistics
    before: dict[str, Any]
    after: dict[str, Any]
    seconds: float
    base_shapes: list[dict[str, int]] = field(default_factory=list)
    allocation: dict[str, Any] | None = None  # what a FLOPs budget chose (Allocation.to_dict())
    sequential: dict[str, Any] | None = None  # how a sequential calibration ran (target, stream memory)

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def report(self, fingerprint: str | None = None) -> dict[str, Any]:
        stats, before, after = self.stats, self.before, self.after
        return {
            "corp_version": __version__,
            "model": self.loaded.identity.to_dict(),
            "stats": {"fingerprint": fingerprint or stats.fingerprint(), "samples": stats.meta["samples"],
                      "tokens": stats.meta["tokens"], "skipped_samples": stats.meta.get("skipped_samples", 0),
                      "warnings": stats.meta["data"].get("warnings", []),
                      "synthetic": stats.meta["synthetic"], "data": stats.meta["data"]},
            "synthetic": stats.meta["synthetic"],
            "options": self.options.to_dict(),
            "blocks": self.blocks,
            "totals": {
                "params_before": before["params"],
                "params_after": after["params"],
                "flops_before": before["flops"],
                "flops_after": after["flops"],
                "flops_reduction": 1.0 - after["flops"] / before["flops"],
                "params_reduction": 1.0 - after["params"] / before["params"],
                **({"kv_bytes_per_token_before": before["kv_bytes_per_token"],
                    "kv_bytes_per_token_after": after["kv_bytes_per_token"],
                    "kv_ratio": after["kv_bytes_per_token"] / before["kv_bytes_per_token"]}
                   if "kv_bytes_per_token" in before else {}),
            },
            "seconds": round(self.seconds, 3),
            **({"allocation": self.allocation} if self.allocation is not None else {}),
            **({"sequential": self.sequential} if self.sequential is not None else {}),
        }


def prune(
    model: str | nn.Module | Loaded,
    stats: Statistics | None = None,
    *,
    options: PruneOptions | None = None,
    masks: list[BlockMasks] | None = None,
    inplace: bool = False,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
    sequential: bool = False,
    sequential_target: str | None = None,
    sequential_ranking: str | None = None,
    data: str | Any | Iterable[Tensor | Batch] | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    workers: int = 0,
    precision: str = "float32",
    forward_dtype: torch.dtype | None = None,
    scratch: bool | None = None,
    sync: Any = None,
    **option_values: Any,
) -> PruneResult:
    """Rank (unless `masks` are given), compensate and compact. Returns the narrower model and its report.

    Options are PruneOptions fields, as `options=` or as keywords (`sparsity=` sets every
    part's sparsity): prune(model, stats, target="mlp", sparsity=0.3, ranker="obs"). Without a
    target, what the model allows is pruned (MLP and Q/K, or the MLP alone; with `masks`, what they prune).
    A model handed in (a module or a Loaded) is pruned on a deep copy unless inplace=True.

    sequential=True calibrates block by block on the already-pruned model (corp_cli.sequential):
    give the calibration `data` (as for calibrate: a spec, an opened source or batches) instead
    of `stats`, and `sequential_target` "dense" (fit toward the dense model's outputs), "self", or "blend"
    (the default: the dense fit shrunk toward the self fit by cross-validation; docs/sequential.md), and
    `sequential_ranking` "stream" (each block ranks on its pruned-stream statistics) or "dense" (the units a
    one-shot prune would choose, from a dense first pass; not with `masks` or a budget).
    `sync` (distributed.BlockSync): this rank's `data` is its share, every block's sums are added across ranks.
    Leaving `sequential_target`/`sequential_ranking` None takes those defaults; given without
    sequential=True they are refused. The checks, the default target (with its warning) and the
    dispatch are `corp prune`'s (corp_cli.prune_checks): the same refusals, in the same words.
    """
    from corp_cli.prune_checks import check_for_model, sequential_choice

    t0 = time.perf_counter()
    loaded = as_loaded(model, None, device)
    target_given = options is not None or "target" in option_values or masks is not None
    if masks is not None and options is None and "target" not in option_values:
        from corp_cli.config import masks_target

        option_values = {**option_values, "target": masks_target(masks)}  # what they prune, as `corp prune --masks` says
    opts = _options(options, option_values)
    seq = sequential_choice(sequential, stats_given=stats is not None, target=sequential_target,
                            ranking=sequential_ranking, masks_given=masks is not None, budgeted=opts.budgeted)
    opts = check_for_model(opts, loaded.family, loaded.model, target_given=target_given, flags=option_values)
    if not inplace and not isinstance(model, str):  # a model loaded here is nobody else's
        loaded = replace(loaded, model=copy.deepcopy(loaded.model))
    if seq is not None:
        return _prune_sequential(loaded, opts, masks, t0, target=seq.target, ranking=seq.ranking, data=data,
                                 samples=samples, seed=seed, batch_size=batch_size, workers=workers,
                                 precision=precision, forward_dtype=forward_dtype, scratch=scratch,
                                 progress=progress or _no_progress, sync=sync)
    if stats is None:
        raise InputError("prune needs statistics (from calibrate), or sequential=True with calibration data")
    check_matches(stats, loaded.identity)
    shapes = block_shapes(loaded)
    check_block_shapes(stats, shapes)
    missing = [i for i, b in enumerate(stats.blocks) if not b]
    if missing:
        from corp_cli.stats import describe_blocks

        raise InputError(f"the statistics leave blocks {describe_blocks(missing)} out: calibrate those (--blocks) and "
                         "merge the files before pruning")
    fam = loaded.family
    allocation = None
    if masks is None and opts.budgeted:
        from corp_cli.allocation import allocate

        alloc = allocate(fam, loaded.model, stats, opts)
        allocation = alloc.to_dict()
        chosen = plan_masks(loaded.model, stats, opts, family=fam, widths=alloc.widths)
    else:
        chosen = masks if masks is not None else plan_masks(loaded.model, stats, opts, family=fam)
    if len(chosen) != fam.num_blocks(loaded.model):
        raise InputError(f"{len(chosen)} block masks for a model with {fam.num_blocks(loaded.model)} blocks")
    before = model_counts(loaded.model, family=fam)
    progress = progress or _no_progress
    with progress("pruning blocks", len(chosen), "blocks") as advance:
        blocks = apply_masks(loaded.model, stats, chosen, opts, on_block=lambda _i: advance(1), family=fam)
    after = model_counts(loaded.model, family=fam)
    return PruneResult(loaded=loaded, masks=chosen, blocks=blocks, options=opts, stats=stats, before=before,
                       after=after, seconds=time.perf_counter() - t0, base_shapes=shapes, allocation=allocation)


def _prune_sequential(loaded: Loaded, opts: PruneOptions, masks: list[BlockMasks] | None, t0: float, *, target: str,
                      ranking: str, data: Any, samples: int | None, seed: int, batch_size: int, workers: int,
                      precision: str,
                      forward_dtype: torch.dtype | None, scratch: bool | None, progress: Progress,
                      sync: Any = None) -> PruneResult:
    """prune(sequential=True): the calibration data streamed block by block through the pruned model."""
    from corp_cli import sequential as seq

    product_dtype = check_precision(precision)
    fam = loaded.family
    if data is None:
        raise InputError("sequential pruning needs calibration data (data=..., or --calib-data)")
    if isinstance(data, str):
        from corp_cli.sources import open_data

        data = open_data(data, loaded.modality, samples=samples, seed=seed, text_unit=fam.text_unit)
    is_source = hasattr(data, "describe") and hasattr(data, "spec")
    digest = hashlib.sha256()
    batches = ((b for b, _ in loaded.preprocessing.batches(data, batch_size, workers)) if is_source
               else _hashed(data, digest))
    shapes = block_shapes(loaded)
    before = model_counts(loaded.model, family=fam)
    run = seq.prune_sequential(loaded, batches, opts, target=target, ranking=ranking, masks=masks,
                               product_dtype=product_dtype,
                               forward_dtype=forward_dtype, scratch=scratch, progress=progress, sync=sync,
                               batch_size=batch_size)
    after = model_counts(loaded.model, family=fam)
    if is_source:
        described = data.describe()
    else:
        fingerprint = digest.hexdigest()
        described = {"spec": "in-memory batches", "kind": "batches", "synthetic": False, "labels": False,
                     "samples": run.samples, "selected": run.samples, "count": run.samples, "seed": None,
                     "shard": None, "fingerprint": fingerprint, "base_fingerprint": fingerprint, "skipped": 0,
                     "warnings": []}
    parts = [p for p in ("mlp", "attn", "vo") if any(p in b for b in run.stats)] or ["mlp"]
    meta = new_meta(identity=loaded.identity, shapes=shapes, parts=parts, preprocessing=loaded.preprocessing.to_dict(),
                    data=described, samples=run.samples, tokens=run.tokens, seed=seed, shard=None,
                    product_dtype=precision, forward_dtype=forward_dtype)
    meta["sequential"] = {"target": target, "ranking": ranking, "stream_bytes": run.stream_bytes,
                          "scratch": run.scratch}
    stats = Statistics(blocks=run.stats, meta=meta)
    return PruneResult(loaded=loaded, masks=run.masks, blocks=run.blocks, options=opts, stats=stats, before=before,
                       after=after, seconds=time.perf_counter() - t0, base_shapes=shapes, allocation=run.allocation,
                       sequential={"target": target, "ranking": ranking, "stream_bytes": run.stream_bytes,
                                   "scratch": run.scratch})


def _options(options: PruneOptions | None, values: dict[str, Any]) -> PruneOptions:
    if options is not None and values:
        raise InputError("give prune options either as options=PruneOptions(...) or as keywords, not both")
    if options is not None:
        return options
    values = dict(values)
    if "sparsity" in values:
        s = values.pop("sparsity")
        for name in ("mlp_sparsity", "attn_sparsity", "vo_sparsity", "head_sparsity"):
            values.setdefault(name, s)
    try:
        return PruneOptions(**values)
    except TypeError as e:
        raise InputError(f"unknown prune option ({e})") from None


def save_pruned(
    result: PruneResult, out: str | Path, *, overwrite: bool = False, save_stats: bool = False,
    started: float | None = None, plot: bool = False,
) -> dict[str, Any]:
    """Write masks.safetensors, model.safetensors (+ the family's files) and report.json into `out`, atomically.

    save_stats=True also writes the statistics as stats.safetensors (what `corp prune`
    does when it calibrated itself); plot=True also draws report.png (per block: kept widths
    and predicted error) where matplotlib is installed, and skips it silently where it is not.
    Returns the report.
    """
    out = Path(out)
    check_out_dir(out, overwrite=overwrite)
    loaded, stats = result.loaded, result.stats
    provenance = {
        "base": loaded.identity.to_dict(),
        "stats": {k: stats.meta[k] for k in ("data", "samples", "tokens", "synthetic", "seed", "shards", "tool_version")},
        "options": result.options.to_dict(),
        "preprocessing": loaded.preprocessing.to_dict(),
        # as the checkpoint gave them (safetensors metadata holds JSON text), else as the model names them
        "classes": loaded.checkpoint_meta.get("classes", loaded.classes),
    }
    with atomic_dir(out) as tmp:
        if save_stats:
            stats.save(tmp / STATS_FILE)
        fingerprint = stats.fingerprint()
        provenance["stats"]["fingerprint"] = fingerprint
        save_masks(tmp / MASKS_FILE, result.masks, identity=loaded.identity, shapes=result.base_shapes,
                   options=result.options.to_dict(), stats_fingerprint=fingerprint,
                   allocation=result.allocation["blocks"] if result.allocation is not None else None)
        loaded.model.cpu()
        arch = save_pruned_checkpoint(tmp, loaded, provenance)
        report = result.report(fingerprint)
        reload = loaded.family.reload_case(arch)
        if reload is not None:
            report["reload"] = reload
        if started is not None:
            report["seconds"] = round(time.perf_counter() - started, 3)
        write_json_atomic(tmp / REPORT_FILE, report)
        if plot:
            from corp_cli import report_plot

            if report_plot.available():
                from corp_cli.inspection import describe_report

                # inside the folder being built, so --out gains the picture together with the rest
                desc = describe_report(report, tmp / REPORT_FILE)
                report_plot.write(desc["blocks"], tmp / report_plot.PNG_FILE, desc["summary"])
    return report


def load(path: str | Path, *, device: str | torch.device = "cpu") -> Loaded:
    """A pruned output (or a dense model name / folder) with its family and preprocessing attached."""
    return as_loaded(str(path), None, device)


def stats_for(path: str | Path) -> Statistics:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p}: no such statistics file")
    return Statistics.load(p)




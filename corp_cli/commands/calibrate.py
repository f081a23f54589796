"""`corp calibrate`: stream calibration data once and write the statistics file; `merge` shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from corp_cli import defaults as D
from corp_cli.commands import common as C
from corp_cli.errors import InputError

DEFAULT_SAMPLES = D.CALIB_SAMPLES


class _DefaultRun(TyperGroup):
    """`corp calibrate MODEL ...` runs `run`; `corp calibrate merge ...` merges."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultRun,
    help="Stream calibration data through MODEL once and write per-block statistics (or merge shards).",
    no_args_is_help=True,
)


def parse_parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in D.STATS_PARTS]
    if not parts or bad:
        raise InputError(f"--parts must be a comma list of {', '.join(D.STATS_PARTS)}, got {text!r}")
    return parts


def default_data(modality: str) -> str:
    return D.CALIB_DATA[modality]


def calibrate_model(
    model: str, options: Any, *, data: str | None, samples: int | None, seed: int, shard: tuple[int, int] | None,
    device: str, batch_size: int, workers: int | None, parts: tuple[str, ...] | None, precision: str,
    data_flag: str = "--data",
) -> tuple[Any, Any, float]:
    """Cheap checks (model, options, data), then the weights, then the pass: (statistics, loaded model, seconds)."""
    import time

    from corp_cli import api
    from corp_cli.devices import resolve_device
    from corp_cli.loading import resolve_model
    from corp_cli.sources import open_data

    api.check_precision(precision)
    fam, name = resolve_model(model, options)
    n_workers = C.workers_for(fam.modality, workers)
    dev = resolve_device(device)
    source = open_data(data or default_data(fam.modality), fam.modality, samples=samples, seed=seed, shard=shard,
                       flag=data_flag)
    loaded = fam.load(name, options, dev)
    t0 = time.perf_counter()
    stats = api.calibrate(loaded, source, batch_size=batch_size, workers=n_workers, parts=parts, precision=precision,
                          progress=C.progress_bar)
    return stats, loaded, time.perf_counter() - t0


@app.command("run", help="Calibrate MODEL on --data and write the statistics to --out.")
@C.handle_errors
def run_cmd(
    model: C.ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Statistics file to write (.safetensors).")],
    data: Annotated[str | None, typer.Option("--data", help=f"Images: a folder, hf:NAME[:CONFIG][@SPLIT] or synthetic (smoke tests only; default {D.CALIB_DATA['image']}). Text: text:pydoc, text:FILE (with @calib/@eval) or hf:NAME (default {D.CALIB_DATA['text']}).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Number of calibration images or texts.")] = DEFAULT_SAMPLES,
    seed: C.SeedOpt = 0,
    shard: Annotated[str | None, typer.Option("--shard", help="I/N: calibrate only the I-th (0-based) of N disjoint slices.")] = None,
    parts: Annotated[str | None, typer.Option("--parts", help="Which statistics to gather, a comma list of mlp (MLP units), attn (Q/K dims) and vo (value/output dims and whole heads) (default: mlp, and attn where the model allows Q/K pruning).")] = None,
    precision: Annotated[str, typer.Option("--precision", help="Per-batch product dtype: float32 (fast) or float64; sums are float64 always.")] = D.PRECISION,
    checkpoint: C.CheckpointOpt = None,
    num_classes: C.NumClassesOpt = None,
    pretrained_cfg: C.PretrainedCfgOpt = None,
    mean: C.MeanOpt = None,
    std: C.StdOpt = None,
    input_size: C.InputSizeOpt = None,
    interpolation: C.InterpOpt = None,
    crop_pct: C.CropPctOpt = None,
    crop_mode: C.CropModeOpt = None,
    device: C.DeviceOpt = D.DEVICE,
    batch_size: C.BatchSizeOpt = D.CALIB_BATCH_SIZE,
    workers: C.WorkersOpt = None,
    overwrite: C.OverwriteOpt = False,
    json_out: C.JsonOpt = None,
) -> None:
    from corp_cli.artifacts import check_out_file

    # Every option and path is checked before the model loads or an image is read.
    shard_ix, part_list = C.parse_shard(shard), (parse_parts(parts) if parts is not None else None)
    options = C.model_options(checkpoint, num_classes, pretrained_cfg, mean=mean, std=std, input_size=input_size,
                              interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode)
    check_out_file(out, overwrite=overwrite)
    stats, loaded, seconds = calibrate_model(
        model, options, data=data, samples=samples, seed=seed, shard=shard_ix, device=device,
        batch_size=batch_size, workers=workers, parts=part_list, precision=precision,
    )
    stats.save(out)
    summary = stats_summary(stats, out)
    summary["seconds"] = round(seconds, 3)
    summary["samples_per_second"] = round(stats.meta["samples"] / max(seconds, 1e-9), 2)
    if not C.write_json(json_out, summary):
        synth = " [SYNTHETIC DATA: smoke test only]" if stats.meta["synthetic"] else ""
        skipped = f", {summary['skipped_samples']} undecodable skipped" if summary["skipped_samples"] else ""
        unit = C.sample_unit(stats.meta["preprocessing"])
        C.out.print(
            f"wrote {out}: {loaded.identity.name}, {stats.meta['samples']} {unit}{skipped}, {stats.meta['tokens']} tokens, "
            f"{len(stats.blocks)} blocks, {seconds:.1f}s ({summary['samples_per_second']} {unit}/s){synth}"
        )


def stats_summary(stats: Any, path: Path) -> dict[str, Any]:
    m = stats.meta
    return {
        "path": str(path),
        "fingerprint": stats.fingerprint(),
        "model": m["model"],
        "samples": m["samples"],
        "tokens": m["tokens"],
        "skipped_samples": m.get("skipped_samples", 0),
        "warnings": m["data"].get("warnings", []),
        "synthetic": m["synthetic"],
        "data": m["data"],
        "shards": m["shards"],
        "parts": m["parts"],
        "tool_version": m["tool_version"],
    }


@app.command("merge", help="Add statistics shards of one calibration set into one file.")
@C.handle_errors
def merge_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="Statistics shards to add.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Merged statistics file to write.")],
    overwrite: C.OverwriteOpt = False,
    json_out: C.JsonOpt = None,
) -> None:
    from corp_cli.artifacts import check_out_file
    from corp_cli.stats import Statistics, merge

    check_out_file(out, overwrite=overwrite)
    if len(inputs) < 2:
        raise InputError("merge needs at least two statistics files")
    items = [Statistics.load(C.existing_file(p, "statistics file")) for p in inputs]
    merged = merge(items)
    merged.save(out)
    summary = stats_summary(merged, out)
    if not C.write_json(json_out, summary):
        sh = merged.meta["shards"]
        C.out.print(
            f"wrote {out}: {len(items)} files, shards {sh['indices']} of {sh['count']}, "
            f"{merged.meta['samples']} {C.sample_unit(merged.meta['preprocessing'])}, {merged.meta['tokens']} tokens"
        )

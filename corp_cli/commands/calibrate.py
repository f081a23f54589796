"""`corp calibrate`: stream calibration images once and write the statistics file; `merge` shards."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import click
import torch
import typer
from typer.core import TyperGroup

from corp_cli.artifacts import check_out_file
from corp_cli.calibrate import PARTS, calibrate
from corp_cli.commands import common as C
from corp_cli.data import ImageSource, open_source
from corp_cli.errors import InputError
from corp_cli.hf import is_hf_model_spec
from corp_cli.models import LoadedModel, check_model, load_dense, resolve_device
from corp_cli.preprocess import Preprocessing
from corp_cli.preprocess import resolve_preprocessing
from corp_cli.stats import Statistics, merge

DEFAULT_DATA = "hf:timm/mini-imagenet@validation"
DEFAULT_SAMPLES = 512


class _DefaultRun(TyperGroup):
    """`corp calibrate MODEL ...` runs `run`; `corp calibrate merge ...` merges."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultRun,
    help="Stream calibration images through MODEL once and write per-block statistics (or merge shards).",
    no_args_is_help=True,
)


def check_model_inputs(
    model: str, checkpoint: Path | None, num_classes: int | None, pretrained_cfg: Path | None, device: str,
) -> torch.device:
    """Everything about the model that can be checked without reading weights: fail in seconds, not minutes."""
    if is_hf_model_spec(model):
        from corp_cli.hf.commands import check_hf_model_inputs

        return check_hf_model_inputs(model, checkpoint, num_classes, pretrained_cfg, device)
    check_model(model, num_classes)
    dev = resolve_device(device)
    if checkpoint is not None:
        _readable(C.existing_file(checkpoint, "checkpoint"), "checkpoint")
    if pretrained_cfg is not None:
        _readable(C.existing_file(pretrained_cfg, "--pretrained-cfg"), "--pretrained-cfg")
    return dev


def _readable(path: Path, what: str) -> None:
    # os.access says yes to root for anything; opening is the real test.
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read ({e.strerror or e})") from None


def load_model_and_preprocessing(
    model: str, checkpoint: Path | None, num_classes: int | None, pretrained_cfg: Path | None,
    overrides: dict[str, Any], device: str,
) -> tuple[LoadedModel, Preprocessing]:
    if is_hf_model_spec(model):  # a Hugging Face folder or hf-model:ID: loaded by transformers
        from corp_cli.hf.commands import load_hf_for_command

        return load_hf_for_command(model, checkpoint, num_classes, pretrained_cfg, overrides, device)
    dev = check_model_inputs(model, checkpoint, num_classes, pretrained_cfg, device)
    loaded = load_dense(model, checkpoint=checkpoint, num_classes=num_classes, device=dev)
    prep = resolve_preprocessing(
        loaded.model, checkpoint_meta=loaded.checkpoint_meta, pretrained_cfg_path=pretrained_cfg, overrides=overrides
    )
    return loaded, prep


def parse_parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if not parts or bad:
        raise InputError(f"--parts must be a comma list of {', '.join(PARTS)}, got {text!r}")
    return parts


def check_precision(precision: str) -> None:
    if precision not in ("float32", "float64"):
        raise InputError(f"--precision must be float32 or float64, got {precision!r}")


def open_calibration(
    model: str, *, data: str, samples: int | None, seed: int, shard: tuple[int, int] | None,
    checkpoint: Path | None, num_classes: int | None, pretrained_cfg: Path | None, overrides: dict[str, Any],
    device: str,
) -> tuple[ImageSource, LoadedModel, Preprocessing]:
    """Validate the model inputs, open the data, then load the model: cheap checks first."""
    if is_hf_model_spec(model):
        from corp_cli.hf.calibrate import open_hf_calibration

        check_model_inputs(model, checkpoint, num_classes, pretrained_cfg, device)
        return open_hf_calibration(model, data=data, samples=samples, seed=seed, shard=shard, device=device)
    check_model_inputs(model, checkpoint, num_classes, pretrained_cfg, device)
    source = open_source(data, samples=samples, seed=seed, shard=shard)
    loaded, prep = load_model_and_preprocessing(model, checkpoint, num_classes, pretrained_cfg, overrides, device)
    return source, loaded, prep


def calibrate_opened(
    loaded: LoadedModel, prep: Preprocessing, source: ImageSource, *,
    batch_size: int, workers: int, parts: tuple[str, ...], precision: str,
) -> tuple[Statistics, float]:
    """The expensive pass over the data; returns the statistics and the seconds it took."""
    if getattr(source, "kind", None) == "text":  # tokenised text for an HF encoder
        from corp_cli.hf.calibrate import calibrate_hf_opened

        return calibrate_hf_opened(loaded, prep, source, batch_size=batch_size, workers=workers, parts=parts,
                                   precision=precision)
    check_precision(precision)
    t0 = time.perf_counter()
    with C.progress_bar(f"calibrating {loaded.identity.name}", source.num_items) as advance:
        stats = calibrate(
            loaded, prep, source, batch_size=batch_size, workers=workers, parts=parts,
            product_dtype=getattr(torch, precision), on_batch=advance,
        )
    return stats, time.perf_counter() - t0


def run_calibration(
    model: str, *, data: str, samples: int | None, seed: int, shard: tuple[int, int] | None,
    checkpoint: Path | None, num_classes: int | None, pretrained_cfg: Path | None, overrides: dict[str, Any],
    device: str, batch_size: int, workers: int, parts: tuple[str, ...], precision: str,
) -> tuple[Statistics, LoadedModel, Preprocessing, float]:
    """Shared by `corp calibrate` and `corp prune --calib-data`."""
    if is_hf_model_spec(model):  # text through the model's tokenizer, or HF ViT images
        from corp_cli.hf.calibrate import run_hf_calibration

        return run_hf_calibration(
            model, data=data, samples=samples, seed=seed, shard=shard, checkpoint=checkpoint, device=device,
            batch_size=batch_size, workers=workers, parts=parts, precision=precision,
        )
    check_precision(precision)
    source, loaded, prep = open_calibration(
        model, data=data, samples=samples, seed=seed, shard=shard, checkpoint=checkpoint, num_classes=num_classes,
        pretrained_cfg=pretrained_cfg, overrides=overrides, device=device,
    )
    stats, seconds = calibrate_opened(
        loaded, prep, source, batch_size=batch_size, workers=workers, parts=parts, precision=precision
    )
    return stats, loaded, prep, seconds


@app.command("run", help="Calibrate MODEL on --data and write the statistics to --out.")
@C.handle_errors
def run_cmd(
    model: C.ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Statistics file to write (.safetensors).")],
    data: Annotated[str, typer.Option("--data", help="Image folder, hf:NAME[:CONFIG][@SPLIT], or synthetic (smoke tests only).")] = DEFAULT_DATA,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Number of calibration images.")] = DEFAULT_SAMPLES,
    seed: C.SeedOpt = 0,
    shard: Annotated[str | None, typer.Option("--shard", help="I/N: calibrate only the I-th (0-based) of N disjoint slices.")] = None,
    parts: Annotated[str, typer.Option("--parts", help="Which statistics to gather: mlp, attn or both.")] = "mlp,attn",
    precision: Annotated[str, typer.Option("--precision", help="Per-batch product dtype: float32 (fast) or float64; sums are float64 always.")] = "float32",
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
    # Every option and path is checked before the model loads or an image is read.
    shard_ix, part_list = C.parse_shard(shard), parse_parts(parts)
    check_precision(precision)
    overrides = C.preprocessing_overrides(mean, std, input_size, interpolation, crop_pct, crop_mode)
    check_out_file(out, overwrite=overwrite)
    stats, loaded, prep, seconds = run_calibration(
        model, data=data, samples=samples, seed=seed, shard=shard_ix, checkpoint=checkpoint,
        num_classes=num_classes, pretrained_cfg=pretrained_cfg, overrides=overrides,
        device=device, batch_size=batch_size, workers=workers, parts=part_list, precision=precision,
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


def stats_summary(stats: Statistics, path: Path) -> dict[str, Any]:
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

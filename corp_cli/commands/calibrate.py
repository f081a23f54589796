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

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """`corp calibrate --help` shows the options of the default form, `corp calibrate MODEL ...`."""
        run = self.commands["run"]
        run_ctx = run.make_context(ctx.info_name, [], parent=ctx.parent, resilient_parsing=True)
        run.format_help(run_ctx, formatter)


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


def job_options(**kw: Any) -> Any:
    from corp_cli.calibration_job import CalibrationJob

    return CalibrationJob(**kw)


def print_plan(plan: Any, what: str) -> None:
    """The pre-flight plan as a table (corp calibrate/prune --dry-run)."""
    from rich.table import Table

    from corp_cli.plan import human
    from corp_cli.stats import describe_blocks

    d = plan.to_dict()
    table = Table(title=f"{what} plan: {plan.model} on {plan.device}, batch {plan.batch_size}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("samples / forward passes", f"{d['samples'] if d['samples'] is not None else '?'} / "
                                              f"{d['forward_passes'] if d['forward_passes'] is not None else '?'}")
    table.add_row("blocks / parts", f"{describe_blocks(plan.blocks)} / {','.join(plan.parts)}")
    widths = sorted({(w["mlp_hidden"], w["num_heads"], w["head_dim"]) for w in plan.block_widths})
    table.add_row("block widths (MLP, heads x dim)", "; ".join(f"{m}, {h}x{hd}" for m, h, hd in widths))
    table.add_row("statistics size", human(plan.stats_bytes))
    for name, size in plan.terms.items():
        table.add_row(f"memory: {name}", human(size))
    table.add_row("expected peak", human(plan.peak_bytes))
    if plan.available_bytes is not None:
        table.add_row(plan.limit_source, human(plan.available_bytes))
    C.out.print(table)
    if plan.time is not None:
        t = plan.time
        solves = f" ({t['solves_seconds']:,.1f} s of solves)" if "solves" in plan.flops else ""
        C.out.print(f"estimated time {t['seconds']:,.1f} s{solves} at {t['forward_rate'] / 1e9:,.1f} GFLOP/s forward, "
                    f"{t['float64_rate'] / 1e9:,.1f} GFLOP/s float64, measured on {plan.device} "
                    f"(excludes {t['excluded']})", markup=False)
    for note in plan.notes:
        C.out.print(note, markup=False)


@app.command("run", help="Calibrate MODEL on --data and write its per-block statistics to --out.\n\n"
                         "The other form, `corp calibrate merge SHARDS... --out FILE`, adds statistics shards "
                         "together (see `corp calibrate merge --help`).")
@C.handle_errors
def run_cmd(
    model: C.ModelArg,
    out: Annotated[Path, typer.Option("--out", help="Statistics file to write (.safetensors).")],
    data: Annotated[str | None, typer.Option("--data", help=f"Images: a folder, hf:NAME\\[:CONFIG]\\[@SPLIT] or synthetic (smoke tests only; default {D.CALIB_DATA['image']}). Text: text:pydoc, text:FILE (with @calib/@eval) or hf:NAME (default {D.CALIB_DATA['text']}).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Number of calibration images or texts.")] = DEFAULT_SAMPLES,
    seed: C.SeedOpt = 0,
    shard: Annotated[str | None, typer.Option("--shard", help="I/N: calibrate only the I-th (0-based) of N disjoint slices.")] = None,
    parts: Annotated[str | None, typer.Option("--parts", help="Which statistics to gather, a comma list of mlp (MLP units), attn (Q/K dims) and vo (value/output dims and whole heads) (default: mlp, and attn where the model allows Q/K pruning).")] = None,
    precision: Annotated[str, typer.Option("--precision", help="Per-batch product dtype: float32 (fast) or float64; sums are float64 always.")] = D.PRECISION,
    dtype: Annotated[str, typer.Option("--dtype", help="Forward dtype: fp32, or bf16/fp16 under autocast (products stay float32, sums float64).")] = "fp32",
    blocks: Annotated[str | None, typer.Option("--blocks", help="Only these blocks, e.g. 0-11 (merge the pieces with `corp calibrate merge`).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check every input and print the plan (memory, passes) without running it.")] = False,
    max_memory: Annotated[str | None, typer.Option("--max-memory", help="Refuse to start when the expected peak exceeds this (e.g. 8G; default: the device's free memory).")] = None,
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
    from corp_cli import calibration_job
    from corp_cli.artifacts import check_out_file
    from corp_cli.plan import parse_bytes

    C.quiet_unless_main_rank()
    # Every option and path is checked before the model loads or an image is read.
    shard_ix, part_list = C.parse_shard(shard), (parse_parts(parts) if parts is not None else None)
    options = C.model_options(checkpoint, num_classes, pretrained_cfg, model_arg, seq_len=seq_len, mean=mean, std=std,
                              input_size=input_size,
                              interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode)
    check_out_file(out, overwrite=overwrite)
    job = job_options(model=model, options=options, data=data, samples=samples, seed=seed, shard=shard_ix, device=device,
                      batch_size=batch_size, workers=workers, parts=part_list, precision=precision, dtype=dtype,
                      blocks=calibration_job.parse_blocks(blocks) if blocks else None,
                      max_memory=parse_bytes(max_memory) if max_memory else None)
    result = calibration_job.run(job, dry_run=dry_run, progress=C.progress_bar, workers_for=C.workers_for)
    if dry_run:
        if not C.write_json(json_out, {"dry_run": True, "out": str(out), **result.plan.to_dict()}):
            print_plan(result.plan, "corp calibrate")
        return
    if not result.writes:
        return  # another rank writes the statistics
    stats, loaded, seconds = result.stats, result.loaded, result.seconds
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
    allow_gaps: Annotated[bool, typer.Option("--allow-gaps", help="Block ranges may leave blocks out (a partial file: prune refuses it).")] = False,
    overwrite: C.OverwriteOpt = False,
    json_out: C.JsonOpt = None,
) -> None:
    from corp_cli.artifacts import check_out_file
    from corp_cli.stats import Statistics, merge

    check_out_file(out, overwrite=overwrite)
    if len(inputs) < 2:
        raise InputError("merge needs at least two statistics files")
    items = [Statistics.load(C.existing_file(p, "statistics file")) for p in inputs]
    merged = merge(items, allow_gaps=allow_gaps)
    merged.save(out)
    summary = stats_summary(merged, out)
    if not C.write_json(json_out, summary):
        sh = merged.meta["shards"]
        C.out.print(
            f"wrote {out}: {len(items)} files, shards {sh['indices']} of {sh['count']}, "
            f"{merged.meta['samples']} {C.sample_unit(merged.meta['preprocessing'])}, {merged.meta['tokens']} tokens"
        )

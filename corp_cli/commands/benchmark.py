"""`corp benchmark`: parameters, FLOPs, peak memory, latency and throughput, beside the reference."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from corp_cli import defaults as D
from corp_cli.commands import common as C
from corp_cli.commands.evaluate import ReferenceCkptOpt, ReferenceOpt, load_reference
from corp_cli.errors import InputError

log = logging.getLogger(__name__)


@C.handle_errors
def benchmark_cmd(
    model: Annotated[str, typer.Argument(help="A model name / folder (with --checkpoint for timm weights) or a pruned DIR from `corp prune`.", show_default=False)],
    reference: ReferenceOpt = None,
    reference_checkpoint: ReferenceCkptOpt = None,
    batch_sizes: Annotated[str | None, typer.Option("--batch-sizes", help="Comma list (default: 1,8 on CPU, 1,32,256 on CUDA).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, bf16 or fp16 (weights and inputs cast).")] = "fp32",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile both models first (warm-up absorbs compilation).")] = False,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed passes per batch size.")] = D.BENCH_WARMUP,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed passes per batch size.")] = D.BENCH_RUNS,
    checkpoint: C.CheckpointOpt = None,
    num_classes: C.NumClassesOpt = None,
    model_arg: C.ModelArgOpt = None,
    device: C.DeviceOpt = D.DEVICE,
    json_out: C.JsonOpt = None,
) -> None:
    """Time MODEL (and --reference) forward passes: median/p90 latency, throughput, peak memory, FLOPs."""
    from corp_cli.benchmark import (
        BenchConfig, compare, misaligned_widths, parse_batch_sizes, parse_dtype, prepare, static_figures, time_forward,
    )
    from corp_cli.devices import environment, resolve_device
    from corp_cli.loading import describe, is_pruned_path, load_any

    t0 = time.perf_counter()
    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    sizes = parse_batch_sizes(batch_sizes) if batch_sizes else D.BENCH_BATCH_SIZES[dev.type]
    options = C.model_options(checkpoint, num_classes, model_args=model_arg)
    loaded = load_any(model, options, dev)
    desc = describe(loaded, model, pruned=is_pruned_path(model))
    ref = load_reference(model, desc, reference, reference_checkpoint, dev)
    cfg = BenchConfig(sizes, torch_dtype, dev, warmup=warmup, runs=runs, compile=compile_)
    warnings: list[str] = []
    if dev.type == "cuda":
        bad = misaligned_widths(loaded)
        if bad:
            msg = f"{len(bad)} pruned width(s) are not multiples of 8 ({', '.join(bad[:3])}...); CUDA GEMMs run slower on such shapes (prune with --round-to 8)"
            log.warning("%s", msg)
            warnings.append(msg)
    figures = {"model": static_figures(loaded, torch_dtype)}
    models = {"model": prepare(loaded, cfg)}
    if ref is not None:
        figures["reference"] = static_figures(ref[0], torch_dtype)
        models["reference"] = prepare(ref[0], cfg)
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in models}
    total = len(sizes) * len(models) * (warmup + runs)
    try:
        with C.progress_bar("benchmarking", total, unit="passes") as advance:
            for bs in sizes:
                for name, m in models.items():  # alternate so drift (thermal, turbo) hits both alike
                    rows[name].append(time_forward(m, bs, cfg, on_run=lambda: advance(1)))
    except RuntimeError as e:
        if compile_ and ("compile" in str(e).lower() or "inductor" in str(e).lower()):
            raise InputError(f"torch.compile failed on this machine ({str(e).splitlines()[0][:160]}); rerun without --compile") from None
        raise
    example = loaded.family.example_batch(loaded, 1, dtype=torch_dtype, device=dev)
    text = "input_ids" in example
    input_size = list(example["input_ids"].shape[1:]) if text else list(example["pixel_values"].shape[1:])
    report: dict[str, Any] = {
        "command": "benchmark",
        "model": {**desc, **figures["model"], "runs": rows["model"]},
        "reference": None,
        "comparison": None,
        "settings": {
            "batch_sizes": list(sizes), "dtype": dtype, "compile": compile_, "warmup": warmup, "runs": runs,
            "input_size": input_size, "input": "token ids" if text else "pixels", "inference_mode": True,
            "peak_memory": "memory the passes needed beyond the resident weights and input ("
                           + ("torch.cuda.max_memory_allocated - memory_allocated before)" if dev.type == "cuda"
                              else "peak RSS - RSS before)"),
        },
        "environment": environment(dev),
        "warnings": warnings,
    }
    if ref is not None:
        report["reference"] = {**ref[1], **figures["reference"], "runs": rows["reference"]}
        report["comparison"] = {
            "params_reduction": 1.0 - figures["model"]["params"] / figures["reference"]["params"],
            "flop_reduction": 1.0 - figures["model"]["flops_per_item"] / figures["reference"]["flops_per_item"],
            "per_batch_size": compare(rows["model"], rows["reference"], figures["model"]["flops_per_item"],
                                      figures["reference"]["flops_per_item"]),
        }
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if not C.write_json(json_out, report):
        print_report(report)


def _mb(b: int) -> str:
    return f"{b / 2**20:,.1f}"


def print_report(report: dict[str, Any]) -> None:
    s = report["settings"]
    entries = [("model", report["model"])] + ([("reference", report["reference"])] if report["reference"] else [])
    cmp = report["comparison"]
    title = f"corp benchmark {report['model']['name']} ({report['model']['kind']})"
    item = "sequence" if s.get("input") == "token ids" else "image"
    sizes = Table(title=title)
    for col in ("", "params", f"GFLOPs/{item}", "reduction"):
        sizes.add_column(col, justify="right" if col else "left")
    for label, e in entries:
        red = f"-{100 * cmp['params_reduction']:.1f}% params, -{100 * cmp['flop_reduction']:.1f}% FLOPs" if cmp and label == "model" else ""
        sizes.add_row(label, f"{e['params'] / 1e6:.2f}M", f"{e['flops_per_item'] / 1e9:.3f}", red)
    C.out.print(sizes)
    speed = Table(title=f"{s['dtype']} on {report['environment']['device']}{', compiled' if s['compile'] else ''}, "
                        f"{s['runs']} timed runs after {s['warmup']} warm-up")
    for col in ("batch", "", "median ms", "p90 ms", f"{item}s/s", "peak MB", "speed-up"):
        speed.add_column(col, justify="right" if col else "left")
    per_bs = {c["batch_size"]: c for c in (cmp or {}).get("per_batch_size", [])}
    for i, bs in enumerate(s["batch_sizes"]):
        for label, e in entries:
            r = e["runs"][i]
            c = per_bs.get(bs) if label == "model" else None
            speed.add_row(
                str(bs) if label == "model" else "", label, f"{r['latency_ms_median']:.2f}", f"{r['latency_ms_p90']:.2f}",
                f"{r['throughput_items_per_s']:,.1f}", _mb(r["peak_memory_bytes"]),
                f"{c['speedup_median']:.2f}x" if c else "",
            )
    C.out.print(speed)
    C.out.print(f"peak MB: {s['peak_memory']}; {report['seconds']:.1f}s")
    for w in report["warnings"]:
        C.err.print(f"warning: {w}", markup=False)

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
    seq_lens: Annotated[str | None, typer.Option("--seq-lens", help="Causal language models: comma list of sequence lengths the forward (prefill) is timed at, per batch size (default: the model's --seq-len default).")] = None,
    new_tokens: Annotated[int | None, typer.Option("--new-tokens", min=0, help=f"Causal language models: tokens generated per sequence to time decoding with the KV cache (default {D.BENCH_NEW_TOKENS}; 0: no decode timing).")] = None,
    checkpoint: C.CheckpointOpt = None,
    num_classes: C.NumClassesOpt = None,
    model_arg: C.ModelArgOpt = None,
    device: C.DeviceOpt = D.DEVICE,
    json_out: C.JsonOpt = None,
) -> None:
    """Time MODEL (and --reference) forward passes: median/p90 latency, throughput, peak memory, FLOPs."""
    from corp_cli.benchmark import (
        BenchConfig, compare, misaligned_widths, parse_batch_sizes, parse_dtype, parse_seq_lens, prepare, static_figures,
        time_decode, time_forward,
    )
    from corp_cli.devices import environment, resolve_device
    from corp_cli.loading import describe, family_of_spec, is_pruned_path, load_any

    t0 = time.perf_counter()
    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    sizes = parse_batch_sizes(batch_sizes) if batch_sizes else D.BENCH_BATCH_SIZES[dev.type]
    lens = parse_seq_lens(seq_lens) if seq_lens is not None else None
    if new_tokens == 1:
        raise InputError("--new-tokens must be 0 (no decode timing) or at least 2 (decode steps after the first token)")
    lm_flags = [f for f, v in (("--seq-lens", seq_lens), ("--new-tokens", new_tokens)) if v is not None]
    if lm_flags and "seq_len" not in family_of_spec(model).options:
        raise InputError(f"{', '.join(lm_flags)} appl{'ies' if len(lm_flags) == 1 else 'y'} to causal language models "
                         f"(token windows, generation); {model} is not one: drop {'it' if len(lm_flags) == 1 else 'them'}")
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
    decode_rows: dict[str, list[dict[str, Any]]] = {k: [] for k in models}
    lm = loaded.family.evaluation(loaded.model) == "lm"
    # a language model runs at each --seq-lens length; other models at their one input size
    try:
        shapes = [loaded.family.with_seq_len(loaded, n) for n in lens] if lens else [loaded]
    except InputError as e:
        raise InputError(str(e).replace("--seq-len", "--seq-lens", 1)) from None
    n_new = (D.BENCH_NEW_TOKENS if new_tokens is None else new_tokens) if lm else 0
    prompt = 0
    if n_new:
        prompt = min(D.BENCH_PROMPT_TOKENS, lens[0] if lens else loaded.preprocessing.max_length)
        try:
            loaded.family.with_seq_len(loaded, prompt + n_new)
        except InputError:
            raise InputError(f"--new-tokens {n_new} after a {prompt}-token prompt runs past the model's context; "
                             "lower --new-tokens") from None
    total = len(sizes) * len(models) * (len(shapes) + (1 if n_new else 0)) * (warmup + runs)
    try:
        with C.progress_bar("benchmarking", total, unit="passes") as advance:
            for shape in shapes:
                for bs in sizes:
                    for name, m in models.items():  # alternate so drift (thermal, turbo) hits both alike
                        timed = m if shape is loaded else m.family.with_seq_len(m, shape.preprocessing.max_length)
                        rows[name].append(time_forward(timed, bs, cfg, on_run=lambda: advance(1)))
            for bs in sizes if n_new else ():
                for name, m in models.items():
                    decode_rows[name].append(time_decode(m, bs, cfg, prompt, n_new, on_run=lambda: advance(1)))
    except RuntimeError as e:
        if compile_ and ("compile" in str(e).lower() or "inductor" in str(e).lower()):
            raise InputError(f"torch.compile failed on this machine ({str(e).splitlines()[0][:160]}); rerun without --compile") from None
        raise
    example = loaded.family.example_batch(loaded, 1, dtype=torch_dtype, device=dev)
    text = "input_ids" in example
    input_size = list(example["input_ids"].shape[1:]) if text else list(example["pixel_values"].shape[1:])
    report: dict[str, Any] = {
        "command": "benchmark",
        "model": {**desc, **figures["model"], "runs": rows["model"], **({"decode": decode_rows["model"]} if n_new else {})},
        "reference": None,
        "comparison": None,
        "settings": {
            "batch_sizes": list(sizes), "dtype": dtype, "compile": compile_, "warmup": warmup, "runs": runs,
            "input_size": input_size, "input": "token ids" if text else "pixels", "inference_mode": True,
            **({"seq_lens": [s.preprocessing.max_length for s in shapes], "new_tokens": n_new, "prompt_tokens": prompt}
               if lm else {}),
            "peak_memory": "memory the passes needed beyond the resident weights and input ("
                           + ("torch.cuda.max_memory_allocated - memory_allocated before)" if dev.type == "cuda"
                              else "peak RSS - RSS before)"),
        },
        "environment": environment(dev),
        "warnings": warnings,
    }
    if ref is not None:
        report["reference"] = {**ref[1], **figures["reference"], "runs": rows["reference"],
                               **({"decode": decode_rows["reference"]} if n_new else {})}
        report["comparison"] = {
            "params_reduction": 1.0 - figures["model"]["params"] / figures["reference"]["params"],
            "flop_reduction": 1.0 - figures["model"]["flops_per_item"] / figures["reference"]["flops_per_item"],
            **({"kv_ratio": figures["model"]["kv_bytes_per_token"] / figures["reference"]["kv_bytes_per_token"]}
               if "kv_bytes_per_token" in figures["model"] else {}),
            "per_batch_size": compare(rows["model"], rows["reference"], figures["model"]["flops_per_item"],
                                      figures["reference"]["flops_per_item"]),
        }
        if n_new:
            report["comparison"]["decode"] = [
                {"batch_size": m["batch_size"], "decode_speedup": m["decode_tokens_per_s"] / r["decode_tokens_per_s"]}
                for m, r in zip(decode_rows["model"], decode_rows["reference"])]
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
    kv = "kv_bytes_per_token" in report["model"]
    for col in ("", "params", f"GFLOPs/{item}", *(("KV bytes/token",) if kv else ()), "reduction"):
        sizes.add_column(col, justify="right" if col else "left")
    for label, e in entries:
        red = f"-{100 * cmp['params_reduction']:.1f}% params, -{100 * cmp['flop_reduction']:.1f}% FLOPs" if cmp and label == "model" else ""
        if kv and cmp and label == "model":
            red += f", {cmp['kv_ratio']:.3f}x KV cache"
        sizes.add_row(label, f"{e['params'] / 1e6:.2f}M", f"{e['flops_per_item'] / 1e9:.3f}",
                      *((f"{e['kv_bytes_per_token']:,}",) if kv else ()), red)
    C.out.print(sizes)
    speed = Table(title=f"{s['dtype']} on {report['environment']['device']}{', compiled' if s['compile'] else ''}, "
                        f"{s['runs']} timed runs after {s['warmup']} warm-up")
    lm = "seq_lens" in s
    cols = ("batch", "seq", "", "median ms", "p90 ms", "prefill tok/s", "peak MB", "speed-up") if lm else \
        ("batch", "", "median ms", "p90 ms", f"{item}s/s", "peak MB", "speed-up")
    for col in cols:
        speed.add_column(col, justify="right" if col else "left")
    per_run = (cmp or {}).get("per_batch_size", [])
    for i in range(len(report["model"]["runs"])):
        for label, e in entries:
            r = e["runs"][i]
            c = per_run[i] if label == "model" and i < len(per_run) else None
            first = [str(r["batch_size"]), str(r["seq_len"])] if lm else [str(r["batch_size"])]
            speed.add_row(
                *(first if label == "model" else [""] * len(first)), label, f"{r['latency_ms_median']:.2f}",
                f"{r['latency_ms_p90']:.2f}",
                f"{r['tokens_per_s']:,.0f}" if lm else f"{r['throughput_items_per_s']:,.1f}", _mb(r["peak_memory_bytes"]),
                f"{c['speedup_median']:.2f}x" if c else "",
            )
    C.out.print(speed)
    if report["model"].get("decode"):
        _print_decode(report, entries)
    C.out.print(f"peak MB: {s['peak_memory']}; {report['seconds']:.1f}s")
    for w in report["warnings"]:
        C.err.print(f"warning: {w}", markup=False)


def _print_decode(report: dict[str, Any], entries: list[tuple[str, dict[str, Any]]]) -> None:
    s = report["settings"]
    table = Table(title=f"decode with the KV cache: {s['new_tokens']} new tokens after a {s['prompt_tokens']}-token "
                        "prompt (greedy; prefill not counted)")
    for col in ("batch", "", "ms / step", "decode tok/s", "generate ms", "speed-up"):
        table.add_column(col, justify="right" if col else "left")
    speedups = (report["comparison"] or {}).get("decode", [])
    for i in range(len(report["model"]["decode"])):
        for label, e in entries:
            r = e["decode"][i]
            c = speedups[i] if label == "model" and i < len(speedups) else None
            table.add_row(str(r["batch_size"]) if label == "model" else "", label, f"{r['ms_per_decode_step']:.2f}",
                          f"{r['decode_tokens_per_s']:,.1f}", f"{r['generate_ms_median']:.1f}",
                          f"{c['decode_speedup']:.2f}x" if c else "")
    C.out.print(table)

"""`corp inspect`: what a corp artifact is, in a few lines (or as JSON), and its picture."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from corp_cli.commands import common as C
from corp_cli.errors import InputError

_PART_NAMES = {"mlp": "MLP", "qk": "Q/K", "heads": "heads", "vo": "V/O"}


@C.handle_errors
def inspect_cmd(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="stats.safetensors, masks.safetensors, a `corp prune` output folder (or its model.safetensors), or report.json.", show_default=False)],
    plot: Annotated[Path | None, typer.Option("--plot", metavar="OUT.png", help="Also draw the kept widths and predicted error of every block into OUT.png (needs matplotlib).")] = None,
    overwrite: C.OverwriteOpt = False,
    json_out: C.JsonOpt = None,
) -> None:
    """Say what PATH is: model and family, provenance, calibration data, per-block widths, params and FLOPs, how to reload it.

    A file corp did not write, or a damaged one, is one line and exit code 1.
    """
    from corp_cli.artifacts import check_out_file
    from corp_cli.inspection import describe

    if plot is not None:
        from corp_cli import report_plot

        if not report_plot.available():
            raise InputError(f"--plot needs matplotlib, which is not installed; {report_plot.HINT}")
        check_out_file(plot, overwrite=overwrite)
    info = describe(path)
    if plot is not None:
        report_plot.write(info["blocks"], plot, info["summary"])
        info["plot"] = str(plot)
    if C.write_json(json_out, info):
        return
    _print(info)


def _print(info: dict[str, Any]) -> None:
    say = lambda text: C.out.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"{info['path']}: {info['summary']}")
    m = info["model"]
    args = ", ".join(f"{k}={v}" for k, v in sorted((m.get("model_args") or {}).items()))
    say(f"  model     {m['name']} ({m['checkpoint']}, {m['num_classes']} classes{', ' + args if args else ''}), "
        f"family {info['family'] or 'unknown here'}")
    say(f"  written   by corp {info['tool_version'] or '?'}" + (f"; options {_options(info['options'])}" if info["options"] else ""))
    d = info["data"]
    if d["samples"] is not None or d["spec"] is not None:
        synth = " [SYNTHETIC]" if d["synthetic"] and d["spec"] != "synthetic" else ""
        say(f"  data      {d['spec']}{synth}: {d['samples']} samples ({d['tokens']} tokens), seed {d['seed']}, "
            f"fingerprint {d['fingerprint']}")
    if d["stats_fingerprint"]:
        say(f"  stats     {d['stats_fingerprint']}")
    t = info["totals"]
    if t:
        say(f"  size      params {_count(t['params_before'])} -> {_count(t['params_after'])}{_pct(t['params_ratio'])}, "
            f"FLOPs {_gflops(t['flops_before'])} -> {_gflops(t['flops_after'])}{_pct(t['flops_ratio'])} per item")
    _print_blocks(info["blocks"])
    r = info["reload"]
    for key, label in (("python", "reload"), ("stock", "stock"), ("cli", "cli")):
        if r.get(key):
            say(f"  {label:<9} {r[key]}")
    if info.get("plot"):
        say(f"  plot      {info['plot']}")


def _print_blocks(blocks: list[dict[str, Any]]) -> None:
    if not blocks:
        return
    parts = [p for p in _PART_NAMES if any(p in b and b[p][0] != b[p][1] for b in blocks)]
    errs = [p for p in ("mlp", "qk", "vo") if any(p in b.get("predicted_error", {}) for b in blocks)]
    if not parts and not errs:
        b0 = blocks[0]
        widths = ", ".join(f"{_PART_NAMES[p]} {b0[p][1]}" for p in _PART_NAMES if p in b0)
        same = all({p: b[p] for p in _PART_NAMES if p in b} == {p: b0[p] for p in _PART_NAMES if p in b0} for b in blocks)
        C.out.print(f"  widths    {len(blocks)} blocks, " + (f"each {widths}" if same else "dense (see --json)"),
                    markup=False, highlight=False)
        return
    table = Table(box=None, pad_edge=False, padding=(0, 1))
    table.add_column("  block", justify="right")
    for p in parts:
        table.add_column(f"{_PART_NAMES[p]} kept", justify="right")
    for p in errs:
        table.add_column(f"err {_PART_NAMES[p]}", justify="right")
    rows: list[tuple[list[int], list[str]]] = []  # (blocks, cells): runs of equal widths share a row when no errors differ
    for b in blocks:
        cells = [f"{b[p][0]}/{b[p][1] if b[p][1] is not None else '?'}" if p in b else "-" for p in parts]
        e = b.get("predicted_error", {})
        cells += [f"{e[p]:.3g}" if p in e else "-" for p in errs]
        if rows and not errs and rows[-1][1] == cells and rows[-1][0][-1] == b["block"] - 1:
            rows[-1][0].append(b["block"])
        else:
            rows.append(([b["block"]], cells))
    for ids, cells in rows:
        table.add_row(f"  {ids[0]}" + (f"-{ids[-1]}" if len(ids) > 1 else ""), *cells)
    C.out.print(table)


def _options(opts: dict[str, Any]) -> str:
    shown = {k: v for k, v in sorted(opts.items()) if v not in (None, {}, [])}
    return " ".join(f"{k}={v}" for k, v in shown.items())


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


def _gflops(n: Any) -> str:
    return f"{n / 1e9:.3g}G" if isinstance(n, (int, float)) else "?"


def _pct(r: Any) -> str:
    return f" ({100 * r:.1f}%)" if isinstance(r, float) else ""

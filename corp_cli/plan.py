"""The pre-flight plan of a calibration: what it will hold in memory, how much, and whether that fits.

Every figure is computed from the model's shapes (a model on the meta device is enough):
the weights, the float64 sums, the held-back sums of the batch in flight, the hooks'
per-batch products, the forward's activations and the input batch. The activation and
product terms are estimates, checked against a measured peak in tests/test_plan.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corp_cli import engine
from corp_cli.errors import InputError
from corp_cli.family import ModelFamily

F64, F32, I64 = 8, 4, 8
# Activations alive at a block's peak, per token of the forward, in widths of the model dtype:
# the residual stream (input, norm, branch output, sum) and the attention's q/k/v and output
# (in units of the attention width). Fitted to measured peaks on CPU (tests/test_plan.py).
RESIDUAL_ROWS = 4.0
QKV_ROWS = 4.0
# What the allocator holds beyond the live tensors (fragmentation, thread buffers), as a fraction.
ALLOCATOR_SLACK = 0.05

# How to shrink each term, for the refusal line.
FIXES = {
    "weights": "another device (--device) or a smaller model",
    "sums": "fewer blocks at once (--blocks A-B), then `corp calibrate merge`",
    "batch sums": "fewer blocks at once (--blocks A-B)",
    "hook products": "a smaller --batch-size",
    "activations": "a smaller --batch-size (or --dtype bf16)",
    "input batch": "a smaller --batch-size",
}


def block_stats_bytes(dim_hidden: int, num_heads: int, head_dim: int, parts: tuple[str, ...], elem: int = F64,
                      kv_heads: int | None = None) -> int:
    """Bytes of one block's statistics: the MLP Gram (D^2), sum and |h| histogram; per head the q/k Grams
    (the k Grams per kv head under grouped-query attention)."""
    total = 0
    if "mlp" in parts:
        total += dim_hidden * dim_hidden * elem + dim_hidden * elem + dim_hidden * engine.HIST_BINS * I64 + I64
    if "attn" in parts:
        total += (num_heads + (kv_heads or num_heads)) * head_dim * head_dim * elem + num_heads * head_dim * F64 + I64
    return total


@dataclass
class CalibrationPlan:
    model: str
    family: str
    device: str
    batch_size: int
    samples: int | None
    parts: tuple[str, ...]
    blocks: list[int]
    tokens_per_item: int
    block_widths: list[dict[str, int]]
    stats_bytes: int
    terms: dict[str, int]
    available_bytes: int | None = None
    limit_source: str = ""
    notes: list[str] = field(default_factory=list)
    sequential: dict[str, Any] | None = None  # prune --sequential: its extra bytes and where they are kept
    flops: dict[str, int] = field(default_factory=dict)  # counted work of the whole run (unknown samples: empty)
    time: dict[str, Any] | None = None  # the estimate from `flops` at measured rates (dry runs only)

    @property
    def forward_passes(self) -> int | None:
        return None if self.samples is None else -(-self.samples // self.batch_size)

    @property
    def peak_bytes(self) -> int:
        return int(sum(self.terms.values()) * (1 + ALLOCATOR_SLACK))

    def largest(self) -> tuple[str, int]:
        name = max(self.terms, key=lambda k: self.terms[k])
        return name, self.terms[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "family": self.family, "device": self.device, "batch_size": self.batch_size,
            "samples": self.samples, "forward_passes": self.forward_passes, "parts": list(self.parts),
            "blocks": self.blocks, "tokens_per_item": self.tokens_per_item, "block_widths": self.block_widths,
            "stats_bytes": self.stats_bytes, "memory_bytes": dict(self.terms), "peak_bytes": self.peak_bytes,
            "available_bytes": self.available_bytes, "limit": self.limit_source,
            "fits": self.available_bytes is None or self.peak_bytes <= self.available_bytes, "notes": self.notes,
            "flops": dict(self.flops), **({"time": self.time} if self.time is not None else {}),
            **({"sequential": self.sequential} if self.sequential is not None else {}),
        }


def plan_calibration(
    fam: ModelFamily, model: nn.Module, *, name: str, device: torch.device, batch_size: int, samples: int | None,
    parts: tuple[str, ...], blocks: list[int] | None = None, product_dtype: torch.dtype = torch.float32,
    forward_dtype: torch.dtype | None = None, input_item_bytes: int = 0, tokens: int | None = None,
) -> CalibrationPlan:
    """The plan of a calibration pass of `model` (real or on the meta device).

    `tokens`: the tokens of one item when the run sets them (a causal LM's --seq-len), else the family's.
    """
    covered = blocks if blocks is not None else list(range(fam.num_blocks(model)))
    shapes = [fam.shape(model, i) for i in range(fam.num_blocks(model))]
    tokens = tokens or fam.tokens_per_item(model)
    rows = batch_size * tokens  # tokens in one forward
    p_elem = torch.empty((), dtype=product_dtype).element_size()
    param = next(iter(model.parameters()), None)
    f_elem = torch.empty((), dtype=forward_dtype or (param.dtype if param is not None else torch.float32)).element_size()
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    sums = sum(block_stats_bytes(shapes[i].mlp_hidden, shapes[i].num_heads, shapes[i].head_dim, parts,
                                 kv_heads=shapes[i].kv_heads) for i in covered)
    held = sum(block_stats_bytes(shapes[i].mlp_hidden, shapes[i].num_heads, shapes[i].head_dim, parts, p_elem,
                                 kv_heads=shapes[i].kv_heads) for i in covered)
    widest = max(shapes, key=lambda s: s.mlp_hidden)
    heads = max(s.num_heads * s.head_dim for s in shapes)
    dim = max(s.dim for s in shapes)
    d = widest.mlp_hidden
    copy = p_elem if p_elem != f_elem else 0  # products in another precision than the forward: a copy of h
    # Two moments of a block bound the peak: its MLP hook, with the residual stream, the hidden
    # units h and the hook's |h| (float32) and bin indices (int32) alive; and its attention, with
    # the fused q/k/v, its output, and the q/k hook's per-head copies and float64 squares.
    mlp_rows = f_elem * (RESIDUAL_ROWS * dim + d) + (F32 + 4 + copy) * d if "mlp" in parts else 0
    attn_rows = f_elem * (RESIDUAL_ROWS * dim + QKV_ROWS * heads) + (2 * p_elem + 2 * F64) * heads if "attn" in parts else 0
    activations = int(rows * max(mlp_rows, attn_rows))
    # the Gram product and its chunks, and the histogram's counts, at the widest MLP
    hook = int(1.5 * d * d * p_elem + 2 * d * engine.HIST_BINS * I64) if "mlp" in parts else 0
    terms = {
        "weights": int(weights),
        "sums": int(sums),
        "batch sums": int(held),
        "hook products": int(hook),
        "activations": activations,
        "input batch": int(batch_size * input_item_bytes),
    }
    flops: dict[str, int] = {}
    if samples is not None:
        from corp_cli.flops import model_counts

        flops = {"forward": int(model_counts(model, tokens, fam)["flops"]) * samples,
                 **stats_flops(shapes, covered, tuple(parts), samples * tokens)}
    return CalibrationPlan(
        flops=flops, model=name, family=fam.name, device=str(device), batch_size=batch_size, samples=samples, parts=tuple(parts),
        blocks=covered, tokens_per_item=tokens,
        block_widths=[{"mlp_hidden": s.mlp_hidden, "num_heads": s.num_heads, "head_dim": s.head_dim} for s in shapes],
        stats_bytes=int(sums), terms=terms,
    )


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Free memory on the device: CUDA's free bytes, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free memory on {device}"
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None, ""
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    return (int(m.group(1)) * 1024, "available host memory") if m else (None, "")


def parse_bytes(text: str) -> int:
    """8G, 512M, 2.5GiB, 1000000 -> bytes (K/M/G/T are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise InputError(f"--max-memory must look like 8G, 512M or a number of bytes, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def check_fits(plan: CalibrationPlan, max_memory: int | None) -> None:
    """Refuse (exit 2) a run whose expected peak exceeds the limit, naming the largest term and its fix."""
    if max_memory is not None:
        plan.available_bytes, plan.limit_source = max_memory, "--max-memory"
    elif plan.available_bytes is None:
        plan.available_bytes, plan.limit_source = available_memory(torch.device(plan.device))
    if plan.available_bytes is None or plan.peak_bytes <= plan.available_bytes:
        return
    name, size = plan.largest()
    raise InputError(
        f"calibrating {plan.model} needs about {human(plan.peak_bytes)} on {plan.device} but {plan.limit_source} is "
        f"{human(plan.available_bytes)}; the largest part is {name} ({human(size)}): use {FIXES[name]}"
    )


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f}"


def cpu_count() -> int:
    return os.cpu_count() or 1


def stats_flops(shapes: list[Any], blocks: list[int], parts: tuple[str, ...], tokens: int) -> dict[str, int]:
    """FLOPs of accumulating the statistics over `tokens` calibration tokens (2 per multiply-accumulate):
    the MLP Gram is D^2 per token; the q/k Grams head_dim^2 per token for each query head and each kv head."""
    mlp = sum(2 * tokens * shapes[i].mlp_hidden ** 2 for i in blocks) if "mlp" in parts else 0
    attn = sum(2 * tokens * (shapes[i].num_heads + (shapes[i].kv_heads or shapes[i].num_heads))
               * shapes[i].head_dim ** 2 for i in blocks) if "attn" in parts else 0
    return {"mlp sums": mlp, "attn sums": attn}


# FLOPs of one symmetric eigendecomposition or SVD of an n x n matrix, with its vectors: the
# textbook ~9 n^3 of LAPACK's tridiagonal/bidiagonal reduction plus back-transformation.
DECOMPOSITION_FLOPS = 9


def ridge_solve_flops(width: int, kept: int, out: int) -> int:
    """FLOPs of one ridge compensation as pruning runs it (engine.ridge_compensation, mlp_predicted_error,
    fold_mlp_output) on a `width`-wide input keeping `kept`, folded into an `out` x width projection:
    the Cholesky of Sigma_SS (s^3/3), B = Sigma_PS (Sigma_SS + lam I)^-1 by two triangular solves (2 s^2 p),
    c (2 p s), the uncompensated and compensated error traces (2 out p^2 each, with B Sigma_SP and
    B Sigma_SS B^T: 2 p^2 s + 2 p s^2 + 2 p^2 s), the fold W_S + W_P B (2 out p s) and the output
    energy tr(W Sigma W^T) (2 out width^2). Elementwise work and the bias shift are left out."""
    s, p = kept, width - kept
    energy = 2 * out * width * width
    if p == 0:
        return energy
    return (s ** 3 // 3 + 2 * s * s * p + 2 * p * s + 2 * out * p * p
            + 2 * p * p * s + 2 * p * s * s + 2 * p * p * s + 2 * out * p * p + 2 * out * p * s + energy)


def qk_solve_flops(head_dim: int, kept: int, heads: int, dim: int, *, rotary: bool) -> int:
    """FLOPs of the Q/K logit solves of `heads` query heads keeping `kept` of `head_dim` dims each.

    Rotary (engine.rotary_mix_compensation, every query dim mixed into the kept ones): the system is a
    Kronecker product, so one eigendecomposition of G_Q (head_dim^3) per head, then per solve (the
    first and engine.ROTARY_REWEIGHT_ROUNDS re-solves at most) one of the (kept x kept) key block and
    the four products with both bases (4 head_dim kept (head_dim + kept)); forming the rotated means
    and the per-offset errors (O(offsets * pairs^2)) are left out. Otherwise (engine.qk_compensation, fold_qk):
    two eigendecompositions and the balanced fold's SVD, C_Q C_K (2 s^2 p), the two rotations each way
    (8 s^3), the error's quadratic form (6 s^3), and the fold into W_Q and W_K rows (4 s^2 dim)."""
    s, p = kept, head_dim - kept
    if rotary:
        solves = engine.ROTARY_REWEIGHT_ROUNDS + 1
        return heads * (DECOMPOSITION_FLOPS * head_dim ** 3
                        + solves * (DECOMPOSITION_FLOPS * s ** 3 + 4 * head_dim * s * (head_dim + s)))
    return heads * (3 * DECOMPOSITION_FLOPS * s ** 3 + 2 * s * s * p + 8 * s ** 3 + 6 * s ** 3 + 4 * s * s * dim)


def prune_solve_flops(shapes: list[Any], blocks: list[int], widths: list[dict[str, int]],
                      rotary: list[bool]) -> int:
    """FLOPs of a prune's solves (float64), from the widths its sparsities imply per block
    (pruning.keep_counts: mlp units, kv heads, query heads per group, qk and vo dims kept).

    The MLP ridge on its kept units; with heads or V/O dims cut, the Q/K solve on the kept query heads
    and the ridge on the attention output o over the kept heads' kept value dims; with Q/K dims
    alone, the Q/K solve on every head."""
    total = 0
    for i in blocks:
        sh, w = shapes[i], widths[i]
        if "mlp" in w:
            total += ridge_solve_flops(sh.mlp_hidden, w["mlp"], sh.dim)
        kv = sh.kv_heads or sh.num_heads
        group = sh.num_heads // kv
        q_kept = w.get("heads", kv) * w.get("q_heads", group)
        cut = any(k in w for k in ("heads", "q_heads", "vo"))
        if "qk" in w:
            total += qk_solve_flops(sh.head_dim, w["qk"], q_kept if cut else sh.num_heads, sh.dim, rotary=rotary[i])
        if cut:
            total += ridge_solve_flops(sh.num_heads * sh.head_dim, q_kept * w.get("vo", sh.head_dim), sh.dim)
    return total


def planned_solve_flops(fam: Any, model: nn.Module, opts: Any) -> int:
    """prune_solve_flops at the widths `opts`' sparsities give every block of `model` (pruning.keep_counts)."""
    from corp_cli.pruning import keep_counts

    n = fam.num_blocks(model)
    shapes = [fam.shape(model, i) for i in range(n)]
    rotary = [fam.rotary_pairs(model, i) is not None for i in range(n)]
    widths = [keep_counts(opts.for_block(i), shapes[i], pairs=rotary[i]) for i in range(n)]
    return prune_solve_flops(shapes, list(range(n)), widths, rotary)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 512, repeats: int = 4) -> float:
    """FLOP/s of a square matmul in `dtype` on `device`, timed over a fraction of a second."""
    import time

    a = torch.randn(n, n, device=device).to(dtype)
    b = a @ a  # the first call pays for setup
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        b = a @ a
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del b
    return 2 * n ** 3 * repeats / max(time.perf_counter() - t0, 1e-9)


def estimate_time(flops: dict[str, int], forward_rate: float, float64_rate: float) -> dict[str, Any]:
    """Seconds of the counted work: the forward at the forward dtype's rate, the float64 sums and solves at
    float64's. Flops without a "solves" term (a calibration, a budgeted prune) leave the solves out, and say so."""
    forward = flops.get("forward", 0) / forward_rate
    sums = sum(v for k, v in flops.items() if k not in ("forward", "solves")) / float64_rate
    solves = flops.get("solves", 0) / float64_rate
    skipped = "" if "solves" in flops else "the solves, "
    return {"forward_rate": forward_rate, "float64_rate": float64_rate, "forward_seconds": forward,
            "sums_seconds": sums, "solves_seconds": solves, "seconds": forward + sums + solves,
            "excluded": f"{skipped}elementwise work, data loading and --sequential's extra passes"}

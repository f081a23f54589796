"""Wall-clock speed and memory of a model's forward pass, measured the same way for every model.

Latency is one forward pass of a batch under `torch.inference_mode`, timed after warm-up
with the device synchronised before and after each pass; median and p90 over the timed
runs. Peak memory is the *extra* memory the forward passes need beyond what is resident
before them (weights and the input batch), measured as:

- CUDA: `torch.cuda.max_memory_allocated` minus `memory_allocated` before the passes
  (live tensors of PyTorch's caching allocator; no allocator slack, no CUDA context);
- CPU: the process's peak resident set size (`VmHWM`, reset through
  /proc/self/clear_refs) minus its resident size before the passes. Where the peak cannot
  be reset (not Linux), the `ru_maxrss` high-water mark is used instead, which only
  shows growth beyond the process's earlier peak, so it can read 0.
"""

from __future__ import annotations

import logging
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from corp_cli.errors import InputError
from corp_cli.family import Batch, Loaded
from corp_cli.flops import kv_cache_bytes, model_counts

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BATCH_SIZES = {"cpu": (1, 8), "cuda": (1, 32, 256)}
# Tensor-core GEMMs want every matmul dimension to be a multiple of this (fp16/bf16).
CUDA_ALIGN = 8


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise InputError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


def parse_dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {text!r}")
    return DTYPES[text]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def misaligned_widths(loaded: Loaded, align: int = CUDA_ALIGN) -> list[str]:
    """Pruned widths that are not multiples of `align` (slow GEMM shapes on CUDA)."""
    fam, model = loaded.family, loaded.model
    bad = []
    for i in range(fam.num_blocks(model)):
        s = fam.shape(model, i)
        if s.mlp_hidden % align:
            bad.append(f"block {i} MLP hidden {s.mlp_hidden}")
        if s.qk_dim % align:
            bad.append(f"block {i} Q/K dim {s.qk_dim}")
        if s.v_dim % align:
            bad.append(f"block {i} V/O dim {s.v_dim}")
    return bad


# ---- memory probes


class _CpuPeak:
    _STATUS = Path("/proc/self/status")
    _CLEAR = Path("/proc/self/clear_refs")

    def __init__(self) -> None:
        self.method = "vmhwm" if self._can_reset() else "ru_maxrss"
        self.before = 0

    def _can_reset(self) -> bool:
        try:
            self._CLEAR.write_text("5")
            return self._kib("VmHWM") is not None
        except OSError:
            return False

    def _kib(self, field: str) -> int | None:
        try:
            m = re.search(rf"^{field}:\s+(\d+) kB", self._STATUS.read_text(), re.M)
        except OSError:
            return None
        return int(m.group(1)) if m else None

    @staticmethod
    def _maxrss_bytes() -> int:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux

    def start(self) -> None:
        if self.method == "vmhwm":
            self._CLEAR.write_text("5")  # peak := current
            self.before = (self._kib("VmRSS") or 0) * 1024
        else:
            self.before = self._maxrss_bytes()

    def stop(self) -> int:
        peak = (self._kib("VmHWM") or 0) * 1024 if self.method == "vmhwm" else self._maxrss_bytes()
        return max(0, peak - self.before)


class _CudaPeak:
    method = "cuda_max_memory_allocated"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.before = torch.cuda.memory_allocated(self.device)

    def stop(self) -> int:
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self.before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    warmup: int = 3
    runs: int = 10
    compile: bool = False


def prepare(loaded: Loaded, cfg: BenchConfig) -> Loaded:
    """The model as it will be timed: on the device, in the dtype, compiled if asked."""
    model = loaded.model.to(device=cfg.device, dtype=cfg.dtype).eval()
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return replace(loaded, model=model)


def parse_seq_lens(text: str) -> tuple[int, ...]:
    try:
        lens = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--seq-lens must be comma-separated integers, got {text!r}") from None
    if not lens or any(n < 2 for n in lens):
        raise InputError(f"--seq-lens must be integers >= 2, got {text!r}")
    return lens


def time_forward(loaded: Loaded, batch_size: int, cfg: BenchConfig, on_run: Callable[[], None] | None = None) -> dict[str, Any]:
    """Latency (ms), throughput (items/s: images or sequences) and extra peak memory of one batch size.

    Text models run at their preprocessing's max_length (a causal LM's --seq-len): the row says
    so, with the token rate (a language model's prefill tokens/s).
    """
    batch: Batch = loaded.family.example_batch(loaded, batch_size, dtype=cfg.dtype, device=cfg.device)
    fam, model = loaded.family, loaded.model

    def run() -> Any:
        return fam.forward(model, batch)

    probe: _CpuPeak | _CudaPeak = _CudaPeak(cfg.device) if cfg.device.type == "cuda" else _CpuPeak()
    times: list[float] = []
    with torch.inference_mode():
        probe.start()
        for _ in range(cfg.warmup):  # first passes pay for kernel selection / compilation
            run()
            if on_run:
                on_run()
        _sync(cfg.device)
        for _ in range(cfg.runs):
            _sync(cfg.device)
            t = time.perf_counter()
            run()
            _sync(cfg.device)
            times.append(time.perf_counter() - t)
            if on_run:
                on_run()
        peak = probe.stop()
    median = statistics.median(times)
    row = {
        "batch_size": batch_size,
        "latency_ms_median": 1e3 * median,
        "latency_ms_p90": 1e3 * percentile(times, 90),
        "latency_ms_min": 1e3 * min(times),
        "throughput_items_per_s": batch_size / median,
        "peak_memory_bytes": peak,
        "peak_memory_method": probe.method,
    }
    ids = batch.get("input_ids")
    if ids is not None:
        row.update({"seq_len": int(ids.shape[1]), "tokens_per_s": ids.numel() / median})
    return row


def time_decode(loaded: Loaded, batch_size: int, cfg: BenchConfig, prompt_tokens: int, new_tokens: int,
                on_run: Callable[[], None] | None = None) -> dict[str, Any]:
    """Decode speed with the KV cache: greedy generation of `new_tokens` after a `prompt_tokens` prompt.

    generate(new_tokens) and generate(1) are timed alike (alternating, after warm-up); their
    median difference is the time of the new_tokens - 1 cached decode steps, so the prompt's
    prefill is not counted in decode tokens/s.
    """
    fam = loaded.family
    at = fam.with_seq_len(loaded, prompt_tokens)
    batch = fam.example_batch(at, batch_size, dtype=cfg.dtype, device=cfg.device)
    times: dict[int, list[float]] = {1: [], new_tokens: []}
    with torch.inference_mode():
        for _ in range(cfg.warmup):
            fam.generate(loaded, batch, new_tokens)
            if on_run:
                on_run()
        for _ in range(cfg.runs):
            for n in (1, new_tokens):
                _sync(cfg.device)
                t = time.perf_counter()
                out = fam.generate(loaded, batch, n)
                _sync(cfg.device)
                times[n].append(time.perf_counter() - t)
                if int(out.shape[1]) != prompt_tokens + n:
                    raise RuntimeError(f"generate returned {int(out.shape[1]) - prompt_tokens} new tokens, not {n}")
            if on_run:
                on_run()
    first, full = statistics.median(times[1]), statistics.median(times[new_tokens])
    decode = max(full - first, 1e-9)
    return {
        "batch_size": batch_size,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "generate_ms_median": 1e3 * full,
        "first_token_ms_median": 1e3 * first,
        "ms_per_decode_step": 1e3 * decode / (new_tokens - 1),
        "decode_tokens_per_s": batch_size * (new_tokens - 1) / decode,
    }


def static_figures(loaded: Loaded, dtype: torch.dtype) -> dict[str, Any]:
    fam, model = loaded.family, loaded.model
    counts = model_counts(model, family=fam)
    params = counts["params"]
    size = torch.empty((), dtype=dtype).element_size()
    out = {
        "params": params,
        "param_bytes": params * size,
        "flops_per_item": counts["flops"],
        "tokens": counts["tokens"],
        "per_block_flops": [b["total"] for b in counts["per_block"]],
    }
    if fam.caches_keys_values:  # what each generated (or prompt) token adds to the KV cache, in the timed dtype
        out["kv_bytes_per_token"] = kv_cache_bytes([fam.shape(model, i) for i in range(fam.num_blocks(model))], size)
    return out


def compare(model_rows: list[dict[str, Any]], ref_rows: list[dict[str, Any]], flops: int, ref_flops: int) -> list[dict[str, Any]]:
    """Measured speed-up next to the FLOP reduction, per batch size."""
    out = []
    for m, r in zip(model_rows, ref_rows):
        out.append({
            "batch_size": m["batch_size"],
            **({"seq_len": m["seq_len"]} if "seq_len" in m else {}),
            "speedup_median": r["latency_ms_median"] / m["latency_ms_median"],
            "throughput_ratio": m["throughput_items_per_s"] / r["throughput_items_per_s"],
            "flop_reduction": 1.0 - flops / ref_flops,
            "flop_speedup_bound": ref_flops / flops,  # what the FLOPs alone would predict
        })
    return out

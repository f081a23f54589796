"""Every default a user can see, in one place, importable without torch (the CLI's --help reads it)."""

from __future__ import annotations

# prune
TARGET = "both"
MLP_SPARSITY = 0.5
ATTN_SPARSITY = 0.5
VO_SPARSITY = 0.5
HEAD_SPARSITY = 0.5
RANKER = "energy"
QK_RANKER = "energy"
VO_RANKER = "energy"
HEAD_RANKER = "error"
ROUND_TO = 8  # MLP survivor counts: multiples of 8 run on fast GEMM tiles (docs/round-to.md); --round-to 1 for exact fractions
MIN_KEEP = 1
MIN_QK_DIM = 1
QK_FOLD = "balanced"
TARGETS = ("mlp", "attn", "both")  # the named targets of corp before per-part sets; still how those sets are written
TARGET_PARTS = ("mlp", "qk", "vo", "heads")  # --target is a comma set of these
TARGET_ALIASES = {"attn": ("qk",), "both": ("mlp", "qk"), "all": ("mlp", "qk", "vo")}
MLP_RANKERS = ("energy", "active-energy", "magnitude", "obs", "obs-greedy")
QK_RANKERS = ("energy", "joint", "magnitude")
VO_RANKERS = ("energy", "obs")
HEAD_RANKERS = ("error", "greedy", "energy")

# calibration
CALIB_DATA = {"image": "hf:timm/mini-imagenet@validation", "text": "text:pydoc@calib"}
CALIB_SAMPLES = 512
CALIB_BATCH_SIZE = 32
PARTS = ("mlp", "attn")  # gathered by default
STATS_PARTS = ("mlp", "attn", "vo")  # what --parts may name
PRECISION = "float32"

# evaluation and the rest
EVAL_BATCH_SIZE = 64
DEVICE = "auto"
SEED = 0
SWEEP_SPARSITIES = "0.1,0.2,...,0.7"
SWEEP_FLOPS_BUDGETS = "0.9,0.8,0.7,0.6,0.5"
SWEEP_CACHE_MB = 1024
BENCH_WARMUP = 3
BENCH_RUNS = 10
BENCH_BATCH_SIZES = {"cpu": (1, 8), "cuda": (1, 32, 256)}
BENCH_NEW_TOKENS = 32  # causal LMs: tokens generated per sequence when timing decoding
BENCH_PROMPT_TOKENS = 128  # causal LMs: prompt length of the decode timing (at most the first --seq-lens value)
EXPORT_FORMAT = "torch-export"


def workers() -> int:
    """Image decoding worker processes: up to 4, never more than the CPUs."""
    import os

    return min(4, os.cpu_count() or 1)

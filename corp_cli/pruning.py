"""Pruning: choose what each block keeps (masks), solve the compensation, install narrower blocks.

The math is in engine.py and the module surgery in each model family; this module walks
the blocks, calls the engine (one MLP solve path, one Q/K solve path for every family),
and hands the folded weights to the family. Options have a single source of truth: PruneOptions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from corp_cli import defaults as D
from corp_cli import engine
from corp_cli.errors import InputError, NumericalError, UnsupportedModelError
from corp_cli.family import MlpWeights, ModelFamily
from corp_cli.registry import family_of
from corp_cli.stats import Statistics

log = logging.getLogger(__name__)

Target = Literal["mlp", "attn", "both"]
MLP_RANKERS = D.MLP_RANKERS
QK_RANKERS = D.QK_RANKERS
# Options a per-block override (YAML `blocks:` entries) may set.
BLOCK_OVERRIDABLE = ("mlp_sparsity", "attn_sparsity", "ranker", "qk_ranker", "min_keep", "min_qk_dim", "round_to")


@dataclass(frozen=True)
class PruneOptions:
    target: Target = D.TARGET  # type: ignore[assignment]
    mlp_sparsity: float = D.MLP_SPARSITY
    attn_sparsity: float = D.ATTN_SPARSITY
    ranker: str = D.RANKER
    qk_ranker: str = D.QK_RANKER
    lam: float | None = None  # None: automatic (OAS-style for the MLP, relative floor for Q/K)
    compensation: bool = True
    round_to: int = D.ROUND_TO
    min_keep: int = D.MIN_KEEP
    min_qk_dim: int = D.MIN_QK_DIM
    qk_balanced: bool = D.QK_FOLD == "balanced"
    block_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target not in D.TARGETS:
            raise InputError(f"--target must be mlp, attn or both, not {self.target!r}")
        for name in ("mlp_sparsity", "attn_sparsity"):
            _check_sparsity(name, getattr(self, name))
        if self.ranker not in MLP_RANKERS:
            raise InputError(f"--ranker must be one of {', '.join(MLP_RANKERS)}, not {self.ranker!r}")
        if self.qk_ranker not in QK_RANKERS:
            raise InputError(f"--qk-ranker must be one of {', '.join(QK_RANKERS)}, not {self.qk_ranker!r}")
        if self.lam is not None and not (self.lam >= 0.0 and self.lam < float("inf")):
            raise InputError(f"--lambda must be 'auto' or a finite number >= 0, not {self.lam}")
        for name in ("round_to", "min_keep", "min_qk_dim"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1")
        for blk, ov in self.block_overrides.items():
            unknown = set(ov) - set(BLOCK_OVERRIDABLE)
            if unknown:
                raise InputError(f"block {blk} override has unknown keys {sorted(unknown)}; allowed: {', '.join(BLOCK_OVERRIDABLE)}")

    @property
    def prune_mlp(self) -> bool:
        return self.target in ("mlp", "both")

    @property
    def prune_attn(self) -> bool:
        return self.target in ("attn", "both")

    def for_block(self, i: int) -> PruneOptions:
        ov = self.block_overrides.get(i)
        return replace(self, block_overrides={}, **ov) if ov else self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_overrides"] = {str(k): v for k, v in self.block_overrides.items()}
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PruneOptions:
        names = {f.name for f in fields(PruneOptions)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"unknown prune options {sorted(unknown)}")
        d = dict(d)
        d["block_overrides"] = {int(k): dict(v) for k, v in d.get("block_overrides", {}).items()}
        return PruneOptions(**d)


def _check_sparsity(name: str, v: float) -> None:
    if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
        raise InputError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")


@dataclass
class BlockMasks:
    mlp: Tensor | None = None  # kept hidden units, ascending
    attn: Tensor | None = None  # (H, ds) kept Q/K dims per head, ascending


def _mlp_lambda(opts: PruneOptions, m: engine.Moments, keep: Tensor) -> float:
    if opts.lam is not None:
        return opts.lam
    return engine.oas_lambda(m.cov[keep][:, keep], m.n)


def plan_masks(model: nn.Module, stats: Statistics, opts: PruneOptions, family: ModelFamily | None = None) -> list[BlockMasks]:
    """Which units/dims every block keeps, from the statistics and the chosen rankers."""
    fam = family or family_of(model)
    masks: list[BlockMasks] = []
    for i in range(fam.num_blocks(model)):
        o = opts.for_block(i)
        shape = fam.shape(model, i)
        bm = BlockMasks()
        if o.prune_mlp and o.mlp_sparsity > 0:
            why = fam.mlp_refusal(model, i)
            if why is not None:
                raise UnsupportedModelError(why)
            if o.min_keep > shape.mlp_hidden:
                raise InputError(f"block {i}: --min-keep {o.min_keep} exceeds its {shape.mlp_hidden} MLP units")
            keep_n = engine.keep_count(shape.mlp_hidden, o.mlp_sparsity, round_to=o.round_to, min_keep=o.min_keep)
            bm.mlp = _rank_mlp(fam.mlp_weights(model, i), stats.blocks[i]["mlp"], o, keep_n)
        if o.prune_attn and o.attn_sparsity > 0:
            why = fam.qk_refusal(model, i)
            if why is not None:
                raise UnsupportedModelError(why)
            if "attn" not in stats.blocks[i]:
                raise InputError("these statistics have no attention sums; recalibrate with attention statistics")
            if o.min_qk_dim > shape.head_dim:
                raise InputError(f"block {i}: --min-qk-dim {o.min_qk_dim} exceeds the head dim {shape.head_dim}")
            keep_n = engine.keep_count(shape.head_dim, o.attn_sparsity, min_keep=o.min_qk_dim)
            bm.attn = _rank_qk(fam, model, i, stats.blocks[i]["attn"], o, keep_n)
        masks.append(bm)
    return masks


def _rank_mlp(w: MlpWeights, st: dict[str, Tensor], o: PruneOptions, keep_n: int) -> Tensor:
    width = w.out_weight.shape[1]
    if o.ranker == "energy":
        scores = engine.energy_scores(st)
    elif o.ranker == "active-energy":
        scores = engine.active_energy_scores(st)
    elif o.ranker == "magnitude":
        # a gated unit has two input rows (gate and up); its input size is their product
        scores = engine.magnitude_scores(w.inputs[0], w.out_weight)
        for extra in w.inputs[1:]:
            scores = scores * extra.to(engine.ACC_DTYPE).norm(dim=1)
    else:
        m = engine.fit_moments(st, intercept=w.out_bias is not None)
        lam = _mlp_lambda(o, m, torch.arange(width))
        if o.ranker == "obs":
            # high score = costly to remove = keep
            scores = engine.obs_scores(w.out_weight, m.cov, lam)
        else:
            return engine.obs_greedy_keep(w.out_weight, m.cov, lam, keep_n).cpu()
    return engine.select_top(scores, keep_n).cpu()


def _rank_qk(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, Tensor], o: PruneOptions, keep_n: int) -> Tensor:
    if o.qk_ranker == "energy":
        scores = engine.qk_energy_scores(st)
    elif o.qk_ranker == "joint":
        scores = engine.qk_joint_scores(st)
    else:
        wq, _, wk, _ = fam.qk_weights(model, i)
        scores = engine.qk_magnitude_scores(wq, wk, fam.shape(model, i).num_heads)
    return engine.select_top_per_head(scores, keep_n).cpu()


def apply_masks(
    model: nn.Module,
    stats: Statistics,
    masks: list[BlockMasks],
    opts: PruneOptions,
    on_block: Callable[[int], None] | None = None,
    family: ModelFamily | None = None,
) -> list[dict[str, Any]]:
    """Compensate and compact every block in place; returns the per-block report entries."""
    fam = family or family_of(model)
    report: list[dict[str, Any]] = []
    with torch.no_grad():
        for i, bm in enumerate(masks):
            o = opts.for_block(i)
            entry: dict[str, Any] = {"block": i}
            if bm.mlp is not None:
                entry["mlp"] = _prune_mlp_block(fam, model, i, stats.blocks[i]["mlp"], bm.mlp, o)
            if bm.attn is not None:
                entry["attn"] = _prune_attn_block(fam, model, i, stats.blocks[i]["attn"], bm.attn, o,
                                                  stats.meta.get("forward_dtype"))
            report.append(entry)
            if on_block is not None:
                on_block(i)
    return report


def _prune_mlp_block(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, Tensor], keep: Tensor,
                     o: PruneOptions) -> dict[str, Any]:
    why = fam.mlp_refusal(model, i)
    if why is not None:
        raise UnsupportedModelError(why)
    w = fam.mlp_weights(model, i)
    w2 = w.out_weight
    width = w2.shape[1]
    dev = w2.device
    st = {k: v.to(dev) for k, v in st.items()}
    keep = keep.to(dev)
    prune = engine.complement(keep, width)
    # no bias to hold W2_P c: the fit has no intercept (engine.fit_moments)
    intercept = w.out_bias is not None
    m = engine.fit_moments(st, intercept=intercept)
    lam = _mlp_lambda(o, m, keep)
    try:
        sol = engine.ridge_compensation(m, keep, prune, lam) if prune.numel() else None
    except ArithmeticError as e:
        raise NumericalError(f"block {i} MLP: {e}") from None
    err_u = engine.mlp_predicted_error(w2, m, keep, prune, None)
    err_c = engine.mlp_predicted_error(w2, m, keep, prune, sol.b) if sol is not None else err_u
    w2n, b2n = engine.fold_mlp_output(w2, w.out_bias, keep, prune, sol if o.compensation else None)
    fam.narrow_mlp(model, i, keep, w2n, b2n)
    return {
        "width": width,
        "kept": int(keep.numel()),
        "removed": int(prune.numel()),
        "lambda": sol.lam if sol is not None else 0.0,
        "cond_estimate": sol.cond_estimate if sol is not None else 1.0,
        "compensated": bool(o.compensation),
        "intercept": intercept,
        "ranker": o.ranker,
        "predicted_error_compensated": err_c,
        "predicted_error_uncompensated": err_u,
        "output_energy": engine.weighted_trace(w2, m.second),
    }


def _prune_attn_block(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, Tensor], keep: Tensor,
                      o: PruneOptions, forward_dtype: str | None = None) -> dict[str, Any]:
    """The one Q/K path: solve the per-head logit compensation, let the family fold and install it."""
    why = fam.qk_refusal(model, i)
    if why is not None:
        raise UnsupportedModelError(why)
    shape = fam.shape(model, i)
    wq, _, _, _ = fam.qk_weights(model, i)
    dev = wq.device
    keep = keep.to(dev)
    prune = torch.stack([engine.complement(k, shape.head_dim) for k in keep])
    n = int(st["count"].sum())
    q2 = st["q_gram"].to(dev) / n
    k2 = st["k_gram"].to(dev) / n
    lam_rel = engine.qk_lambda_rel(getattr(torch, forward_dtype) if forward_dtype else None)
    sol = engine.qk_compensation(q2, k2, keep, prune, lam=o.lam, scale=fam.softmax_scale(model, i), compensate=True,
                                 lam_rel=lam_rel)
    m = sol.m if o.compensation else torch.zeros_like(sol.m)
    fam.narrow_qk(model, i, keep, m, balanced=o.qk_balanced)
    return {
        "head_dim": shape.head_dim,
        "qk_kept": int(keep.shape[1]),
        "qk_removed": int(prune.shape[1]),
        "compensated": bool(o.compensation),
        "qk_ranker": o.qk_ranker,
        "lambda_per_head": [float(x) for x in sol.lam],
        "predicted_logit_error_compensated": [float(x) for x in sol.err_compensated],
        "predicted_logit_error_uncompensated": [float(x) for x in sol.err_uncompensated],
    }


def supported_parts(fam: ModelFamily, model: nn.Module) -> tuple[str, ...]:
    """The statistics parts a model can be pruned by: the MLP always, attention where every block allows it."""
    attn = all(fam.qk_refusal(model, i) is None for i in range(fam.num_blocks(model)))
    return ("mlp", "attn") if attn else ("mlp",)


def default_target(fam: ModelFamily, model: nn.Module) -> str:
    return "both" if "attn" in supported_parts(fam, model) else "mlp"


def check_prunable(fam: ModelFamily, model: nn.Module, opts: PruneOptions) -> None:
    """Refuse, before any expensive work, a part the family cannot prune correctly in some block."""
    for i in range(fam.num_blocks(model)):
        o = opts.for_block(i)
        why = fam.mlp_refusal(model, i) if o.prune_mlp and o.mlp_sparsity > 0 else None
        why = why or (fam.qk_refusal(model, i) if o.prune_attn and o.attn_sparsity > 0 else None)
        if why is not None:
            raise UnsupportedModelError(why)


def planned_widths(fam: ModelFamily, model: nn.Module, opts: PruneOptions) -> list[dict[str, int]]:
    """What every block would keep under `opts` (from shapes alone): MLP units and Q/K dims per head."""
    out = []
    for i in range(fam.num_blocks(model)):
        o, s = opts.for_block(i), fam.shape(model, i)
        mlp = (engine.keep_count(s.mlp_hidden, o.mlp_sparsity, round_to=o.round_to, min_keep=o.min_keep)
               if o.prune_mlp and o.mlp_sparsity > 0 else s.mlp_hidden)
        qk = engine.keep_count(s.head_dim, o.attn_sparsity, min_keep=o.min_qk_dim) if o.prune_attn and o.attn_sparsity > 0 else s.qk_dim
        out.append({"block": i, "mlp_hidden": s.mlp_hidden, "mlp_kept": mlp, "head_dim": s.head_dim, "qk_kept": qk})
    return out

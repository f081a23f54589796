"""Pruning: choose what each block keeps (masks), solve the compensation, install narrower blocks.

The math is in engine.py and the module surgery in each model family; this module walks
the blocks, calls the engine (one MLP solve path, one Q/K solve path for every family; the
attention output, V/O dims and whole heads, is solved by the MLP's ridge on o), and hands
the folded weights to the family. Options have a single source of truth: PruneOptions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from corp_cli import defaults as D
from corp_cli import engine
from corp_cli.errors import InputError, NumericalError, UnsupportedModelError
from corp_cli.family import AttentionCut, BlockShape, MlpWeights, ModelFamily
from corp_cli.registry import family_of
from corp_cli.stats import Statistics, require_parts

log = logging.getLogger(__name__)

MLP_RANKERS = D.MLP_RANKERS
QK_RANKERS = D.QK_RANKERS
VO_RANKERS = D.VO_RANKERS
HEAD_RANKERS = D.HEAD_RANKERS
# Options a per-block override (YAML `blocks:` entries) may set.
BLOCK_OVERRIDABLE = ("mlp_sparsity", "attn_sparsity", "ranker", "qk_ranker", "min_keep", "min_qk_dim", "round_to",
                     "vo_sparsity", "head_sparsity", "vo_ranker", "head_ranker")
# The sparsity option of each target part.
PART_SPARSITY = {"mlp": "mlp_sparsity", "qk": "attn_sparsity", "vo": "vo_sparsity", "heads": "head_sparsity"}
# Fields added after the first named targets: recorded only where they mean something, so the
# records of runs that do not use them (masks, checkpoints, reports) stay as they were.
_PART_FIELDS = {"vo": ("vo_sparsity", "vo_ranker"), "heads": ("head_sparsity", "head_ranker")}


def parse_target(text: str) -> tuple[str, ...]:
    """The parts a --target names, in canonical order: a comma set of mlp, qk, vo, heads (or attn, both, all)."""
    if not isinstance(text, str):
        raise InputError(f"--target must be a comma list of {', '.join(D.TARGET_PARTS)}, not {text!r}")
    chosen: set[str] = set()
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name in D.TARGET_ALIASES:
            chosen.update(D.TARGET_ALIASES[name])
        elif name in D.TARGET_PARTS:
            chosen.add(name)
        else:
            names = []
            break
    if not names:
        raise InputError(f"--target must be a comma list of {', '.join(D.TARGET_PARTS)} "
                         f"(or attn = qk, both = mlp,qk, all = mlp,qk,vo), not {text!r}")
    return tuple(p for p in D.TARGET_PARTS if p in chosen)


def target_name(parts: tuple[str, ...]) -> str:
    """How a set of parts is recorded: the first named targets where they fit, else the comma list."""
    for name in D.TARGETS:
        if parts == (("mlp",) if name == "mlp" else D.TARGET_ALIASES[name]):
            return name
    return ",".join(parts)


@dataclass(frozen=True)
class PruneOptions:
    target: str = D.TARGET
    mlp_sparsity: float = D.MLP_SPARSITY
    attn_sparsity: float = D.ATTN_SPARSITY
    ranker: str = D.RANKER
    qk_ranker: str = D.QK_RANKER
    lam: float | None = None  # None: automatic (OAS-style for the MLP and V/O, relative floor for Q/K)
    compensation: bool = True
    round_to: int = D.ROUND_TO
    min_keep: int = D.MIN_KEEP
    min_qk_dim: int = D.MIN_QK_DIM
    qk_balanced: bool = D.QK_FOLD == "balanced"
    block_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)
    vo_sparsity: float = D.VO_SPARSITY
    head_sparsity: float = D.HEAD_SPARSITY
    vo_ranker: str = D.VO_RANKER
    head_ranker: str = D.HEAD_RANKER
    flops_budget: float | None = None  # keep at most this fraction of the dense FLOPs; widths chosen per block

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", target_name(parse_target(self.target)))
        for name in ("mlp_sparsity", "attn_sparsity", "vo_sparsity", "head_sparsity"):
            _check_sparsity(name, getattr(self, name))
        for name, allowed in (("ranker", MLP_RANKERS), ("qk_ranker", QK_RANKERS), ("vo_ranker", VO_RANKERS),
                              ("head_ranker", HEAD_RANKERS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.lam is not None and not (self.lam >= 0.0 and self.lam < float("inf")):
            raise InputError(f"--lambda must be 'auto' or a finite number >= 0, not {self.lam}")
        for name in ("round_to", "min_keep", "min_qk_dim"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1")
        if self.flops_budget is not None:
            f = self.flops_budget
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 < f < 1.0):
                raise InputError(f"--flops-budget must be a fraction of the dense FLOPs in (0, 1), got {f!r}")
            if self.block_overrides:
                raise InputError("--flops-budget chooses every block's widths; per-block overrides (--config blocks:) "
                                 "do not apply: drop one of them")
        for blk, ov in self.block_overrides.items():
            unknown = set(ov) - set(BLOCK_OVERRIDABLE)
            if unknown:
                raise InputError(f"block {blk} override has unknown keys {sorted(unknown)}; allowed: {', '.join(BLOCK_OVERRIDABLE)}")

    @property
    def parts(self) -> tuple[str, ...]:
        return parse_target(self.target)

    @property
    def prune_mlp(self) -> bool:
        return "mlp" in self.parts

    @property
    def prune_attn(self) -> bool:
        """Q/K dims (the part --target calls qk, and attn)."""
        return "qk" in self.parts

    @property
    def prune_vo(self) -> bool:
        return "vo" in self.parts

    @property
    def prune_heads(self) -> bool:
        return "heads" in self.parts

    def active(self, part: str) -> bool:
        """Whether `part` is pruned at all: in the target, and given a sparsity (or a FLOPs budget to share)."""
        return part in self.parts and (self.flops_budget is not None or getattr(self, PART_SPARSITY[part]) > 0)

    def for_block(self, i: int) -> PruneOptions:
        ov = self.block_overrides.get(i)
        return replace(self, block_overrides={}, **ov) if ov else self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_overrides"] = {str(k): v for k, v in self.block_overrides.items()}
        for part, names in _PART_FIELDS.items():
            if part not in self.parts:
                for n in names:
                    d.pop(n)
        if self.flops_budget is None:
            d.pop("flops_budget")
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
    attn: Tensor | None = None  # (Hk, ds) kept Q/K dims per kept head, ascending
    vo: Tensor | None = None  # (Hk, dv) kept value/output dims per kept head, ascending
    heads: Tensor | None = None  # (Hk,) kept heads, ascending (None: every head)


# Kept counts of one block by part ("mlp", "qk", "vo", "heads"); a part absent is not pruned there.
Widths = dict[str, int]


def _mlp_lambda(opts: PruneOptions, m: engine.Moments, keep: Tensor) -> float:
    if opts.lam is not None:
        return opts.lam
    return engine.oas_lambda(m.cov[keep][:, keep], m.n)


def keep_counts(o: PruneOptions, shape: BlockShape) -> Widths:
    """What one block keeps of each part its options prune, from the sparsities."""
    counts: Widths = {}
    if o.prune_mlp and o.mlp_sparsity > 0:
        counts["mlp"] = engine.keep_count(shape.mlp_hidden, o.mlp_sparsity, round_to=o.round_to, min_keep=o.min_keep)
    if o.prune_heads and o.head_sparsity > 0:
        counts["heads"] = engine.keep_count(shape.num_heads, o.head_sparsity)
    if o.prune_attn and o.attn_sparsity > 0:
        counts["qk"] = engine.keep_count(shape.head_dim, o.attn_sparsity, min_keep=o.min_qk_dim)
    if o.prune_vo and o.vo_sparsity > 0:
        counts["vo"] = engine.keep_count(shape.head_dim, o.vo_sparsity)
    return counts


def check_block(fam: ModelFamily, model: nn.Module, i: int, o: PruneOptions, parts: list[str] | tuple[str, ...],
                stats_parts: list[str] | None = None) -> None:
    """Refuse, for block i, a part the family cannot prune or the statistics cannot serve, and floors above the widths."""
    shape = fam.shape(model, i)
    why = None
    if "mlp" in parts:
        why = fam.mlp_refusal(model, i)
    if "qk" in parts:
        why = why or fam.qk_refusal(model, i)
    if "vo" in parts or "heads" in parts:
        why = why or fam.vo_refusal(model, i)
    if why is not None:
        raise UnsupportedModelError(why)
    if "mlp" in parts and o.min_keep > shape.mlp_hidden:
        raise InputError(f"block {i}: --min-keep {o.min_keep} exceeds its {shape.mlp_hidden} MLP units")
    if "qk" in parts and o.min_qk_dim > shape.head_dim:
        raise InputError(f"block {i}: --min-qk-dim {o.min_qk_dim} exceeds the head dim {shape.head_dim}")


def stats_parts_for(parts: list[str] | tuple[str, ...]) -> list[str]:
    """The statistics parts that pruning `parts` needs (Q/K: attn; V/O dims and heads: vo)."""
    need = {"mlp": "mlp", "qk": "attn", "vo": "vo", "heads": "vo"}
    return list(dict.fromkeys(need[p] for p in parts))


def plan_masks(model: nn.Module, stats: Statistics, opts: PruneOptions, family: ModelFamily | None = None,
               widths: list[Widths] | None = None) -> list[BlockMasks]:
    """Which units/dims every block keeps, from the statistics and the chosen rankers.

    `widths` (one dict per block, e.g. from a FLOPs-budget allocation) fixes the kept counts;
    otherwise they follow from the sparsities.
    """
    fam = family or family_of(model)
    masks: list[BlockMasks] = []
    for i in range(fam.num_blocks(model)):
        o = opts.for_block(i)
        counts = widths[i] if widths is not None else keep_counts(o, fam.shape(model, i))
        check_block(fam, model, i, o, list(counts))
        require_parts(stats, stats_parts_for(list(counts)))
        masks.append(plan_block(fam, model, i, stats.blocks[i], o, counts))
    return masks


def plan_block(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, dict[str, Tensor]], o: PruneOptions,
               counts: Widths) -> BlockMasks:
    """What block i keeps of each part in `counts`, ranked on its statistics `st` (by part)."""
    bm = BlockMasks()
    if "mlp" in counts:
        bm.mlp = _rank_mlp(fam.mlp_weights(model, i), st["mlp"], o, counts["mlp"])
    heads = None
    if "heads" in counts:
        order = head_order(fam, model, i, st["vo"], o)
        heads = bm.heads = torch.sort(order[: counts["heads"]]).values
    if "qk" in counts:
        kept = _rank_qk(fam, model, i, st["attn"], o, counts["qk"])
        bm.attn = kept if heads is None else kept[heads]
    if "vo" in counts:
        ranks = vo_dim_scores(fam, model, i, st["vo"], o)
        kept = engine.select_top_per_head(ranks, counts["vo"]).cpu()
        bm.vo = kept if heads is None else kept[heads]
    return bm


def head_order(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, Tensor], o: PruneOptions) -> Tensor:
    """Block i's heads, most important first, by --head-ranker (every prefix is a kept set)."""
    vw = fam.vo_weights(model, i)
    w, nh = vw.out_weight, fam.shape(model, i).num_heads
    m = engine.fit_moments({k: v.to(w.device) for k, v in st.items()}, intercept=vw.out_bias is not None)
    if o.head_ranker == "energy":
        return engine.ranking_order(engine.head_energy_scores(w, m.second, nh)).cpu()
    lam = _mlp_lambda(o, m, torch.arange(m.mean.shape[0], device=w.device))
    if o.head_ranker == "greedy":
        return engine.head_greedy_order(w, m.cov, lam, nh).cpu()
    return engine.ranking_order(engine.head_error_scores(w, m.cov, lam, nh)).cpu()


def vo_dim_scores(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, Tensor], o: PruneOptions) -> Tensor:
    """How much each value/output dim is worth keeping, (H, d), by --vo-ranker."""
    shape = fam.shape(model, i)
    if o.vo_ranker == "energy":
        scores = engine.energy_scores(st)
    else:
        vw = fam.vo_weights(model, i)
        w = vw.out_weight
        m = engine.fit_moments({k: v.to(w.device) for k, v in st.items()}, intercept=vw.out_bias is not None)
        lam = _mlp_lambda(o, m, torch.arange(m.mean.shape[0], device=w.device))
        scores = engine.obs_scores(w, m.cov, lam)
    return scores.reshape(shape.num_heads, shape.head_dim).cpu()


def mlp_scores(w: MlpWeights, st: dict[str, Tensor], o: PruneOptions) -> Tensor:
    """How much each MLP unit is worth keeping, by --ranker (obs-greedy: its one-unit obs score)."""
    width = w.out_weight.shape[1]
    if o.ranker == "energy":
        return engine.energy_scores(st)
    if o.ranker == "active-energy":
        return engine.active_energy_scores(st)
    if o.ranker == "magnitude":
        # a gated unit has two input rows (gate and up); its input size is their product
        scores = engine.magnitude_scores(w.inputs[0], w.out_weight)
        for extra in w.inputs[1:]:
            scores = scores * extra.to(engine.ACC_DTYPE).norm(dim=1)
        return scores
    m = engine.fit_moments(st, intercept=w.out_bias is not None)
    # high score = costly to remove = keep
    return engine.obs_scores(w.out_weight, m.cov, _mlp_lambda(o, m, torch.arange(width)))


def _rank_mlp(w: MlpWeights, st: dict[str, Tensor], o: PruneOptions, keep_n: int) -> Tensor:
    if o.ranker == "obs-greedy":
        m = engine.fit_moments(st, intercept=w.out_bias is not None)
        lam = _mlp_lambda(o, m, torch.arange(w.out_weight.shape[1]))
        return engine.obs_greedy_keep(w.out_weight, m.cov, lam, keep_n).cpu()
    return engine.select_top(mlp_scores(w, st, o), keep_n).cpu()


def qk_scores(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, Tensor], o: PruneOptions) -> Tensor:
    """How much each Q/K dim of each head is worth keeping, (H, d), by --qk-ranker."""
    if o.qk_ranker == "energy":
        return engine.qk_energy_scores(st)
    if o.qk_ranker == "joint":
        return engine.qk_joint_scores(st)
    wq, _, wk, _ = fam.qk_weights(model, i)
    return engine.qk_magnitude_scores(wq, wk, fam.shape(model, i).num_heads)


def _rank_qk(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, Tensor], o: PruneOptions, keep_n: int) -> Tensor:
    return engine.select_top_per_head(qk_scores(fam, model, i, st, o), keep_n).cpu()


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
            report.append(apply_block(fam, model, i, stats.blocks[i], bm, opts.for_block(i),
                                      stats.meta.get("forward_dtype"), where=stats.path))
            if on_block is not None:
                on_block(i)
    return report


def apply_block(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, dict[str, Tensor]], bm: BlockMasks,
                o: PruneOptions, forward_dtype: str | None = None, where: Any = None) -> dict[str, Any]:
    """Compensate and compact block i to `bm` from its statistics `st` (by part); its report entry.

    A part whose statistics carry a regression target (sequential calibration) is fit to it
    (engine.target_compensation, qk_target_compensation); otherwise the paper's solve.
    """
    entry: dict[str, Any] = {"block": i}
    with torch.no_grad():
        if bm.mlp is not None:
            entry["mlp"] = _prune_mlp_block(fam, model, i, st["mlp"], bm.mlp, o)
        if bm.vo is not None or bm.heads is not None:
            entry.update(_prune_attention_cut(fam, model, i, st, bm, o, forward_dtype, where))
        elif bm.attn is not None:
            entry["attn"] = _prune_attn_block(fam, model, i, st["attn"], bm.attn, o, forward_dtype)
    return entry


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
    if engine.has_target(st):
        w2n, b2n, fit = _target_fold(w2, w.out_bias, st, keep, prune, lam, intercept, o, f"block {i} MLP")
        fam.narrow_mlp(model, i, keep, w2n, b2n)
        return {"width": width, "kept": int(keep.numel()), "removed": int(prune.numel()), **fit,
                "intercept": intercept, "ranker": o.ranker, "output_energy": engine.weighted_trace(w2, m.second)}
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


def _target_fold(w: Tensor, bias: Tensor | None, st: dict[str, Tensor], keep: Tensor, prune: Tensor, lam: float,
                 intercept: bool, o: PruneOptions, where: str) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """The output projection over the kept features fit to the statistics' target; (W', b', report fields).

    --no-compensation keeps W_S and b (the target only enters the reported errors).
    """
    try:
        sol, blend, cv = engine.blended_target_compensation(st, w, bias, keep, lam, intercept=intercept)
    except ArithmeticError as e:
        raise NumericalError(f"{where}: {e}") from None
    if o.compensation:
        w_n, b_n = sol.weight.to(w.dtype), (sol.bias.to(w.dtype) if sol.bias is not None and bias is not None else bias)
    else:
        w_n, b_n = engine.fold_mlp_output(w, bias, keep, prune, None)
    return w_n, b_n, {
        "lambda": sol.lam, "cond_estimate": sol.cond_estimate, "compensated": bool(o.compensation),
        "fit": "target", "dense_blend": blend, **({"blend_cv_errors": cv} if cv else {}),
        "predicted_error_compensated": sol.err_compensated,
        "predicted_error_uncompensated": sol.err_uncompensated,
    }


def _qk_solve(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, Tensor], keep: Tensor, heads: Tensor | None,
              o: PruneOptions, forward_dtype: str | None) -> tuple[Tensor, Any]:
    """(pruned dims per head, the logit compensation) of the heads kept (all when None): the one Q/K solve."""
    d = fam.shape(model, i).head_dim
    prune = torch.stack([engine.complement(k, d) for k in keep])
    n = int(st["count"].sum())
    q2, k2 = st["q_gram"].to(keep.device) / n, st["k_gram"].to(keep.device) / n
    if heads is not None:
        q2, k2 = q2[heads], k2[heads]
    # a bf16/fp16 forward rounds the Grams: the ridge rises to that rounding level (method notes)
    lam_rel = engine.qk_lambda_rel(getattr(torch, forward_dtype) if forward_dtype else None)
    if engine.has_target(st):
        hs = heads if heads is not None else torch.arange(keep.shape[0], device=keep.device)
        sol, _ = engine.blended_qk_target_compensation({k: v.to(keep.device) for k, v in st.items()}, hs, keep,
                                                       lam=o.lam, scale=fam.softmax_scale(model, i), lam_rel=lam_rel)
        return prune, sol
    sol = engine.qk_compensation(q2, k2, keep, prune, lam=o.lam, scale=fam.softmax_scale(model, i), compensate=True,
                                 lam_rel=lam_rel)
    return prune, sol


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
    prune, sol = _qk_solve(fam, model, i, st, keep, None, o, forward_dtype)
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


def _prune_attention_cut(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, dict[str, Tensor]], bm: BlockMasks,
                         o: PruneOptions, forward_dtype: str | None, where: Any) -> dict[str, Any]:
    """Heads and V/O dims (and Q/K dims with them): the Q/K solve on the kept heads, the ridge on o, one install."""
    why = fam.vo_refusal(model, i) or (fam.qk_refusal(model, i) if bm.attn is not None else None)
    if why is not None:
        raise UnsupportedModelError(why)
    _require_block_parts(st, ["vo"] + (["attn"] if bm.attn is not None else []), where)
    shape = fam.shape(model, i)
    nh, d = shape.num_heads, shape.head_dim
    w = fam.vo_weights(model, i)
    dev = w.out_weight.device
    heads = (bm.heads if bm.heads is not None else torch.arange(nh)).to(dev)
    out: dict[str, Any] = {}
    qk_keep = qk_m = None
    if bm.attn is not None:
        qk_keep = bm.attn.to(dev)
        prune, sol = _qk_solve(fam, model, i, st["attn"], qk_keep, heads, o, forward_dtype)
        qk_m = sol.m if o.compensation else torch.zeros_like(sol.m)
        out["attn"] = {
            "head_dim": d,
            "qk_kept": int(qk_keep.shape[1]),
            "qk_removed": int(prune.shape[1]),
            "compensated": bool(o.compensation),
            "qk_ranker": o.qk_ranker,
            "heads": [int(h) for h in heads],
            "lambda_per_head": [float(x) for x in sol.lam],
            "predicted_logit_error_compensated": [float(x) for x in sol.err_compensated],
            "predicted_logit_error_uncompensated": [float(x) for x in sol.err_uncompensated],
        }
    v_keep = bm.vo.to(dev) if bm.vo is not None else None
    # as for the MLP: a projection without a bias takes an intercept-free fit
    vo_st = {k: v.to(dev) for k, v in st["vo"].items()}
    m = engine.fit_moments(vo_st, intercept=w.out_bias is not None)
    keep = engine.vo_kept_dims(heads, v_keep, d)
    prune = engine.complement(keep, nh * d)
    lam = _mlp_lambda(o, m, keep)
    fit: dict[str, Any] = {}
    if engine.has_target(vo_st):
        w_n, b_n, fit = _target_fold(w.out_weight, w.out_bias, vo_st, keep, prune, lam, w.out_bias is not None, o,
                                     f"block {i} attention output")
        sol_o, err_c, err_u = None, fit["predicted_error_compensated"], fit["predicted_error_uncompensated"]
    else:
        try:
            sol_o = engine.ridge_compensation(m, keep, prune, lam) if prune.numel() else None
        except ArithmeticError as e:
            raise NumericalError(f"block {i} attention output: {e}") from None
        err_u = engine.mlp_predicted_error(w.out_weight, m, keep, prune, None)
        err_c = engine.mlp_predicted_error(w.out_weight, m, keep, prune, sol_o.b) if sol_o is not None else err_u
        w_n, b_n = engine.fold_mlp_output(w.out_weight, w.out_bias, keep, prune, sol_o if o.compensation else None)
    fam.install_attention(model, i, AttentionCut(heads=heads, qk_keep=qk_keep, qk_m=qk_m, v_keep=v_keep,
                                                 out_weight=w_n, out_bias=b_n, balanced=o.qk_balanced))
    out["vo"] = {
        "width": nh * d,
        "kept": int(keep.numel()),
        "removed": int(prune.numel()),
        "num_heads": nh,
        "heads_kept": int(heads.numel()),
        "kept_heads": [int(h) for h in heads],
        "head_dim": d,
        "v_kept": int(v_keep.shape[1]) if v_keep is not None else d,
        "lambda": sol_o.lam if sol_o is not None else fit.get("lambda", 0.0),
        "cond_estimate": sol_o.cond_estimate if sol_o is not None else fit.get("cond_estimate", 1.0),
        **({"fit": "target"} if fit else {}),
        "compensated": bool(o.compensation),
        **({"vo_ranker": o.vo_ranker} if bm.vo is not None else {}),
        **({"head_ranker": o.head_ranker} if bm.heads is not None else {}),
        "predicted_error_compensated": err_c,
        "predicted_error_uncompensated": err_u,
        "output_energy": engine.weighted_trace(w.out_weight, m.second),
    }
    return out


def _require_block_parts(st: dict[str, dict[str, Tensor]], needed: list[str], where: Any) -> None:
    from corp_cli.errors import ArtifactError

    missing = [p for p in needed if p not in st]
    if missing:
        raise ArtifactError(f"statistics {where or '(in memory)'} lack the {', '.join(missing)} sums this pruning needs; "
                            f"recalibrate with --parts {','.join(dict.fromkeys([*st, *missing]))}")


def supported_parts(fam: ModelFamily, model: nn.Module) -> tuple[str, ...]:
    """The statistics parts gathered by default: the MLP always, attention where every block allows Q/K pruning."""
    attn = all(fam.qk_refusal(model, i) is None for i in range(fam.num_blocks(model)))
    return ("mlp", "attn") if attn else ("mlp",)


def default_target(fam: ModelFamily, model: nn.Module) -> str:
    return "both" if "attn" in supported_parts(fam, model) else "mlp"


def check_prunable(fam: ModelFamily, model: nn.Module, opts: PruneOptions) -> None:
    """Refuse, before any expensive work, a part the family cannot prune correctly in some block."""
    for i in range(fam.num_blocks(model)):
        o = opts.for_block(i)
        check_block(fam, model, i, o, [p for p in o.parts if o.active(p)])


def planned_widths(fam: ModelFamily, model: nn.Module, opts: PruneOptions) -> list[dict[str, int]]:
    """What every block would keep under `opts` (from shapes alone); [] under --flops-budget, whose widths
    the allocation chooses from the statistics."""
    if opts.flops_budget is not None:
        return []
    out = []
    for i in range(fam.num_blocks(model)):
        o, s = opts.for_block(i), fam.shape(model, i)
        k = keep_counts(o, s)
        out.append({"block": i, "mlp_hidden": s.mlp_hidden, "mlp_kept": k.get("mlp", s.mlp_hidden),
                    "head_dim": s.head_dim, "qk_kept": k.get("qk", s.qk_dim), "num_heads": s.num_heads,
                    "heads_kept": k.get("heads", s.num_heads), "v_kept": k.get("vo", s.v_dim)})
    return out

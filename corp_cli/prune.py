"""Pruning: choose what each block keeps (masks), solve the compensation, rebuild narrower blocks.

The math is in engine.py; this module only walks the blocks, calls it, and swaps in
the narrower modules. Options have a single source of truth: PruneOptions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from corp_cli import engine
from corp_cli.adapters import adapter_for
from corp_cli.compact import has_qk_norm, narrow_attention, narrow_mlp_linears
from corp_cli.errors import InputError, NumericalError
from corp_cli.stats import Statistics

log = logging.getLogger(__name__)

Target = Literal["mlp", "attn", "both"]
MLP_RANKERS = ("energy", "active-energy", "magnitude", "obs", "obs-greedy")
QK_RANKERS = ("energy", "joint", "magnitude")
# Options a per-block override (YAML `blocks:` entries) may set.
BLOCK_OVERRIDABLE = ("mlp_sparsity", "attn_sparsity", "ranker", "qk_ranker", "min_keep", "min_qk_dim", "round_to")


@dataclass(frozen=True)
class PruneOptions:
    target: Target = "both"
    mlp_sparsity: float = 0.5
    attn_sparsity: float = 0.5
    ranker: str = "energy"
    qk_ranker: str = "energy"
    lam: float | None = None  # None: automatic (OAS-style for the MLP, relative floor for Q/K)
    compensation: bool = True
    round_to: int = 1
    min_keep: int = 1
    min_qk_dim: int = 1
    qk_balanced: bool = True
    block_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target not in ("mlp", "attn", "both"):
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


def plan_masks(model: nn.Module, stats: Statistics, opts: PruneOptions) -> list[BlockMasks]:
    """Which units/dims every block keeps, from the statistics and the chosen rankers."""
    ad = adapter_for(model)
    masks: list[BlockMasks] = []
    for i in range(len(ad.blocks)):
        o = opts.for_block(i)
        shape = ad.shape(i)
        bm = BlockMasks()
        if o.prune_mlp and o.mlp_sparsity > 0:
            if o.min_keep > shape.mlp_hidden:
                raise InputError(f"block {i}: --min-keep {o.min_keep} exceeds its {shape.mlp_hidden} MLP units")
            keep_n = engine.keep_count(shape.mlp_hidden, o.mlp_sparsity, round_to=o.round_to, min_keep=o.min_keep)
            bm.mlp = _rank_mlp(ad, i, stats.blocks[i]["mlp"], o, keep_n)
        if o.prune_attn and o.attn_sparsity > 0:
            ad.check_attn_prunable(i)
            if "attn" not in stats.blocks[i]:
                raise InputError("these statistics have no attention sums; recalibrate with attention statistics")
            if o.min_qk_dim > shape.head_dim:
                raise InputError(f"block {i}: --min-qk-dim {o.min_qk_dim} exceeds the head dim {shape.head_dim}")
            keep_n = engine.keep_count(shape.head_dim, o.attn_sparsity, min_keep=o.min_qk_dim)
            bm.attn = _rank_qk(ad, i, stats.blocks[i]["attn"], o, keep_n)
        masks.append(bm)
    return masks


def _rank_mlp(ad: Any, i: int, st: dict[str, Tensor], o: PruneOptions, keep_n: int) -> Tensor:
    fc1, fc2 = ad.mlp_linears(i)
    width = fc1.out_features
    if o.ranker == "energy":
        scores = engine.energy_scores(st)
    elif o.ranker == "active-energy":
        scores = engine.active_energy_scores(st)
    elif o.ranker == "magnitude":
        scores = engine.magnitude_scores(fc1.weight.detach(), fc2.weight.detach())
    else:
        m = engine.mlp_moments(st)
        lam = _mlp_lambda(o, m, torch.arange(width))
        if o.ranker == "obs":
            # high score = costly to remove = keep
            scores = engine.obs_scores(fc2.weight.detach(), m.cov, lam)
        else:
            return engine.obs_greedy_keep(fc2.weight.detach(), m.cov, lam, keep_n).cpu()
    return engine.select_top(scores, keep_n).cpu()


def _rank_qk(ad: Any, i: int, st: dict[str, Tensor], o: PruneOptions, keep_n: int) -> Tensor:
    if o.qk_ranker == "energy":
        scores = engine.qk_energy_scores(st)
    elif o.qk_ranker == "joint":
        scores = engine.qk_joint_scores(st)
    else:
        wq, _, wk, _ = ad.qk_weights(i)
        scores = engine.qk_magnitude_scores(wq.detach(), wk.detach(), ad.shape(i).num_heads)
    return engine.select_top_per_head(scores, keep_n).cpu()


def apply_masks(
    model: nn.Module,
    stats: Statistics,
    masks: list[BlockMasks],
    opts: PruneOptions,
    on_block: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Compensate and compact every block in place; returns the per-block report entries."""
    ad = adapter_for(model)
    report: list[dict[str, Any]] = []
    with torch.no_grad():
        for i, bm in enumerate(masks):
            o = opts.for_block(i)
            entry: dict[str, Any] = {"block": i}
            if bm.mlp is not None:
                entry["mlp"] = _prune_mlp_block(ad, i, stats.blocks[i]["mlp"], bm.mlp, o)
            if bm.attn is not None:
                entry["attn"] = _prune_attn_block(ad, i, stats.blocks[i]["attn"], bm.attn, o)
            report.append(entry)
            if on_block is not None:
                on_block(i)
    return report


def _prune_mlp_block(ad: Any, i: int, st: dict[str, Tensor], keep: Tensor, o: PruneOptions) -> dict[str, Any]:
    fc1, fc2 = ad.mlp_linears(i)
    width = fc1.out_features
    dev = fc1.weight.device
    st = {k: v.to(dev) for k, v in st.items()}
    keep = keep.to(dev)
    prune = engine.complement(keep, width)
    m = engine.mlp_moments(st)
    lam = _mlp_lambda(o, m, keep)
    try:
        sol = engine.ridge_compensation(m, keep, prune, lam) if prune.numel() else None
    except ArithmeticError as e:
        raise NumericalError(f"block {i} MLP: {e}") from None
    w2 = fc2.weight.detach()
    err_u = engine.mlp_predicted_error(w2, m, keep, prune, None)
    err_c = engine.mlp_predicted_error(w2, m, keep, prune, sol.b) if sol is not None else err_u
    use = sol if o.compensation else None
    w1n, b1n, w2n, b2n = engine.fold_mlp(
        fc1.weight.detach(), _bias(fc1), w2, _bias(fc2), keep, prune, use
    )
    new1, new2 = narrow_mlp_linears(fc1, fc2, keep.numel())
    new1.weight.copy_(w1n)
    new2.weight.copy_(w2n)
    if b1n is not None:
        new1.bias.copy_(b1n)
    if b2n is not None:
        new2.bias.copy_(b2n)
    ad.set_mlp_linears(i, new1, new2)
    out_energy = engine.weighted_trace(w2, m.second)
    return {
        "width": width,
        "kept": int(keep.numel()),
        "removed": int(prune.numel()),
        "lambda": sol.lam if sol is not None else 0.0,
        "cond_estimate": sol.cond_estimate if sol is not None else 1.0,
        "compensated": bool(o.compensation),
        "ranker": o.ranker,
        "predicted_error_compensated": err_c,
        "predicted_error_uncompensated": err_u,
        "output_energy": out_energy,
    }


def _prune_attn_block(ad: Any, i: int, st: dict[str, Tensor], keep: Tensor, o: PruneOptions) -> dict[str, Any]:
    if ad.family.startswith("hf-"):  # separate q/k projections: folded by the HF package
        from corp_cli.hf.prune import prune_attn_block

        return prune_attn_block(ad, i, st, keep, o)
    blk = ad.blocks[i]
    attn = blk.attn
    shape = ad.shape(i)
    dev = attn.qkv.weight.device
    keep = keep.to(dev)
    prune = torch.stack([engine.complement(k, shape.head_dim) for k in keep])
    n = int(st["count"].sum())
    q2 = st["q_gram"].to(dev) / n
    k2 = st["k_gram"].to(dev) / n
    scale = ad.softmax_scale(i)
    sol = engine.qk_compensation(q2, k2, keep, prune, lam=o.lam, scale=scale, compensate=True)
    m = sol.m if o.compensation else torch.zeros_like(sol.m)
    if has_qk_norm(attn):
        blk.attn = _qk_norm_pruned(attn, keep, m, o.qk_balanced)
        return _attn_entry(shape, keep, prune, sol, o)
    wq, bq, wk, bk = ad.qk_weights(i)
    wqn, bqn, wkn, bkn = engine.fold_qk(wq.detach(), bq, wk.detach(), bk, keep, m, balanced=o.qk_balanced)
    hd = shape.num_heads * shape.head_dim
    new = narrow_attention(attn, keep.shape[1])
    new.qkv.weight.copy_(torch.cat([wqn, wkn, attn.qkv.weight[2 * hd :]], 0))
    if attn.qkv.bias is not None:
        new.qkv.bias.copy_(torch.cat([bqn, bkn, attn.qkv.bias[2 * hd :]], 0))
    new.proj.load_state_dict(attn.proj.state_dict())
    blk.attn = new
    return _attn_entry(shape, keep, prune, sol, o)


def _qk_norm_pruned(attn: nn.Module, keep: Tensor, m: Tensor, balanced: bool) -> nn.Module:
    """Pruned attention for a base with q/k norms: full projection and norms, then per-head maps.

    The per-head (ds x d) maps are fold_qk applied to the identity: exactly the rows it
    would fold into W_Q/W_K, but acting on the normalised q/k instead of on x.
    """
    nh, ds = keep.shape
    d = attn.head_dim
    eye = torch.eye(nh * d, dtype=engine.ACC_DTYPE, device=keep.device)
    sq, _, sk, _ = engine.fold_qk(eye, None, eye, None, keep, m, balanced=balanced)
    heads = torch.arange(nh, device=keep.device)
    # (H*ds, H*d) is block diagonal over heads; keep each head's own (ds, d) block
    q_out = sq.reshape(nh, ds, nh, d)[heads, :, heads, :]
    k_out = sk.reshape(nh, ds, nh, d)[heads, :, heads, :]
    new = narrow_attention(attn, ds)
    new.qkv.load_state_dict(attn.qkv.state_dict())
    new.q_norm.load_state_dict(attn.q_norm.state_dict())
    new.k_norm.load_state_dict(attn.k_norm.state_dict())
    new.q_out.copy_(q_out)
    new.k_out.copy_(k_out)
    new.proj.load_state_dict(attn.proj.state_dict())
    return new


def _attn_entry(shape: Any, keep: Tensor, prune: Tensor, sol: engine.QKSolution, o: PruneOptions) -> dict[str, Any]:
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


def _bias(lin: nn.Linear) -> Tensor | None:
    return lin.bias.detach() if lin.bias is not None else None

"""A FLOPs budget shared across blocks and parts: which widths each block keeps (`corp prune --flops-budget`).

For every block and every part in the target, the closed-form predicted error is computed
for every width the options allow, from one factorisation per block and part
(engine.prefix_errors: MLP units and V/O dims in ranking order; engine.qk_error_grid for
Q/K dims), and the FLOPs of every width from corp's own counter. The engine then picks the
widths that minimise the total error under the budget (a Lagrangian over blocks and parts,
then a greedy fill of what is left). The chosen widths are handed to the rankers as kept
counts, so the masks are the ones a uniform run at those counts would pick.

Errors are made comparable as follows (the evidence is in docs/method.md, "Sharing a
FLOPs budget"): MLP and V/O errors are both E||delta y||^2, the squared change each
sublayer adds to the residual stream per token, and are used as they are; a Q/K error is
the squared change of the (scaled) attention logits, which moves the attention output by
an amount the statistics do not give, so it enters weighted by QK_LOGIT_WEIGHT.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from corp_cli import engine
from corp_cli.errors import InputError, NumericalError
from corp_cli.family import BlockShape, ModelFamily
from corp_cli.flops import kv_cache_bytes, model_counts, shape_flops
from corp_cli.pruning import (
    PART_SPARSITY, PruneOptions, Widths, _best_in_groups, check_block, group_size, group_sum, head_order, keep_counts,
    kv_count, mlp_scores, qk_scores, query_heads_of, rotary_layout, rotary_scores, stats_parts_for, vo_dim_scores,
)
from corp_cli.stats import Statistics, require_parts

log = logging.getLogger(__name__)

# Weight of a Q/K block's summed logit error against MLP and V/O output errors: chosen by
# held-out top-1 on DeiT-tiny (docs/method.md); 1 was best of 0.3, 1 and 3.
QK_LOGIT_WEIGHT = 1.0
# How errors of different blocks and parts are put on one scale: "absolute" (the default: MLP
# and V/O output errors as they are, Q/K logit errors times QK_LOGIT_WEIGHT) or "relative"
# (each divided by its part's output energy in that block, Q/K by the logit energy), the
# alternative the method notes compare it with.
WEIGHTINGS = ("absolute", "relative")
WEIGHTING = "absolute"
# The achieved FLOPs must lie within this fraction below the budget.
BUDGET_TOLERANCE = 0.01


@dataclass
class Allocation:
    """Per-block kept counts, with the predicted error and FLOPs of each choice."""

    widths: list[Widths]  # parts absent from a block are kept whole
    blocks: list[dict[str, Any]]
    budget: float | None  # the fraction asked for (None: only a KV budget)
    dense_flops: int
    flops: int  # what corp's counter counts for the chosen widths
    seconds: float
    kv_budget: float | None = None  # the fraction of the dense KV-cache bytes per token asked for
    dense_kv: int | None = None  # KV-cache bytes per token, dense and chosen (decoders)
    kv: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"flops_budget": self.budget, "dense_flops": self.dense_flops, "flops": self.flops,
             "flops_ratio": self.flops / self.dense_flops, "seconds": round(self.seconds, 3), "blocks": self.blocks}
        if self.dense_kv is not None and self.kv is not None:
            d.update(kv_budget=self.kv_budget, dense_kv_bytes_per_token=self.dense_kv, kv_bytes_per_token=self.kv,
                     kv_ratio=self.kv / self.dense_kv)
        return d


# Q/K widths the allocator considers per head: every QK_STEP-th count down from the full width
# (d / 16 for d >= 16), and --min-qk-dim. Each costs one batched eigen-solve over every block's heads.
QK_WIDTHS = 16


def allowed_widths(part: str, shape: BlockShape, o: PruneOptions, *, pairs: bool = False) -> list[int]:
    """The kept counts the allocator chooses among for one part (ascending, full width last).

    --round-to / --min-keep bound the MLP's, --min-qk-dim the Q/K dims' (of which a grid of
    about QK_WIDTHS is considered; under rotary embeddings (pairs) only even counts, whole pairs);
    value dims and heads may go down to one.
    """
    if part == "mlp":
        width = shape.mlp_hidden
        step = o.round_to
        cands = set(range(step, width + 1, step)) | {width}
        return sorted({min(max(k, o.min_keep), width) for k in cands})
    if part == "qk":
        d = shape.head_dim
        low = min(o.min_qk_dim, d)
        step = max(1, d // QK_WIDTHS)
        if pairs:
            low, step = max(2, low + low % 2), step + step % 2
        return sorted({low} | set(range(d, low - 1, -step)))
    if part == "vo":
        return list(range(1, shape.head_dim + 1))
    return list(range(1, kv_count(shape) + 1))  # under grouped-query attention: kv heads, with their groups


def kv_value_bytes(model: nn.Module) -> int:
    """Bytes of one cached key or value element: the model's dtype."""
    p = next(iter(model.parameters()), None)
    return p.element_size() if p is not None else 4


def _flops(fam: ModelFamily, model: nn.Module, i: int, shape: BlockShape, tokens: int) -> float:
    return float(shape_flops(fam, model, i, shape, tokens)["total"])


def _width_flops(count: Callable[[int], float], widths: list[int]) -> Tensor:
    """count(k) for every width: from three counts when they lie on a line (every layout corp knows), else one by one."""
    ends = [widths[0], widths[len(widths) // 2], widths[-1]]
    f0, fm, f1 = (count(k) for k in ends)
    if ends[2] > ends[0]:
        slope = (f1 - f0) / (ends[2] - ends[0])
        if abs(f0 + slope * (ends[1] - ends[0]) - fm) < 0.5:
            return torch.tensor([f0 + slope * (k - ends[0]) for k in widths], dtype=torch.float64).round()
    return torch.tensor([count(k) for k in widths], dtype=torch.float64)


def _qk_grids(fam: ModelFamily, model: nn.Module, stats: Statistics, o: PruneOptions,
              blocks_: list[int] | None = None) -> dict[int, tuple[list[int], Tensor]]:
    """Every block's (of `blocks_`, default all) per-head logit error at every allowed Q/K width, one batched solve per width."""
    by_layout: dict[tuple[int, int], list[int]] = {}
    out: dict[int, tuple[list[int], Tensor]] = {}
    for i in (range(fam.num_blocks(model)) if blocks_ is None else blocks_):
        s = fam.shape(model, i)
        by_layout.setdefault((s.num_heads, s.head_dim), []).append(i)
    for i in [i for blocks in by_layout.values() for i in blocks]:
        lay = rotary_layout(fam, model, i)
        if lay is None:
            continue
        # rotary pairs: one block at a time (its own offsets), kept pairs = width / 2
        widths = allowed_widths("qk", fam.shape(model, i), o, pairs=True)
        st = stats.blocks[i]["attn"]
        n = int(st["count"].sum())
        grid = engine.rotary_qk_error_grid(st["q_gram"].cpu() / n, st["k_gram"].cpu() / n, rotary_scores(fam, model, i, st, o, lay),
                                           lay.pairs, lay.group, [w // 2 for w in widths], lam=o.lam,
                                           compensate=o.compensation, **lay.fit_kwargs())
        out[i] = (widths, grid * fam.softmax_scale(model, i) ** 2)
    for (nh, _d), blocks in by_layout.items():
        blocks = [i for i in blocks if i not in out]
        if not blocks:
            continue
        widths = allowed_widths("qk", fam.shape(model, blocks[0]), o)
        q2, k2, scores = [], [], []
        for i in blocks:
            st = stats.blocks[i]["attn"]
            n = int(st["count"].sum())
            q2.append(st["q_gram"] / n)
            k2.append(st["k_gram"] / n)
            scores.append(qk_scores(fam, model, i, st, o).cpu())
        grid = engine.qk_error_grid(torch.cat(q2), torch.cat(k2), torch.cat(scores), widths, lam=o.lam,
                                    compensate=o.compensation)  # (widths, blocks * H), unscaled logits
        for j, i in enumerate(blocks):
            out[i] = (widths, grid[:, j * nh:(j + 1) * nh] * fam.softmax_scale(model, i) ** 2)
    return out


def _block_groups(
    fam: ModelFamily, model: nn.Module, i: int, stats: Statistics, o: PruneOptions, parts: list[str], tokens: int,
    qk_weight: float, qk: tuple[list[int], Tensor] | None, weighting: str = "absolute",
) -> tuple[list[list[engine.Alternative]], dict[str, Any]]:
    """The block's choices as engine alternatives (FLOPs relative to the dense block), and what decoding needs."""
    shape = fam.shape(model, i)
    nh, d = shape.num_heads, shape.head_dim
    base = _flops(fam, model, i, shape, tokens)
    comp = o.compensation
    groups: list[list[engine.Alternative]] = []
    info: dict[str, Any] = {"shape": shape}
    if "mlp" in parts:
        w = fam.mlp_weights(model, i)
        st = stats.blocks[i]["mlp"]
        # the fit pruning will solve: without intercept when the projection has no bias
        m = engine.fit_moments({k: v.to(w.out_weight.device) for k, v in st.items()}, intercept=w.out_bias is not None)
        order = engine.ranking_order(mlp_scores(w, st, o)).to(w.out_weight.device)
        lam = o.lam if o.lam is not None else engine.oas_lambda(m.cov, m.n)
        errs = engine.prefix_errors(w.out_weight, m, order, lam, compensated=comp).cpu()
        widths = allowed_widths("mlp", shape, o)
        flops = _width_flops(lambda k: _flops(fam, model, i, replace(shape, mlp_hidden=k), tokens) - base, widths)
        scale = 1.0 / max(engine.weighted_trace(w.out_weight, m.second), 1e-30) if weighting == "relative" else 1.0
        groups.append([engine.Alternative(0.0, 0.0, [engine.Menu(errs[widths] * scale, flops)])])
        info["mlp"] = (widths, errs[widths])
    attn = [p for p in ("qk", "vo", "heads") if p in parts]
    if attn:
        g = group_size(shape)  # query heads per kv head (1 without grouped-query attention)
        nkv = kv_count(shape)
        head_counts = allowed_widths("heads", shape, o) if "heads" in parts else [nkv]
        # under GQA the "heads" part also chooses how many query heads each kept group keeps (the same in all)
        q_counts = list(range(1, g + 1)) if "heads" in parts else [g]
        combos = [(hk, qg) for hk in head_counts for qg in q_counts]
        info["head_counts"] = combos
        order_h = torch.arange(nkv)
        order_q = torch.arange(nh)
        vo_errs: dict[int, Tensor] = {}
        vo_scale = 1.0
        if "vo" in parts or "heads" in parts:
            vw = fam.vo_weights(model, i)
            wv = vw.out_weight
            st = stats.blocks[i]["vo"]
            m = engine.fit_moments({k: v.to(wv.device) for k, v in st.items()}, intercept=vw.out_bias is not None)
            lam = o.lam if o.lam is not None else engine.oas_lambda(m.cov, m.n)
            if weighting == "relative":
                vo_scale = 1.0 / max(engine.weighted_trace(wv, m.second), 1e-30)
            if "heads" in parts:
                order_h = head_order(fam, model, i, st, o)
                if g > 1:
                    order_q = head_order(fam, model, i, st, o, per_query=True)
            # a kv head's value dims are ranked for its whole group, and every query head of it keeps them
            kv_rank = torch.stack([engine.ranking_order(s) for s in group_sum(vo_dim_scores(fam, model, i, st, o), shape)])
            dim_rank = kv_rank.repeat_interleave(g, 0)
            for combo in combos:
                kept = _kept_query_heads(order_h, order_q, combo, shape)
                vorder = engine.vo_order(dim_rank, kept, nh).to(wv.device)
                full = engine.prefix_errors(wv, m, vorder, lam, compensated=comp).cpu()
                vo_errs[combo] = full[torch.arange(d + 1) * len(kept)]  # index dv: each kept head keeps dv dims
        info["head_order"] = (order_h, order_q)
        info["vo_errs"] = vo_errs
        qk_widths, qk_grid = qk if qk is not None else ([shape.head_dim], None)
        qk_scale = qk_weight
        if qk_grid is not None and weighting == "relative":
            st = stats.blocks[i]["attn"]
            n = int(st["count"].sum())
            k2 = (st["k_gram"] / n).repeat_interleave(g, 0)
            logits = float(torch.einsum("hij,hji->", st["q_gram"] / n, k2)) * fam.softmax_scale(model, i) ** 2
            qk_scale = qk_weight / max(logits, 1e-30)
        info["qk"] = (qk_widths, qk_grid)
        info["qk_scale"] = qk_scale
        v_widths = allowed_widths("vo", shape, o) if "vo" in parts else [d]
        info["v_widths"] = v_widths
        kv_bytes = info["kv_bytes"] = kv_value_bytes(model)
        alts = []
        for combo in combos:
            hk = combo[0]
            kept = _kept_query_heads(order_h, order_q, combo, shape)
            at = replace(shape, num_heads=len(kept), kv_heads=hk if shape.kv_heads is not None else None)
            whole = _flops(fam, model, i, at, tokens)
            menus = []
            err0 = vo_scale * float(vo_errs[combo][d]) if ("heads" in parts and "vo" not in parts) else 0.0
            # KV-cache bytes per token: hk kv heads x (key width + value width); each width's share rides on its menu
            kv0 = hk * kv_bytes * ((d if qk_grid is None else 0) + (d if "vo" not in parts else 0))
            if qk_grid is not None:
                f = _width_flops(lambda k: _flops(fam, model, i, replace(at, qk_dim=k), tokens) - whole, qk_widths)
                menus.append(engine.Menu(qk_scale * qk_grid[:, kept].sum(1), f,
                                         torch.tensor(qk_widths, dtype=torch.float64) * hk * kv_bytes))
            if "vo" in parts:
                f = _width_flops(lambda k: _flops(fam, model, i, replace(at, v_dim=k), tokens) - whole, v_widths)
                menus.append(engine.Menu(vo_scale * vo_errs[combo][v_widths], f,
                                         torch.tensor(v_widths, dtype=torch.float64) * hk * kv_bytes))
            alts.append(engine.Alternative(err0, whole - base, menus, kv0))
        groups.append(alts)
    return groups, info


def allocate(fam: ModelFamily, model: nn.Module, stats: Statistics, opts: PruneOptions, *,
             qk_weight: float | None = None, weighting: str | None = None,
             free: list[list[str]] | None = None, dense_flops: int | None = None,
             dense_kv: int | None = None) -> Allocation:
    """The widths that minimise the total predicted error with FLOPs <= opts.flops_budget of the dense model's.

    `qk_weight` defaults to QK_LOGIT_WEIGHT, `weighting` to WEIGHTING. `free[i]` (default:
    every part of the target, in every block) lists the parts of block i the allocator
    chooses; the others stay as the model has them now, their FLOPs counted as they are
    (sequential pruning pins what earlier blocks got). `dense_flops` is what the budget is a
    fraction of, when `model` is already partly pruned (default: `model`'s own FLOPs), `dense_kv`
    the same for the KV-cache bytes per token. Only
    the free parts appear in the widths and the report.
    """
    qk_weight = QK_LOGIT_WEIGHT if qk_weight is None else qk_weight
    weighting = WEIGHTING if weighting is None else weighting
    if weighting not in WEIGHTINGS:
        raise InputError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    if opts.flops_budget is None and opts.kv_budget is None:
        raise InputError("allocate needs a --flops-budget or a --kv-budget")
    t0 = time.perf_counter()
    parts = list(opts.parts)
    nb = fam.num_blocks(model)
    free = [list(parts) for _ in range(nb)] if free is None else [[p for p in parts if p in f] for f in free]
    need = stats_parts_for(sorted({p for f in free for p in f}))
    require_parts(Statistics(blocks=[b for b, f in zip(stats.blocks, free) if f], meta={}, path=stats.path), need)
    counts = model_counts(model, family=fam)
    tokens, dense = counts["tokens"], counts["flops"] if dense_flops is None else dense_flops
    flops_frac = opts.flops_budget if opts.flops_budget is not None else 1.0
    budget = flops_frac * dense
    dense_kv = counts.get("kv_bytes_per_token") if dense_kv is None else dense_kv
    if opts.kv_budget is not None and dense_kv is None:
        raise InputError(f"--kv-budget: {fam.name} models keep no key/value cache")
    groups: list[list[engine.Alternative]] = []
    owners: list[int] = []
    kinds: list[str] = []
    infos = []
    with torch.no_grad():
        for i in range(nb):
            if free[i]:
                check_block(fam, model, i, opts, free[i])
        qk = _qk_grids(fam, model, stats, opts, [i for i in range(nb) if "qk" in free[i]]) if "qk" in parts else {}
        for i in range(nb):
            g, info = _block_groups(fam, model, i, stats, opts, free[i], tokens, qk_weight, qk.get(i), weighting)
            groups += g
            owners += [i] * len(g)
            kinds += (["mlp"] if "mlp" in free[i] else []) + (["attn"] if len(g) > ("mlp" in free[i]) else [])
            infos.append(info)
    # the allocator spends FLOPs relative to the model as it is now (its blocks' current widths)
    current = counts["flops"]
    try:
        if opts.kv_budget is None:
            picks = engine.allocate_budget(groups, budget - current)
        else:
            # the KV bytes of blocks whose attention is not chosen here (left whole, or pinned) are fixed
            fixed = kv_cache_bytes([info["shape"] for info, f in zip(infos, free) if not {"qk", "vo", "heads"} & set(f)],
                                   kv_value_bytes(model))
            picks = engine.allocate_two_budgets(groups, budget - current, opts.kv_budget * dense_kv - fixed)
    except ValueError as e:
        if "KV budget" in str(e):
            raise InputError(f"--kv-budget {opts.kv_budget:g} is below what the allowed widths reach within the FLOPs "
                             f"budget with target {opts.target}: raise it or add vo/heads/qk to --target") from None
        cheapest = current + sum(min(a.flops + sum(float(m.flops.min()) for m in a.menus) for a in alts) for alts in groups)
        raise InputError(
            f"--flops-budget {flops_frac:g} is below what the allowed widths reach ({cheapest / dense:.3f} of the "
            f"dense FLOPs with target {opts.target}, --min-keep/--min-qk-dim/--round-to as given): raise it or add parts "
            "to --target"
        ) from None
    widths, blocks = _decode(free, kinds, owners, picks, infos)
    pruned = [_pruned_shape(info["shape"], w) for info, w in zip(infos, widths)]
    flops = counts["flops"] - counts["flops_blocks"] + sum(
        int(shape_flops(fam, model, i, s, tokens)["total"]) for i, s in enumerate(pruned))
    for b, s, i in zip(blocks, pruned, range(len(blocks))):
        b["flops"] = int(shape_flops(fam, model, i, s, tokens)["total"])
    if flops > budget:  # the menus assume a block's parts add up; a layout where they do not would show here
        raise NumericalError(f"the allocation counts {flops / dense:.4f} of the dense FLOPs, above the budget "
                             f"{flops_frac:g}: {fam.name}'s FLOPs do not separate by part")
    kv = kv_cache_bytes(pruned, kv_value_bytes(model)) if dense_kv is not None else None
    if kv is not None and opts.kv_budget is not None and kv > opts.kv_budget * dense_kv * (1 + 1e-12):
        raise NumericalError(f"the allocation keeps {kv / dense_kv:.4f} of the dense KV cache, above --kv-budget "
                             f"{opts.kv_budget:g}")
    kv_binds = kv is not None and opts.kv_budget is not None and kv >= (1.0 - BUDGET_TOLERANCE) * opts.kv_budget * dense_kv
    if opts.flops_budget is not None and not kv_binds and flops < (1.0 - BUDGET_TOLERANCE) * budget:
        log.warning("the chosen widths keep %.4f of the dense FLOPs, more than %.0f%% below the budget %g (the "
                    "allowed widths are too coarse to come closer)", flops / dense, 100 * BUDGET_TOLERANCE,
                    opts.flops_budget)
    return Allocation(widths=widths, blocks=blocks, budget=opts.flops_budget, dense_flops=dense, flops=flops,
                      seconds=time.perf_counter() - t0, kv_budget=opts.kv_budget, dense_kv=dense_kv, kv=kv)


def _decode(
    free: list[list[str]], kinds: list[str], owners: list[int], picks: list[tuple[int, list[int]]],
    infos: list[dict[str, Any]],
) -> tuple[list[Widths], list[dict[str, Any]]]:
    """Kept counts per block (parts kept whole are left out) and the report of every choice."""
    widths: list[Widths] = [{} for _ in infos]
    blocks: list[dict[str, Any]] = [{"block": i} for i in range(len(infos))]
    for (a, ks), kind, i in zip(picks, kinds, owners):
        info, shape, w, rec, parts = infos[i], infos[i]["shape"], widths[i], blocks[i], free[i]
        if kind == "mlp":
            kw, errs = info["mlp"]
            k = kw[ks[0]]
            rec["mlp"] = {"kept": k, "width": shape.mlp_hidden, "predicted_error": float(errs[ks[0]])}
            if k < shape.mlp_hidden:
                w["mlp"] = k
            continue
        combo = info["head_counts"][a]
        hk, qg = combo
        kept = _kept_query_heads(*info["head_order"], combo, shape)
        menu = iter(ks)
        if "qk" in parts:
            qw, grid = info["qk"]
            j = next(menu)
            err = float(grid[j, kept].sum())
            rec["qk"] = {"kept": qw[j], "width": shape.head_dim, "predicted_logit_error": err,
                         "weighted_error": info["qk_scale"] * err}
            if qw[j] < shape.head_dim:
                w["qk"] = qw[j]
        dv = info["v_widths"][next(menu)] if "vo" in parts else shape.head_dim
        err = float(info["vo_errs"][combo][dv]) if info["vo_errs"] else 0.0
        if "vo" in parts:
            # the attention output's error: removed value dims and removed heads together
            rec["vo"] = {"kept": dv, "width": shape.head_dim, "predicted_error": err}
            if dv < shape.head_dim:
                w["vo"] = dv
        if "heads" in parts:
            rec["heads"] = {"kept": hk, "width": kv_count(shape), "kept_heads": [int(h) for h in kept],
                            **({"query_heads_per_group": qg} if group_size(shape) > 1 else {}),
                            **({"predicted_error": err} if "vo" not in parts else {})}
            if hk < kv_count(shape):  # kv heads under grouped-query attention, with their query heads
                w["heads"] = hk
            if qg < group_size(shape):
                w["q_heads"] = qg
    return widths, blocks


def _kept_query_heads(order_kv: Tensor, order_q: Tensor, combo: tuple[int, int], shape: BlockShape) -> Tensor:
    """The query heads kept with `combo` = (kv heads kept, query heads per kept group): as plan_masks keeps them."""
    hk, qg = combo
    heads = query_heads_of(torch.sort(order_kv[:hk]).values, shape)
    return heads if qg == group_size(shape) else _best_in_groups(order_q, heads, shape, qg)


def _pruned_shape(shape: BlockShape, w: Widths) -> BlockShape:
    kv = w.get("heads", kv_count(shape))  # under grouped-query attention a kept head is a kv head with its group
    return replace(shape, mlp_hidden=w.get("mlp", shape.mlp_hidden), num_heads=kv * w.get("q_heads", group_size(shape)),
                   kv_heads=kv if shape.kv_heads is not None else None,
                   qk_dim=w.get("qk", shape.qk_dim), v_dim=w.get("vo", shape.v_dim))


def uniform_sparsity(fam: ModelFamily, model: nn.Module, opts: PruneOptions, budget: float) -> tuple[float, float]:
    """The one sparsity for every part in the target whose FLOPs come closest to `budget` (a fraction) from below.

    Returns (sparsity, achieved FLOPs fraction); the FLOPs are counted from the kept
    counts alone (no pruning), so this is cheap.
    """
    counts = model_counts(model, family=fam)
    tokens, dense, outer = counts["tokens"], counts["flops"], counts["flops"] - counts["flops_blocks"]

    def ratio(s: float) -> float:
        o = replace(opts, flops_budget=None, **{PART_SPARSITY[p]: s for p in opts.parts})
        total = outer
        for i in range(fam.num_blocks(model)):
            shape = fam.shape(model, i)
            kept = keep_counts(o.for_block(i), shape, pairs=fam.rotary_pairs(model, i) is not None)
            total += int(shape_flops(fam, model, i, _pruned_shape(shape, kept), tokens)["total"])
        return total / dense

    lo, hi = 0.0, 0.999
    if ratio(hi) > budget:
        raise InputError(f"uniform pruning of {opts.target} cannot reach {budget:g} of the dense FLOPs "
                         f"(at sparsity {hi} it keeps {ratio(hi):.3f})")
    if ratio(lo) <= budget:
        return lo, ratio(lo)
    for _ in range(50):  # FLOPs only fall as the sparsity rises
        mid = 0.5 * (lo + hi)
        if ratio(mid) > budget:
            lo = mid
        else:
            hi = mid
    return hi, ratio(hi)

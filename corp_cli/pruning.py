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
                     "vo_sparsity", "head_sparsity", "vo_ranker", "head_ranker", "q_head_sparsity")
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
    # grouped-query attention: the fraction of query heads removed inside each kept kv group (the same count in
    # every group, so the layout stays the stock one); with the "heads" part
    q_head_sparsity: float = 0.0
    # keep at most this fraction of the dense KV-cache bytes per token (decoders); widths chosen per block
    kv_budget: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", target_name(parse_target(self.target)))
        for name in ("mlp_sparsity", "attn_sparsity", "vo_sparsity", "head_sparsity", "q_head_sparsity"):
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
        if self.kv_budget is not None:
            f = self.kv_budget
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 < f <= 1.0):
                raise InputError(f"--kv-budget must be a fraction of the dense KV-cache bytes in (0, 1], got {f!r}")
            if self.block_overrides:
                raise InputError("--kv-budget chooses every block's widths; per-block overrides (--config blocks:) "
                                 "do not apply: drop one of them")
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
        given = getattr(self, PART_SPARSITY[part]) > 0 or (part == "heads" and self.q_head_sparsity > 0)
        return part in self.parts and (self.budgeted or given)

    @property
    def budgeted(self) -> bool:
        """Widths chosen by the allocator (a FLOPs and/or a KV-cache budget) rather than by the sparsities."""
        return self.flops_budget is not None or self.kv_budget is not None

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
        if not self.q_head_sparsity:
            d.pop("q_head_sparsity")
        if self.kv_budget is None:
            d.pop("kv_budget")
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


def keep_counts(o: PruneOptions, shape: BlockShape, *, pairs: bool = False) -> Widths:
    """What one block keeps of each part its options prune, from the sparsities.

    pairs: Q/K dims are rotary pairs, removed whole, so the Q/K count is even (never below 2).
    """
    counts: Widths = {}
    if o.prune_mlp and o.mlp_sparsity > 0:
        counts["mlp"] = engine.keep_count(shape.mlp_hidden, o.mlp_sparsity, round_to=o.round_to, min_keep=o.min_keep)
    if o.prune_heads and o.head_sparsity > 0:
        # under grouped-query attention a head is a key/value head with its group of query heads
        counts["heads"] = engine.keep_count(kv_count(shape), o.head_sparsity)
    if o.prune_heads and o.q_head_sparsity > 0 and group_size(shape) > 1:
        counts["q_heads"] = engine.keep_count(group_size(shape), o.q_head_sparsity)  # per kept kv group
    if o.prune_attn and o.attn_sparsity > 0:
        counts["qk"] = (engine.keep_count(shape.head_dim, o.attn_sparsity, round_to=2, min_keep=o.min_qk_dim + o.min_qk_dim % 2)
                        if pairs else engine.keep_count(shape.head_dim, o.attn_sparsity, min_keep=o.min_qk_dim))
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
    if "vo" in parts or "heads" in parts or "q_heads" in parts:
        why = why or fam.vo_refusal(model, i)
    if why is not None:
        raise UnsupportedModelError(why)
    if "mlp" in parts and o.min_keep > shape.mlp_hidden:
        raise InputError(f"block {i}: --min-keep {o.min_keep} exceeds its {shape.mlp_hidden} MLP units")
    if "qk" in parts and o.min_qk_dim > shape.head_dim:
        raise InputError(f"block {i}: --min-qk-dim {o.min_qk_dim} exceeds the head dim {shape.head_dim}")
    if ("heads" in parts or "q_heads" in parts) and o.q_head_sparsity > 0 and group_size(shape) == 1:
        raise InputError(f"block {i}: --q-head-sparsity removes query heads inside a key/value group, but this "
                         "attention has one query head per key/value head: use --head-sparsity")


def stats_parts_for(parts: list[str] | tuple[str, ...]) -> list[str]:
    """The statistics parts that pruning `parts` needs (Q/K: attn; V/O dims and heads: vo)."""
    need = {"mlp": "mlp", "qk": "attn", "vo": "vo", "heads": "vo", "q_heads": "vo"}
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
        counts = widths[i] if widths is not None else keep_counts(o, fam.shape(model, i), pairs=fam.rotary_pairs(model, i) is not None)
        check_block(fam, model, i, o, list(counts))
        require_parts(stats, stats_parts_for(list(counts)))
        masks.append(plan_block(fam, model, i, stats.blocks[i], o, counts))
    return masks


def plan_block(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, dict[str, Tensor]], o: PruneOptions,
               counts: Widths) -> BlockMasks:
    """What block i keeps of each part in `counts`, ranked on its statistics `st` (by part)."""
    shape = fam.shape(model, i)
    bm = BlockMasks()
    if "mlp" in counts:
        bm.mlp = _rank_mlp(fam.mlp_weights(model, i), st["mlp"], o, counts["mlp"])
    kv = None  # the kept key/value heads (every head, or every group, when None)
    if "heads" in counts or "q_heads" in counts:
        order = head_order(fam, model, i, st["vo"], o)
        kv = torch.sort(order[: counts.get("heads", kv_count(shape))]).values
        bm.heads = query_heads_of(kv, shape)
        if "q_heads" in counts:
            bm.heads = _best_in_groups(head_order(fam, model, i, st["vo"], o, per_query=True),
                                       bm.heads, shape, counts["q_heads"])
    if "qk" in counts:
        kept = _rank_qk(fam, model, i, st["attn"], o, counts["qk"])  # rotary: whole pairs' dims, per kv head
        bm.attn = kept if kv is None else kept[kv]
    if "vo" in counts:
        ranks = group_sum(vo_dim_scores(fam, model, i, st["vo"], o), shape)
        kept = engine.select_top_per_head(ranks, counts["vo"]).cpu()
        bm.vo = kept if kv is None else kept[kv]
    return bm


# ---- grouped-query attention: a key/value head serves a group of query heads
#
# Query heads g*G .. g*G+G-1 read kv head g (G = num_heads / kv_heads; the stock layout of
# the dense model). Their outputs are contiguous in o, so a kv head with its group is one
# "head" of G*d dims of o for the head rankers, and one value dim of kv head g is the G dims
# (h, j), h in the group, of o. Masks: `heads` are kept QUERY heads; `attn` and `vo` rows
# belong to the kept KV heads. Without GQA (G = 1) every rule below is the identity.


def kv_count(shape: BlockShape) -> int:
    return shape.kv_heads or shape.num_heads


def group_size(shape: BlockShape) -> int:
    """Query heads per key/value head (1 without grouped-query attention)."""
    return shape.num_heads // kv_count(shape)


def query_heads_of(kv: Tensor, shape: BlockShape) -> Tensor:
    """The query heads of the kv heads `kv` (ascending)."""
    g = group_size(shape)
    return (kv[:, None] * g + torch.arange(g, device=kv.device)).reshape(-1)


def kv_heads_of(heads: Tensor, shape: BlockShape) -> Tensor:
    """The kv heads the query heads `heads` read (ascending, each once)."""
    return torch.unique(torch.div(heads, group_size(shape), rounding_mode="floor"))


def per_query_head(rows: Tensor, heads: Tensor, shape: BlockShape) -> Tensor:
    """Rows of the kept kv heads -> one row per kept query head `heads` (its kv head's)."""
    kv_of = torch.div(heads, group_size(shape), rounding_mode="floor")
    return rows[torch.searchsorted(kv_heads_of(heads, shape).to(rows.device), kv_of.to(rows.device))]


def group_sum(scores: Tensor, shape: BlockShape) -> Tensor:
    """Per-query-head dim scores (H, d) -> per-kv-head (Hkv, d): a kv dim costs its whole group's."""
    g = group_size(shape)
    return scores if g == 1 else scores.reshape(kv_count(shape), g, -1).sum(1)


def o_kept_dims(shape: BlockShape, heads: Tensor | None, v_keep: Tensor | None) -> Tensor:
    """The kept dims of o (the o_proj input): kept query heads, and each one's kv head's kept value dims."""
    heads = torch.arange(shape.num_heads) if heads is None else heads
    return engine.vo_kept_dims(heads, None if v_keep is None else per_query_head(v_keep, heads, shape), shape.head_dim)


def _best_in_groups(order: Tensor, heads: Tensor, shape: BlockShape, per_group: int) -> Tensor:
    """The first `per_group` query heads of `order` in every kv group among `heads` (ascending)."""
    g = group_size(shape)
    taken: dict[int, list[int]] = {int(kv): [] for kv in kv_heads_of(heads, shape)}
    for h in order.tolist():
        group = taken.get(h // g)
        if group is not None and len(group) < per_group:
            group.append(h)
    return torch.tensor(sorted(h for hs in taken.values() for h in hs), dtype=torch.int64)


def head_order(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, Tensor], o: PruneOptions, *,
               per_query: bool = False) -> Tensor:
    """Block i's (kv) heads, most important first, by --head-ranker (every prefix is a kept set).

    Under grouped-query attention the units are kv heads with their groups, or with `per_query` the query heads.
    """
    vw = fam.vo_weights(model, i)
    shape = fam.shape(model, i)
    w, nh = vw.out_weight, shape.num_heads if per_query else kv_count(shape)
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
    lay = rotary_layout(fam, model, i)
    if lay is not None:
        if keep_n % 2:
            raise InputError(f"block {i}: {keep_n} Q/K dims is not a whole number of rotary pairs; keep an even count")
        keep = engine.select_top_per_head(rotary_scores(fam, model, i, st, o, lay), keep_n // 2)
        return torch.sort(lay.pairs[keep].reshape(keep.shape[0], -1), dim=1).values.cpu()
    return engine.select_top_per_head(qk_scores(fam, model, i, st, o), keep_n).cpu()


# --- rotary Q/K pairs ---


@dataclass(frozen=True)
class RotaryLayout:
    """How block i's heads rotate: the pairs, the query head -> kv head map, and the offsets of the positional fit."""

    pairs: Tensor  # (P, 2)
    group: Tensor  # (Hq,)
    angles: Tensor | None  # (L, P), or None: statistics after the rotation, pooled fit
    weights: Tensor | None  # (L,)

    def fit_kwargs(self) -> dict[str, Tensor]:
        return {} if self.angles is None else {"rel_angles": self.angles, "rel_weights": self.weights}


def rotary_layout(fam: ModelFamily, model: nn.Module, i: int) -> RotaryLayout | None:
    pairs = fam.rotary_pairs(model, i)
    if pairs is None:
        return None
    shape = fam.shape(model, i)
    kv = shape.kv_heads or shape.num_heads
    group = torch.arange(shape.num_heads) // (shape.num_heads // kv)
    off = fam.rotary_offsets(model, i)
    angles, weights = off if off is not None else (None, None)
    return RotaryLayout(pairs=pairs.cpu(), group=group, angles=angles, weights=weights)


def rotary_scores(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, Tensor], o: PruneOptions,
                  lay: RotaryLayout) -> Tensor:
    """How much each rotary pair of each kv head is worth keeping, (Hkv, P).

    energy: the pair's logit energy (engine.rotary_pair_scores); the other rankers: the sum of
    the pair's two dims' scores, summed over the group's query heads.
    """
    if o.qk_ranker == "energy":
        n = int(st["count"].sum())
        return engine.rotary_pair_scores(st["q_gram"].cpu() / n, st["k_gram"].cpu() / n, lay.pairs, lay.group,
                                         **lay.fit_kwargs())
    dims = qk_scores(fam, model, i, st, o).cpu().to(engine.ACC_DTYPE)
    per_q = dims[:, lay.pairs[:, 0]] + dims[:, lay.pairs[:, 1]]
    out = torch.zeros(int(lay.group.max()) + 1, lay.pairs.shape[0], dtype=engine.ACC_DTYPE)
    return out.index_add_(0, lay.group, per_q)


def _rotary_qk_solve(fam: ModelFamily, model: nn.Module, i: int, st: dict[str, Tensor], keep: Tensor,
                     heads: Tensor | None, o: PruneOptions, lam_rel: float, lay: RotaryLayout) -> engine.QKSolution:
    """The rotary solve of the kept query heads, as a QKSolution: M over each kept head's kept dims (ascending).

    keep: (kept kv heads, 2s) kept dims, whole pairs; the correction is folded into the queries only.
    """
    dev = keep.device
    n = int(st["count"].sum())
    q2, k2 = st["q_gram"].to(dev) / n, st["k_gram"].to(dev) / n
    group = lay.group.to(dev)
    if heads is not None:
        kv = torch.unique(group[heads])
        q2, k2, group = q2[heads], k2[kv], torch.searchsorted(kv, group[heads])
    pairs = lay.pairs.to(dev)
    keep_pairs = engine.rotary_pairs_of_dims(pairs, keep)
    kw = {k: v.to(dev) for k, v in lay.fit_kwargs().items()}
    if engine.has_target(st):  # sequential: fit toward the dense stream's logits (q-side rows per query head)
        qc, kc, qd, kd = (st[k].to(dev) / n for k in engine.QK_TARGET_KEYS)
        if heads is not None:
            qc, qd, kc, kd = qc[heads], qd[heads], kc[kv], kd[kv]
        kw.update(q_cross=qc, k_cross=kc, qd_second=qd, kd_second=kd)
    scale = fam.softmax_scale(model, i)
    if lay.angles is not None:  # q, k before the rotation: every query dim mixed into the kept ones
        angles, weights = kw.pop("rel_angles"), kw.pop("rel_weights")
        mix = engine.rotary_mix_compensation(q2, k2, pairs, keep_pairs, group, angles, weights, lam=o.lam, scale=scale,
                                             lam_rel=lam_rel, **kw)
        kept, m, lam, err_c, err_u = mix.kept, mix.m, mix.lam, mix.err_compensated, mix.err_uncompensated
    else:  # after it (pooled statistics): a complex scale per kept pair, which commutes with the rotation
        sol = engine.rotary_qk_compensation(q2, k2, pairs, keep_pairs, group, lam=o.lam, scale=scale, lam_rel=lam_rel,
                                            **kw)
        kept, m = engine.rotary_correction_matrix(pairs, keep_pairs, sol.coef, group)
        lam, err_c, err_u = sol.lam, sol.err_compensated, sol.err_uncompensated
    # M's columns in the order the narrow head holds its kept dims (keep's rows, per query head)
    m = torch.gather(m, 2, torch.searchsorted(kept, keep[group])[:, None, :].expand(-1, m.shape[1], -1))
    return engine.QKSolution(m=m, lam=lam, err_compensated=err_c, err_uncompensated=err_u)


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
    raw = engine.mlp_moments(st)
    m = engine.fit_moments(st, intercept=intercept, raw=raw)
    lam = _mlp_lambda(o, m, keep)
    if engine.has_target(st):
        w2n, b2n, fit = _target_fold(w2, w.out_bias, st, keep, prune, lam, intercept, o, f"block {i} MLP", raw)
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
                 intercept: bool, o: PruneOptions, where: str,
                 raw: engine.Moments | None = None) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """The output projection over the kept features fit to the statistics' target; (W', b', report fields).

    --no-compensation keeps W_S and b (the target only enters the reported errors).
    """
    try:
        sol, blend, cv = engine.blended_target_compensation(st, w, bias, keep, lam, intercept=intercept, raw=raw)
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
    # a bf16/fp16 forward rounds the Grams: the ridge rises to that rounding level (method notes)
    lam_rel = engine.qk_lambda_rel(getattr(torch, forward_dtype) if forward_dtype else None)
    lay = rotary_layout(fam, model, i)
    if lay is not None:
        return prune, _rotary_qk_solve(fam, model, i, st, keep, heads, o, lam_rel, lay)
    n = int(st["count"].sum())
    q2, k2 = st["q_gram"].to(keep.device) / n, st["k_gram"].to(keep.device) / n
    if heads is not None:
        q2, k2 = q2[heads], k2[heads]
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
    fam.narrow_qk(model, i, keep, m, balanced=o.qk_balanced and fam.rotary_pairs(model, i) is None)
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
    kv = kv_heads_of(heads, shape)
    out: dict[str, Any] = {}
    qk_keep = qk_m = None
    if bm.attn is not None:  # rows per kept (kv) head; under rotary embeddings M is per kept query head
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
    vo_raw = engine.mlp_moments(vo_st)
    m = engine.fit_moments(vo_st, intercept=w.out_bias is not None, raw=vo_raw)
    # under GQA one value dim is a dim of every query head of its group: the removed set of o is their union,
    # and the ridge on all of o fits o_proj's correction jointly over the group
    keep = o_kept_dims(shape, heads, v_keep).to(dev)
    prune = engine.complement(keep, nh * d)
    lam = _mlp_lambda(o, m, keep)
    fit: dict[str, Any] = {}
    if engine.has_target(vo_st):
        w_n, b_n, fit = _target_fold(w.out_weight, w.out_bias, vo_st, keep, prune, lam, w.out_bias is not None, o,
                                     f"block {i} attention output", vo_raw)
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
                                                 out_weight=w_n, out_bias=b_n,
                                                 balanced=o.qk_balanced and fam.rotary_pairs(model, i) is None,
                                                 kv_heads=kv if group_size(shape) > 1 else None))
    out["vo"] = {
        "width": nh * d,
        "kept": int(keep.numel()),
        "removed": int(prune.numel()),
        "num_heads": nh,
        "heads_kept": int(heads.numel()),
        "kept_heads": [int(h) for h in heads],
        **({"kv_heads": kv_count(shape), "kv_heads_kept": int(kv.numel())} if group_size(shape) > 1 else {}),
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
    # rotary Q/K pairs are pruned when asked for (--target qk), not by default
    attn = all(fam.qk_refusal(model, i) is None and fam.rotary_pairs(model, i) is None
               for i in range(fam.num_blocks(model)))
    return ("mlp", "attn") if attn else ("mlp",)


def default_target(fam: ModelFamily, model: nn.Module) -> str:
    return "both" if "attn" in supported_parts(fam, model) else "mlp"


def check_prunable(fam: ModelFamily, model: nn.Module, opts: PruneOptions) -> None:
    """Refuse, before any expensive work, a part the family cannot prune correctly in some block."""
    if opts.kv_budget is not None and not fam.caches_keys_values:
        raise InputError(f"--kv-budget bounds the key/value cache of a decoder's generation; {fam.name} models keep none "
                         "(use --flops-budget)")
    for i in range(fam.num_blocks(model)):
        o = opts.for_block(i)
        check_block(fam, model, i, o, [p for p in o.parts if o.active(p)])


def planned_shape(shape: BlockShape, counts: Widths) -> BlockShape:
    """A block's shape once pruned to `counts` (kept heads are kv heads with their groups under GQA)."""
    kv = counts.get("heads", kv_count(shape))
    per_group = counts.get("q_heads", group_size(shape))
    return replace(shape, mlp_hidden=counts.get("mlp", shape.mlp_hidden), num_heads=kv * per_group,
                   kv_heads=kv if shape.kv_heads is not None else None, qk_dim=counts.get("qk", shape.qk_dim),
                   v_dim=counts.get("vo", shape.v_dim))


def planned_widths(fam: ModelFamily, model: nn.Module, opts: PruneOptions) -> list[dict[str, int]]:
    """What every block would keep under `opts` (from shapes alone); [] under a budget, whose widths
    the allocation chooses from the statistics."""
    if opts.budgeted:
        return []
    out = []
    for i in range(fam.num_blocks(model)):
        o, s = opts.for_block(i), fam.shape(model, i)
        p = planned_shape(s, keep_counts(o, s, pairs=fam.rotary_pairs(model, i) is not None))
        row = {"block": i, "mlp_hidden": s.mlp_hidden, "mlp_kept": p.mlp_hidden, "head_dim": s.head_dim,
               "qk_kept": p.qk_dim, "num_heads": s.num_heads, "heads_kept": p.num_heads, "v_kept": p.v_dim}
        if s.kv_heads is not None:
            row.update(kv_heads=s.kv_heads, kv_kept=p.kv_heads)
        out.append(row)
    return out


def planned_totals(fam: ModelFamily, model: nn.Module, widths: list[dict[str, int]]) -> dict[str, Any]:
    """FLOPs per item (and KV-cache bytes per token, for decoders) of the dense model and of `widths` (planned_widths)."""
    from corp_cli.flops import kv_cache_bytes, model_counts, shape_flops

    counts = model_counts(model, family=fam)
    shapes = [replace(fam.shape(model, w["block"]), mlp_hidden=w["mlp_kept"], qk_dim=w["qk_kept"],
                      num_heads=w["heads_kept"], v_dim=w["v_kept"], kv_heads=w.get("kv_kept")) for w in widths]
    flops = counts["flops"] - counts["flops_blocks"] + sum(
        int(shape_flops(fam, model, i, s, counts["tokens"])["total"]) for i, s in enumerate(shapes))
    out: dict[str, Any] = {"tokens": counts["tokens"], "flops_dense": counts["flops"], "flops": flops,
                           "flops_ratio": flops / counts["flops"]}
    if "kv_bytes_per_token" in counts:
        p = next(iter(model.parameters()), None)
        kv = kv_cache_bytes(shapes, p.element_size() if p is not None else 4)
        out.update(kv_bytes_per_token_dense=counts["kv_bytes_per_token"], kv_bytes_per_token=kv,
                   kv_ratio=kv / counts["kv_bytes_per_token"])
    return out

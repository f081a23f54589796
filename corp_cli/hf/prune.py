"""Q/K pruning for HF encoders: the same logit solve as the timm path, folded into separate q/k Linears."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from corp_cli import engine


def prune_attn_block(ad: Any, i: int, st: dict[str, Tensor], keep: Tensor, o: Any) -> dict[str, Any]:
    """Solve the per-head logit compensation, fold it, and install a narrow attention in block i."""
    from corp_cli.prune import _attn_entry  # local: prune imports this module lazily

    shape = ad.shape(i)
    wq, bq, wk, bk = ad.qk_weights(i)
    dev = wq.device
    keep = keep.to(dev)
    prune = torch.stack([engine.complement(k, shape.head_dim) for k in keep])
    n = int(st["count"].sum())
    q2 = st["q_gram"].to(dev) / n
    k2 = st["k_gram"].to(dev) / n
    sol = engine.qk_compensation(q2, k2, keep, prune, lam=o.lam, scale=ad.softmax_scale(i), compensate=True)
    m = sol.m if o.compensation else torch.zeros_like(sol.m)
    wqn, bqn, wkn, bkn = engine.fold_qk(wq.detach(), _d(bq), wk.detach(), _d(bk), keep, m, balanced=o.qk_balanced)
    old = ad._attn(i)
    v_old = old.value if hasattr(old, "value") else old.v_proj
    o_old = getattr(old, "o_proj", None)
    new = ad.narrow_attention(i, keep.shape[1])
    q_new, k_new = ad.qk_sites(i)
    q_new.weight.copy_(wqn)
    k_new.weight.copy_(wkn)
    if bqn is not None:
        q_new.bias.copy_(bqn)
        k_new.bias.copy_(bkn)
    (new.value if hasattr(new, "value") else new.v_proj).load_state_dict(v_old.state_dict())
    if o_old is not None:
        new.o_proj.load_state_dict(o_old.state_dict())
    return _attn_entry(shape, keep, prune, sol, o)


def _d(b: Tensor | None) -> Tensor | None:
    return b.detach() if b is not None else None

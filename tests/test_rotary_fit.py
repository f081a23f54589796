"""The rotary mixing fit (engine.rotary_mix_compensation): every dim of a query head mixed into its kept pairs.

Closed form vs torch.linalg.lstsq over every materialised (query, key, offset) triple; the folded
model's logits vs the fitted ones at every position; no worse than none at every offset, on random
weights and on the real stories260K Llama's q/k projections.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from corp_cli import engine as E
from .conftest import needs_stories
from .test_rotary import (GROUP, HKV, HQ, DH, _random_qk, _stories_qk, causal_offsets, cross_grams,
                          half_split_pairs, head_grams, interleaved_pairs, per_offset_errors, random_rotary_layer,
                          rope_freqs, rotate, rotate_by, stories_layout)

D64 = torch.float64


def lstsq_positional(q: Tensor, k: Tensor, pairs: Tensor, keep: Tensor, group: Tensor, angles: Tensor, weights: Tensor,
                     lam: float, qd: Tensor, kd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted ridge least squares by torch.linalg.lstsq over every (query, key, offset) triple, per query head.

    Features q_j (R_l k)_i for every query dim j and kept dim i; target q_d^T R_l k_d - q^T Pi_S R_l k.
    Returns N (Hq, d, 2s) with columns the kept dims ascending, the weighted error and the per-offset errors (L, Hq).
    """
    w = weights / weights.sum()
    ns, errs, per = [], [], []
    for h in range(q.shape[1]):
        g = int(group[h])
        kept = torch.sort(pairs[keep[g]].reshape(-1)).values
        rows, rhs, wts = [], [], []
        for lag in range(angles.shape[0]):
            kr, kdr = rotate_by(k[:, g], pairs, angles[lag]), rotate_by(kd[:, g], pairs, angles[lag])
            target = (qd[:, h] @ kdr.T).reshape(-1)
            u = (q[:, h][:, kept] @ kr[:, kept].T).reshape(-1)
            rows.append((q[:, h][:, None, :, None] * kr[None, :, None, kept]).reshape(u.numel(), -1))  # (pairs, d*2s)
            rhs.append(target - u)
            wts.append(torch.full_like(u, float(w[lag]) / u.numel()))
        phi, r, wt = torch.cat(rows), torch.cat(rhs), torch.cat(wts)
        root = wt.sqrt()[:, None]
        a = torch.cat([phi * root, lam**0.5 * torch.eye(phi.shape[1], dtype=D64)])
        b = torch.cat([r[:, None] * root, torch.zeros(phi.shape[1], 1, dtype=D64)])
        theta = torch.linalg.lstsq(a, b, driver="gelsd").solution[:, 0]
        res = (r - phi @ theta) ** 2
        ns.append(theta.reshape(q.shape[2], -1))
        errs.append((wt * res).sum())
        per.append(torch.stack([c.mean() for c in res.split([x.numel() for x in rhs])]))
    return torch.stack(ns), torch.stack(errs), torch.stack(per, 1)


@pytest.mark.parametrize("target", ["self", "dense"])
def test_mixing_closed_form_equals_lstsq_over_every_query_key_offset_triple(target: str) -> None:
    pairs, freqs = half_split_pairs(DH), rope_freqs(DH, base=30.0)
    q, k = _random_qk(20, HQ, HKV, DH, seed=21)
    qd, kd = (q, k) if target == "self" else _random_qk(20, HQ, HKV, DH, seed=21, corr=0.4)
    if target == "dense":  # a stream drifted from the dense one: q, k = dense + noise
        g = torch.Generator().manual_seed(3)
        q, k = qd + 0.3 * torch.randn(qd.shape, generator=g, dtype=D64), kd + 0.3 * torch.randn(kd.shape, generator=g, dtype=D64)
    keep = torch.tensor([[0, 3], [1, 2]])
    angles, weights = causal_offsets(freqs, 7)
    kw = {} if target == "self" else dict(q_cross=cross_grams(q, qd), k_cross=cross_grams(k, kd), qd_second=head_grams(qd),
                                          kd_second=head_grams(kd))
    sol = E.rotary_mix_compensation(head_grams(q), head_grams(k), pairs, keep, GROUP, angles, weights, lam=1e-3,
                                    rounds=0, every_offset=False, **kw)
    n, err, per = lstsq_positional(q, k, pairs, keep, GROUP, angles, weights, 1e-3, qd, kd)
    assert_close(sol.m, n, rtol=1e-8, atol=1e-8)
    assert_close(sol.err_compensated, err, rtol=1e-8, atol=1e-8)
    assert_close(sol.err_per_offset, per, rtol=1e-8, atol=1e-8)
    assert sol.kept.tolist() == [[0, 3, 4, 7], [0, 3, 4, 7], [1, 2, 5, 6], [1, 2, 5, 6]]


def test_mixing_contains_the_complex_scales_so_its_averaged_error_is_no_larger() -> None:
    pairs, freqs = interleaved_pairs(DH), rope_freqs(DH, base=50.0)
    q, k = _random_qk(200, HQ, HKV, DH, seed=5)
    keep = torch.tensor([[0, 2], [1, 3]])
    angles, weights = causal_offsets(freqs, 12)
    gq, gk = head_grams(q), head_grams(k)
    scale = E.rotary_qk_compensation(gq, gk, pairs, keep, GROUP, lam=1e-9, rel_angles=angles, rel_weights=weights,
                                     every_offset=False)
    mix = E.rotary_mix_compensation(gq, gk, pairs, keep, GROUP, angles, weights, lam=1e-9, rounds=0, every_offset=False)
    assert bool((mix.err_compensated <= scale.err_compensated * (1 + 1e-9)).all())
    assert float(mix.err_compensated.sum()) < 0.95 * float(scale.err_compensated.sum())  # and strictly better here
    # the complex scales in the same (d x 2s) form fold to the same rows as fold_rotary_q
    kept, m = E.rotary_correction_matrix(pairs, keep, scale.coef, GROUP)
    wq = torch.randn(HQ * DH, 5, generator=torch.Generator().manual_seed(2), dtype=D64)
    full, _ = E.fold_rotary_q(wq, None, pairs, keep, scale.coef, GROUP)
    narrow, _ = E.fold_rotary_mix(wq, None, torch.arange(HQ), kept, m)
    assert_close(narrow, full[(torch.arange(HQ)[:, None] * DH + kept).reshape(-1)])


@pytest.mark.parametrize("layout", ["split", "interleaved"])
def test_folded_mixing_gives_the_fitted_logits_at_every_position_pair(layout: str) -> None:
    pairs = half_split_pairs(DH) if layout == "split" else interleaved_pairs(DH)
    freqs = rope_freqs(DH, base=20.0)
    g = torch.Generator().manual_seed(31)
    dim, t = 6, 17
    wq = torch.randn(HQ * DH, dim, generator=g, dtype=D64)
    bq = torch.randn(HQ * DH, generator=g, dtype=D64)
    wk = torch.randn(HKV * DH, dim, generator=g, dtype=D64)
    keep = torch.tensor([[1, 2], [0, 3]])
    kept = torch.sort(pairs[keep].reshape(HKV, -1), dim=1).values[GROUP]
    m = torch.randn(HQ, DH, kept.shape[1], generator=g, dtype=D64)
    wq_n, bq_n = E.fold_rotary_mix(wq, bq, torch.arange(HQ), kept, m)
    x = torch.randn(t, dim, generator=g, dtype=D64)
    pos = torch.arange(t)
    q_pre = (x @ wq.T + bq).reshape(t, HQ, DH)
    k_pre = (x @ wk.T).reshape(t, HKV, DH)
    # the folded narrow query, placed at its kept dims, rotated at its own position with the kept pairs' angles
    q_n = torch.zeros(t, HQ, DH, dtype=D64)
    q_n.scatter_(2, kept[None].expand(t, -1, -1), (x @ wq_n.T + bq_n).reshape(t, HQ, -1))
    k_r = rotate(k_pre, pairs, freqs, pos)
    got = torch.einsum("nhd,mhd->hnm", rotate(q_n, pairs, freqs, pos), k_r[:, GROUP])
    # the fitted model: q^T Pi_S R_l k + q^T M (R_l k)_S, R_l the rotation by (m - n) theta
    want = torch.empty_like(got)
    for a in range(t):
        for b in range(t):
            kr = rotate_by(k_pre[b][GROUP], pairs, (b - a) * freqs)  # (Hq, d)
            ks = torch.gather(kr, 1, kept)
            want[:, a, b] = torch.einsum("hd,hd->h", torch.gather(q_pre[a], 1, kept), ks) + \
                torch.einsum("hd,hds,hs->h", q_pre[a], m, ks)
    assert_close(got, want, rtol=1e-10, atol=1e-10)


def _mix_fold(q: Tensor, sol: E.RotaryMixSolution) -> Tensor:
    """q (S, T, Hq, d) before the rotation -> the folded queries at their kept dims (zeros elsewhere)."""
    out = torch.zeros_like(q)
    narrow = torch.einsum("sthd,hdk->sthk", q, sol.m) + torch.gather(q, 3, sol.kept[None, None].expand(*q.shape[:2], -1, -1))
    return out.scatter_(3, sol.kept[None, None].expand(*q.shape[:2], -1, -1), narrow)


def _measured(q_pre: Tensor, k_pre: Tensor, qd_pre: Tensor, kd_pre: Tensor, pairs: Tensor, freqs: Tensor,
              sol: E.RotaryMixSolution, group: Tensor) -> tuple[Tensor, Tensor]:
    """Per-offset (T, Hq) logit errors against the dense logits, with the folded correction and without."""
    pos = torch.arange(q_pre.shape[1])
    rot = lambda v: rotate(v, pairs, freqs, pos)  # noqa: E731
    none = E.RotaryMixSolution(**{**sol.__dict__, "m": torch.zeros_like(sol.m)})
    qd, kd, k = rot(qd_pre), rot(kd_pre), rot(k_pre)
    return (per_offset_errors(qd, kd, rot(_mix_fold(q_pre, sol)), k, group),
            per_offset_errors(qd, kd, rot(_mix_fold(q_pre, none)), k, group))


def test_random_weights_mixing_is_no_worse_than_none_at_every_offset_and_better_on_average() -> None:
    d, t = 16, 48
    pairs, freqs, group = half_split_pairs(d), rope_freqs(d), torch.tensor([0, 0, 1, 1])
    q_pre, k_pre, gq, gk = random_rotary_layer(t)
    angles, weights = causal_offsets(freqs, t)
    keep = E.select_top_per_head(E.rotary_pair_scores(gq, gk, pairs, group, rel_angles=angles, rel_weights=weights), 4)
    sol = E.rotary_mix_compensation(gq, gk, pairs, keep, group, angles, weights)
    # predicted: never above none at any offset, and well below it on average
    assert bool((sol.err_per_offset <= sol.err_per_offset_uncompensated * (1 + 1e-12)).all())
    assert float(sol.err_compensated.sum()) < 0.8 * float(sol.err_uncompensated.sum())
    comp, none = _measured(q_pre, k_pre, q_pre, k_pre, pairs, freqs, sol, group)
    assert_close(torch.einsum("l,lh->h", weights / weights.sum(), comp[:, :]).sum() /
                 torch.einsum("l,lh->h", weights / weights.sum(), none).sum(),
                 sol.err_compensated.sum() / sol.err_uncompensated.sum(), rtol=0.05, atol=0)
    # measured: every offset past 0 (a token with itself: its q and k are dependent, which the fit cannot
    # see) up to the last quarter (few pairs per window) is closer, summed over the heads
    layer = comp.sum(1) / none.sum(1)
    assert bool((layer[1: 3 * t // 4] < 1).all()), layer


@needs_stories
def test_real_stories260k_mixing_is_no_worse_than_none_at_every_offset() -> None:
    """The real model's q/k (layers 0 and 2, 2 of 4 pairs kept per kv head) on 64-token windows of its stories:
    fit on half the windows, measured on the other half at every causal offset of the real rotation."""
    t = 64
    model, ids, group, pairs, freqs = stories_layout(t, 200)
    d = int(model.config.head_dim)
    angles, weights = causal_offsets(freqs, t)
    flat = lambda v: v.reshape(-1, v.shape[2], d)  # noqa: E731
    for layer in (0, 2):
        q_pre, k_pre = _stories_qk(model, ids, layer)
        fit, held = slice(0, None, 2), slice(1, None, 2)
        gq, gk = head_grams(flat(q_pre[fit])), head_grams(flat(k_pre[fit]))
        keep = E.select_top_per_head(E.rotary_pair_scores(gq, gk, pairs, group, rel_angles=angles, rel_weights=weights), 2)
        sol = E.rotary_mix_compensation(gq, gk, pairs, keep, group, angles, weights)
        assert bool((sol.err_per_offset <= sol.err_per_offset_uncompensated * (1 + 1e-12)).all())
        comp, none = _measured(q_pre[held], k_pre[held], q_pre[held], k_pre[held], pairs, freqs, sol, group)
        ratio = comp.sum(1) / none.sum(1)
        wn = weights / weights.sum()
        assert bool((ratio <= 1.0).all()), f"layer {layer}: worse at offsets {torch.nonzero(ratio > 1).flatten().tolist()}"
        assert float(wn @ comp.sum(1)) < 0.9 * float(wn @ none.sum(1))  # and it removes >10% of the error


def test_positional_error_grid_is_the_mixing_solve_of_each_width() -> None:
    pairs, freqs = half_split_pairs(DH), rope_freqs(DH, base=30.0)
    q, k = _random_qk(300, HQ, HKV, DH, seed=4)
    gq, gk = head_grams(q), head_grams(k)
    angles, weights = causal_offsets(freqs, 10)
    scores = E.rotary_pair_scores(gq, gk, pairs, GROUP, rel_angles=angles, rel_weights=weights)
    grid = E.rotary_qk_error_grid(gq, gk, scores, pairs, GROUP, [1, 2, 3, 4], rel_angles=angles, rel_weights=weights)
    for j, w in enumerate([1, 2, 3]):
        sol = E.rotary_mix_compensation(gq, gk, pairs, E.select_top_per_head(scores, w), GROUP, angles, weights)
        assert_close(grid[j], sol.err_compensated, rtol=1e-12, atol=0)
    assert bool((grid[3] == 0).all())  # every pair kept: nothing to correct

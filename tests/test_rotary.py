"""The rotary Q/K pair solve (engine "rotary Q/K pairs"): closed form vs brute force, fold, every position.

Queries and keys are rotated pair by pair at many positions; the complex-scale correction is
fitted to the pooled statistics and must bring the logits closer to the dense ones at every
relative position, on random weights and on the real stories260K Llama's q/k projections.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from corp_cli import engine as E
from tests.conftest import STORIES, STORIES260K, needs_stories

D64 = torch.float64


def half_split_pairs(d: int) -> Tensor:
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], 1)


def interleaved_pairs(d: int) -> Tensor:
    return torch.stack([torch.arange(0, d, 2), torch.arange(1, d, 2)], 1)


def rotate(x: Tensor, pairs: Tensor, freqs: Tensor, pos: Tensor) -> Tensor:
    """x (..., T, H, d) rotated at positions pos (T,): pair p by the angle pos * freqs[p]."""
    ang = pos.to(D64)[:, None] * freqs.to(D64)[None, :]  # (T, P)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    out = x.clone()
    xi, xj = x[..., pairs[:, 0]], x[..., pairs[:, 1]]
    out[..., pairs[:, 0]] = xi * cos - xj * sin
    out[..., pairs[:, 1]] = xi * sin + xj * cos
    return out


def head_grams(x: Tensor) -> Tensor:
    """x (N, H, d) -> (H, d, d) = E[x x^T]."""
    return torch.einsum("nhi,nhj->hij", x, x) / x.shape[0]


def cross_grams(x: Tensor, y: Tensor) -> Tensor:
    return torch.einsum("nhi,nhj->hij", x, y) / x.shape[0]


def brute_force(q: Tensor, k: Tensor, pairs: Tensor, keep: Tensor, group: Tensor, lam: float,
                qd: Tensor | None = None, kd: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Ridge least squares over every materialised (query, key) pair: coef (Hq, s, 2), errors comp/uncomp (Hq,)."""
    qd = q if qd is None else qd
    kd = k if kd is None else kd
    coefs, errs, bases = [], [], []
    for h in range(q.shape[1]):
        g = int(group[h])
        dims = pairs[keep[g]]  # (s, 2)
        qh, kh = q[:, h], k[:, g]
        target = (qd[:, h] @ kd[:, g].T).reshape(-1)
        kept = dims.reshape(-1)
        u = (qh[:, kept] @ kh[:, kept].T).reshape(-1)
        feats = []
        for i, j in dims.tolist():
            feats.append((qh[:, i:i + 1] * kh[:, i][None] + qh[:, j:j + 1] * kh[:, j][None]).reshape(-1))  # a
            feats.append((qh[:, i:i + 1] * kh[:, j][None] - qh[:, j:j + 1] * kh[:, i][None]).reshape(-1))  # b
        phi = torch.stack(feats, 1)
        n = phi.shape[0]
        r = target - u
        theta = torch.linalg.solve(phi.T @ phi / n + lam * torch.eye(phi.shape[1], dtype=D64), phi.T @ r / n)
        coefs.append(theta.reshape(-1, 2))
        errs.append(((r - phi @ theta) ** 2).mean())
        bases.append((r ** 2).mean())
    return torch.stack(coefs), torch.stack(errs), torch.stack(bases)


def _random_qk(n: int, hq: int, hkv: int, d: int, seed: int, corr: float = 0.7) -> tuple[Tensor, Tensor]:
    """Correlated queries/keys from a shared low-rank input (so that pairs predict each other)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=D64)
    x = torch.cat([x, corr * x[:, :3] + torch.randn(n, 3, generator=g, dtype=D64)], 1)
    wq = torch.randn(9, hq * d, generator=g, dtype=D64)
    wk = torch.randn(9, hkv * d, generator=g, dtype=D64)
    return (x @ wq).reshape(n, hq, d), (x @ wk).reshape(n, hkv, d)


HQ, HKV, DH = 4, 2, 8
GROUP = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("lam", [1e-3, 0.5])
@pytest.mark.parametrize("layout", ["split", "interleaved"])
def test_closed_form_equals_brute_force_least_squares_over_all_pairs(lam: float, layout: str) -> None:
    pairs = half_split_pairs(DH) if layout == "split" else interleaved_pairs(DH)
    q, k = _random_qk(40, HQ, HKV, DH, seed=0)
    keep = torch.tensor([[0, 2], [1, 3]])
    sol = E.rotary_qk_compensation(head_grams(q), head_grams(k), pairs, keep, GROUP, lam=lam)
    coef, err, base = brute_force(q, k, pairs, keep, GROUP, lam)
    assert_close(sol.coef, coef, rtol=1e-9, atol=1e-12)
    assert_close(sol.err_compensated, err, rtol=1e-9, atol=1e-9)
    assert_close(sol.err_uncompensated, base, rtol=1e-9, atol=1e-9)
    assert bool((err < base).all())


def test_dense_target_closed_form_equals_brute_force() -> None:
    pairs = half_split_pairs(DH)
    qd, kd = _random_qk(40, HQ, HKV, DH, seed=1)
    g = torch.Generator().manual_seed(2)
    qp = qd + 0.3 * torch.randn(qd.shape, generator=g, dtype=D64)
    kp = kd + 0.3 * torch.randn(kd.shape, generator=g, dtype=D64)
    keep = torch.tensor([[0, 1, 3], [1, 2, 3]])
    sol = E.rotary_qk_compensation(head_grams(qp), head_grams(kp), pairs, keep, GROUP, lam=1e-3,
                                   q_cross=cross_grams(qp, qd), k_cross=cross_grams(kp, kd),
                                   qd_second=head_grams(qd), kd_second=head_grams(kd))
    coef, err, base = brute_force(qp, kp, pairs, keep, GROUP, 1e-3, qd, kd)
    assert_close(sol.coef, coef, rtol=1e-9, atol=1e-12)
    assert_close(sol.err_compensated, err, rtol=1e-9, atol=1e-9)
    assert_close(sol.err_uncompensated, base, rtol=1e-9, atol=1e-9)
    # with every pair kept the dense target still differs from the pruned stream: the grid solves it
    grid = E.rotary_qk_error_grid(head_grams(qp), head_grams(kp), torch.ones(HKV, DH // 2, dtype=D64), pairs, GROUP,
                                  [DH // 2], lam=1e-3, q_cross=cross_grams(qp, qd), k_cross=cross_grams(kp, kd),
                                  qd_second=head_grams(qd), kd_second=head_grams(kd))
    assert bool((grid > 0).all())


def test_self_target_with_cross_stats_of_the_same_stream_is_the_self_solve() -> None:
    pairs = interleaved_pairs(DH)
    q, k = _random_qk(50, HQ, HKV, DH, seed=3)
    gq, gk = head_grams(q), head_grams(k)
    keep = torch.tensor([[3], [0]])
    a = E.rotary_qk_compensation(gq, gk, pairs, keep, GROUP)
    b = E.rotary_qk_compensation(gq, gk, pairs, keep, GROUP, q_cross=gq, k_cross=gk, qd_second=gq, kd_second=gk)
    assert_close(a.coef, b.coef, rtol=1e-8, atol=1e-12)
    assert_close(a.err_compensated, b.err_compensated, rtol=1e-7, atol=1e-7)


def test_pair_scores_are_the_group_energy_of_each_pair_logit_term() -> None:
    pairs = half_split_pairs(DH)
    q, k = _random_qk(30, HQ, HKV, DH, seed=4)
    got = E.rotary_pair_scores(head_grams(q), head_grams(k), pairs, GROUP)
    want = torch.zeros(HKV, DH // 2, dtype=D64)
    for h in range(HQ):
        for p, (i, j) in enumerate(pairs.tolist()):
            logit = q[:, h][:, [i, j]] @ k[:, int(GROUP[h])][:, [i, j]].T
            want[int(GROUP[h]), p] += logit.square().mean()
    assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_error_grid_is_the_solve_of_each_width() -> None:
    pairs = half_split_pairs(DH)
    q, k = _random_qk(30, HQ, HKV, DH, seed=5)
    gq, gk = head_grams(q), head_grams(k)
    scores = E.rotary_pair_scores(gq, gk, pairs, GROUP)
    grid = E.rotary_qk_error_grid(gq, gk, scores, pairs, GROUP, [1, 2, 3, 4])
    for j, w in enumerate([1, 2, 3]):
        sol = E.rotary_qk_compensation(gq, gk, pairs, E.select_top_per_head(scores, w), GROUP)
        assert_close(grid[j], sol.err_compensated)
    assert bool((grid[-1] == 0).all())
    none = E.rotary_qk_error_grid(gq, gk, scores, pairs, GROUP, [1, 2, 3], compensate=False)
    assert bool((grid[:3] <= none + 1e-9).all()) and bool((grid[0] < none[0]).all())


@pytest.mark.parametrize("layout", ["split", "interleaved"])
def test_fold_gives_the_fitted_logits_at_every_position_pair(layout: str) -> None:
    """W_Q folded, then rotated at positions n and m: q'^T k == q^T (Pi_S + M) k for the rotated q, k, every (n, m)."""
    pairs = half_split_pairs(DH) if layout == "split" else interleaved_pairs(DH)
    freqs = 10000.0 ** (-torch.arange(DH // 2, dtype=D64) * 2 / DH)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 17, 5, generator=g, dtype=D64)
    wq = torch.randn(HQ * DH, 5, generator=g, dtype=D64)
    bq = torch.randn(HQ * DH, generator=g, dtype=D64)
    wk = torch.randn(HKV * DH, 5, generator=g, dtype=D64)
    keep = torch.tensor([[0, 3], [1, 2]])
    coef = torch.randn(HQ, 2, 2, generator=g, dtype=D64)
    wqf, bqf = E.fold_rotary_q(wq, bq, pairs, keep, coef, GROUP)
    pos = torch.arange(17) * 3
    q = rotate((x @ wq.T + bq).reshape(2, 17, HQ, DH), pairs, freqs, pos)
    qf = rotate((x @ wqf.T + bqf).reshape(2, 17, HQ, DH), pairs, freqs, pos)
    k = rotate((x @ wk.T).reshape(2, 17, HKV, DH), pairs, freqs, pos)[:, :, GROUP]
    m = torch.zeros(HQ, DH, DH, dtype=D64)
    for h in range(HQ):
        for p, (i, j) in enumerate(pairs[keep[GROUP[h]]].tolist()):
            a, b = coef[h, p].tolist()
            m[h, i, i] = m[h, j, j] = 1.0 + a
            m[h, i, j], m[h, j, i] = b, -b
    want = torch.einsum("snhi,hij,smhj->shnm", q, m, k)
    got = torch.einsum("snhi,smhi->shnm", qf, k)
    assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the compacted rows in the layout's own order carry everything: removed pairs' rows are zero
    dims = E.rotary_kept_dims(pairs, keep, split=layout == "split")
    if layout == "split":
        assert dims.tolist() == [[0, 3, 4, 7], [1, 2, 5, 6]]
    else:
        assert dims.tolist() == [[0, 1, 6, 7], [2, 3, 4, 5]]
    rows = (torch.arange(HQ)[:, None] * DH + dims[GROUP]).reshape(-1)
    others = torch.ones(HQ * DH, dtype=torch.bool)
    others[rows] = False
    assert bool((wqf[others] == 0).all()) and bool((bqf[others] == 0).all())

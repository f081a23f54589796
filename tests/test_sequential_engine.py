"""The sequential target solves (engine, docs/method.md §10) against the paper's solve and brute force."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from corp_cli import engine as E


def _features(n: int = 3000, d: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + torch.randn(d, generator=g, dtype=torch.float64)


def _stats(h: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    st = E.mlp_batch_stats(h)
    st.update(E.target_batch_stats(t, h))
    return E.add_stats(None, st)


def test_self_target_is_the_papers_ridge_solve_exactly() -> None:
    h = _features()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 10, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    st = _stats(h, h @ w.T + b)
    keep, prune = torch.tensor([0, 2, 3, 5, 7, 8]), torch.tensor([1, 4, 6, 9])
    for intercept in (True, False):
        m = E.fit_moments(st, intercept=intercept)
        lam = E.oas_lambda(m.cov[keep][:, keep], m.n)
        sol = E.ridge_compensation(m, keep, prune, lam)
        w_ref, b_ref = E.fold_mlp_output(w, b if intercept else None, keep, prune, sol)
        tgt = E.target_compensation(st, w, b if intercept else None, keep, lam, intercept=intercept)
        if intercept:
            assert_close(tgt.weight, w_ref, rtol=0, atol=1e-10)
            assert_close(tgt.bias, b_ref, rtol=0, atol=1e-10)
            # and the predicted error is the paper's tr(W_P R W_P^T)
            err = E.mlp_predicted_error(w, m, keep, prune, sol.b)
            assert abs(tgt.err_compensated - err) < 1e-9 * max(1.0, err)
            unc = E.mlp_predicted_error(w, m, keep, prune, None)
            assert abs(tgt.err_uncompensated - unc) < 1e-9 * max(1.0, unc)
        else:  # t = W h with no bias: the intercept-free fit
            st0 = _stats(h, h @ w.T)
            tgt0 = E.target_compensation(st0, w, None, keep, lam, intercept=False)
            w0, _ = E.fold_mlp_output(w, None, keep, prune, sol)
            assert_close(tgt0.weight, w0, rtol=0, atol=1e-10)
            assert tgt0.bias is None


def test_dense_target_is_the_brute_force_ridge_least_squares() -> None:
    h = _features(n=800)
    g = torch.Generator().manual_seed(2)
    t = torch.randn(800, 3, generator=g, dtype=torch.float64) + h[:, :3] * 0.5
    w = torch.randn(3, 10, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    keep = torch.tensor([1, 2, 4, 6, 9])
    st = _stats(h, t)
    n, lam = h.shape[0], 0.3
    for intercept in (True, False):
        tgt = E.target_compensation(st, w, b if intercept else None, keep, lam, intercept=intercept)
        # min sum_n ||t - W' h_S - b'||^2 + n lam ||W' - W_S||^2, intercept unpenalised
        hs = h[:, keep]
        cols = [hs, torch.ones(n, 1, dtype=torch.float64)] if intercept else [hs]
        a = torch.cat(cols, 1)
        pen = torch.zeros(len(keep), a.shape[1], dtype=torch.float64)
        pen[:, :len(keep)] = torch.eye(len(keep), dtype=torch.float64) * (n * lam) ** 0.5
        rhs = torch.cat([t, (n * lam) ** 0.5 * w[:, keep].T])
        sol = torch.linalg.lstsq(torch.cat([a, pen]), rhs).solution
        assert_close(tgt.weight, sol[:len(keep)].T, rtol=0, atol=1e-9)
        pred = hs @ tgt.weight.T
        if intercept:
            assert_close(tgt.bias, sol[len(keep)], rtol=0, atol=1e-9)
            pred = pred + tgt.bias
        measured = float((t - pred).square().sum(1).mean())
        assert abs(tgt.err_compensated - measured) < 1e-9 * measured
        before = hs @ w[:, keep].T + (b if intercept else 0)
        assert abs(tgt.err_uncompensated - float((t - before).square().sum(1).mean())) < 1e-9 * measured


def _heads(n: int, h: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(h, d, d, generator=g, dtype=torch.float64)
    return torch.einsum("hnd,hde->hne", torch.randn(h, n, d, generator=g, dtype=torch.float64), mix)


def _qk_moments(qp, kp, qd, kd):
    st = E.qk_batch_stats(qp[None], kp[None])
    st.update(E.qk_cross_batch_stats(qp[None], kp[None], qd[None], kd[None]))
    n = int(st["count"].sum())
    return {k: v / n for k, v in st.items() if k != "count"}


def test_qk_self_target_is_todays_logit_solve() -> None:
    q, k = _heads(400, 2, 6, 0), _heads(400, 2, 6, 1)
    mo = _qk_moments(q, k, q, k)
    keep = torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]])
    prune = torch.stack([E.complement(x, 6) for x in keep])
    ref = E.qk_compensation(mo["q_gram"], mo["k_gram"], keep, prune, scale=0.5)
    tgt = E.qk_target_compensation(mo["q_gram"], mo["k_gram"], mo["q_cross"], mo["k_cross"], mo["qd_gram"],
                                   mo["kd_gram"], keep, scale=0.5)
    assert_close(tgt.m, ref.m, rtol=0, atol=1e-10)
    assert_close(tgt.err_compensated, ref.err_compensated, rtol=1e-9, atol=1e-10)
    assert_close(tgt.err_uncompensated, ref.err_uncompensated, rtol=1e-9, atol=1e-10)


def test_qk_dense_target_is_brute_force_over_independent_pairs() -> None:
    nq, nh, d = 60, 2, 5
    qp, kp = _heads(nq, nh, d, 3), _heads(nq, nh, d, 4)
    qd, kd = qp + 0.3 * _heads(nq, nh, d, 5), kp + 0.3 * _heads(nq, nh, d, 6)
    mo = _qk_moments(qp, kp, qd, kd)
    keep = torch.tensor([[0, 1, 3], [2, 3, 4]])
    lam = 0.05
    tgt = E.qk_target_compensation(mo["q_gram"], mo["k_gram"], mo["q_cross"], mo["k_cross"], mo["qd_gram"],
                                   mo["kd_gram"], keep, lam=lam)
    for h in range(nh):
        s = keep[h]
        qs, ks = qp[h][:, s], kp[h][:, s]
        # every (query token, key token) pair: feature vec(q_S k_S^T), target q_d.k_d - q_S.k_S
        phi = torch.einsum("ia,jb->ijab", qs, ks).reshape(nq * nq, -1)
        y = (qd[h] @ kd[h].T - qs @ ks.T).reshape(-1)
        p = phi.shape[0]
        a = torch.cat([phi / p**0.5, lam**0.5 * torch.eye(phi.shape[1], dtype=torch.float64)])
        r = torch.cat([y / p**0.5, torch.zeros(phi.shape[1], dtype=torch.float64)])
        m = torch.linalg.lstsq(a, r).solution.reshape(len(s), len(s))
        assert_close(tgt.m[h], m, rtol=0, atol=1e-9)
        resid = float(((qd[h] @ kd[h].T) - qs @ (torch.eye(len(s), dtype=torch.float64) + m) @ ks.T).square().mean())
        assert abs(float(tgt.err_compensated[h]) - resid) < 1e-9 * max(resid, 1.0)


def test_blend_is_the_dense_fit_when_the_folds_agree_and_a_convex_mix_otherwise() -> None:
    h = _features(n=600)
    g = torch.Generator().manual_seed(4)
    t = torch.randn(600, 3, generator=g, dtype=torch.float64) + h[:, :3]
    w = torch.randn(3, 10, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 3, 4, 8])
    half = _stats(h[:300], t[:300])
    # two identical folds: the fit on one is the best on the other, so the dense fit (a = 1) wins
    same = E.add_stats(None, half)
    same = {k: 2 * v for k, v in same.items()}
    same.update({E.CV_PREFIX + k: v for k, v in half.items()})
    sol, a, cv = E.blended_target_compensation(same, w, b, keep, 0.1)
    assert a == 1.0 and cv.index(min(cv)) == len(cv) - 1
    full = E.target_compensation(same, w, b, keep, 0.1)
    assert_close(sol.weight, full.weight, rtol=0, atol=1e-12)
    # different folds: whatever a it picks, the weights are that mix of the self and dense fits
    st = _stats(h, t)
    st.update({E.CV_PREFIX + k: v for k, v in _stats(h[:300], t[:300]).items()})
    sol, a, cv = E.blended_target_compensation(st, w, b, keep, 0.1)
    assert a in E.BLEND_GRID and cv[E.BLEND_GRID.index(a)] == min(cv)
    m = E.fit_moments(st)
    prune = E.complement(keep, 10)
    ws, bs = E.fold_mlp_output(w, b, keep, prune, E.ridge_compensation(m, keep, prune, 0.1))
    dense = E.target_compensation(st, w, b, keep, 0.1)
    assert_close(sol.weight, (1 - a) * ws + a * dense.weight, rtol=0, atol=1e-10)


def test_blend_cv_errors_are_the_held_out_fold_errors_of_every_candidate_mix() -> None:
    """Each cross-validated error is the materialised mean squared error, on the other fold's rows, of the
    (1 - a) self + a dense mix fit on one fold, summed over the two folds (the parabola in a is exact)."""
    h = _features(n=600, seed=5)
    g = torch.Generator().manual_seed(6)
    t = torch.randn(600, 3, generator=g, dtype=torch.float64) + h[:, :3] @ torch.randn(3, 3, generator=g,
                                                                                       dtype=torch.float64)
    w = torch.randn(3, 10, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    keep = torch.tensor([1, 2, 5, 7, 9])
    prune = E.complement(keep, 10)
    halves = [(h[:250], t[:250]), (h[250:], t[250:])]  # unequal folds
    st = _stats(h, t)
    st.update({E.CV_PREFIX + k: v for k, v in _stats(*halves[0]).items()})
    _, _, cv = E.blended_target_compensation(st, w, b, keep, 0.1)
    expect = [0.0] * len(E.BLEND_GRID)
    for (hf, tf), (hc, tc) in ((halves[0], halves[1]), (halves[1], halves[0])):
        fit = _stats(hf, tf)
        ws, bs = E.fold_mlp_output(w, b, keep, prune, E.ridge_compensation(E.fit_moments(fit), keep, prune, 0.1))
        dense = E.target_compensation(fit, w, b, keep, 0.1)
        for j, a in enumerate(E.BLEND_GRID):
            wa, ba = (1 - a) * ws + a * dense.weight, (1 - a) * bs + a * dense.bias
            expect[j] += float((tc - hc[:, keep] @ wa.T - ba).square().sum(1).mean())
    assert_close(torch.tensor(cv), torch.tensor(expect), rtol=1e-9, atol=0)

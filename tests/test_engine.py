"""Closed-form checks of the engine on planted data whose right answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from corp_cli import engine as E


def _planted_mlp(n: int = 4000, ds: int = 12, dp: int = 6, out: int = 5, seed: int = 0):
    """Hidden units whose last dp are exactly affine in the first ds."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, ds, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, ds, dtype=torch.float64)
    a = torch.randn(dp, ds, generator=g, dtype=torch.float64)
    c0 = torch.randn(dp, generator=g, dtype=torch.float64)
    hp = hs @ a.T + c0
    h = torch.cat([hs, hp], 1)
    w2 = torch.randn(out, ds + dp, generator=g, dtype=torch.float64)
    b2 = torch.randn(out, generator=g, dtype=torch.float64)
    return h, w2, b2, a, c0


def test_ridge_reproduces_planted_affine_structure_exactly() -> None:
    h, w2, b2, a, c0 = _planted_mlp()
    stats = E.mlp_batch_stats(h)
    m = E.mlp_moments(stats)
    keep, prune = torch.arange(12), torch.arange(12, 18)
    sol = E.ridge_compensation(m, keep, prune, lam=1e-12)
    assert_close(sol.b, a, rtol=1e-7, atol=1e-7)
    assert_close(sol.c, c0, rtol=1e-7, atol=1e-7)
    w1 = torch.randn(18, 4, dtype=torch.float64)
    _, _, w2n, b2n = E.fold_mlp(w1, None, w2, b2, keep, prune, sol)
    y_dense = h @ w2.T + b2
    y_pruned = h[:, keep] @ w2n.T + b2n
    assert_close(y_pruned, y_dense, rtol=1e-7, atol=1e-7)
    assert E.mlp_predicted_error(w2, m, keep, prune, sol.b) < 1e-12


def test_predicted_error_matches_measured_and_compensation_never_hurts() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3000, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 20, generator=g, dtype=torch.float64)
    h = torch.nn.functional.gelu(h) + 0.3
    w2 = torch.randn(7, 20, generator=g, dtype=torch.float64)
    m = E.mlp_moments(E.mlp_batch_stats(h))
    keep, prune = torch.arange(0, 20, 2), torch.arange(1, 20, 2)
    lam = E.oas_lambda(m.cov[keep][:, keep], m.n)
    sol = E.ridge_compensation(m, keep, prune, lam)
    _, _, w2n, b2n = E.fold_mlp(torch.zeros(20, 3, dtype=torch.float64), None, w2, torch.zeros(7, dtype=torch.float64), keep, prune, sol)
    _, _, w2u, b2u = E.fold_mlp(torch.zeros(20, 3, dtype=torch.float64), None, w2, torch.zeros(7, dtype=torch.float64), keep, prune, None)
    y = h @ w2.T
    err_c = ((y - (h[:, keep] @ w2n.T + b2n)) ** 2).sum(1).mean()
    err_u = ((y - (h[:, keep] @ w2u.T + b2u)) ** 2).sum(1).mean()
    assert_close(float(err_c), E.mlp_predicted_error(w2, m, keep, prune, sol.b), rtol=1e-9, atol=1e-12)
    assert_close(float(err_u), E.mlp_predicted_error(w2, m, keep, prune, None), rtol=1e-9, atol=1e-12)
    assert err_c <= err_u


def test_intercept_free_fit_is_exact_on_linear_units_and_folds_no_bias() -> None:
    """Without a bias to hold W2_P c (Llama's down_proj), h_P ~ B h_S on uncentred moments."""
    h, w2, _, a, _ = _planted_mlp()
    h = torch.cat([h[:, :12] + 0.7, (h[:, :12] + 0.7) @ a.T], 1)  # h_P linear in h_S, and nonzero means
    stats = E.mlp_batch_stats(h)
    m = E.fit_moments(stats, intercept=False)
    assert torch.equal(m.mean, torch.zeros(18, dtype=torch.float64)) and torch.equal(m.cov, m.second)
    keep, prune = torch.arange(12), torch.arange(12, 18)
    sol = E.ridge_compensation(m, keep, prune, lam=1e-12)
    assert_close(sol.b, a, rtol=1e-7, atol=1e-7)
    assert not bool(sol.c.any())
    w2n, b2n = E.fold_mlp_output(w2, None, keep, prune, sol)
    assert b2n is None
    assert_close(h[:, keep] @ w2n.T, h @ w2.T, rtol=1e-7, atol=1e-7)
    assert E.mlp_predicted_error(w2, m, keep, prune, sol.b) < 1e-12


def test_intercept_free_predicted_error_is_measured_and_never_worse_than_none() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 16, generator=g, dtype=torch.float64)
    h = torch.nn.functional.silu(x @ torch.randn(16, 20, generator=g, dtype=torch.float64)) * (
        x @ torch.randn(16, 20, generator=g, dtype=torch.float64))  # a gated MLP's hidden units
    w2 = torch.randn(7, 20, generator=g, dtype=torch.float64)
    m = E.fit_moments(E.mlp_batch_stats(h), intercept=False)
    keep, prune = torch.arange(0, 20, 2), torch.arange(1, 20, 2)
    sol = E.ridge_compensation(m, keep, prune, E.oas_lambda(m.cov[keep][:, keep], m.n))
    w2n, b2n = E.fold_mlp_output(w2, None, keep, prune, sol)
    assert b2n is None
    y = h @ w2.T
    err_c = float(((y - h[:, keep] @ w2n.T) ** 2).sum(1).mean())
    err_u = float(((y - h[:, keep] @ w2[:, keep].T) ** 2).sum(1).mean())
    assert_close(err_c, E.mlp_predicted_error(w2, m, keep, prune, sol.b), rtol=1e-9, atol=1e-12)
    assert_close(err_u, E.mlp_predicted_error(w2, m, keep, prune, None), rtol=1e-9, atol=1e-12)
    assert err_c < err_u


@pytest.mark.parametrize("case", ["rank_deficient", "dead_units", "all_dead"])
def test_auto_lambda_finite_and_solve_defined_on_degenerate_covariances(case: str) -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(500, 16, generator=g, dtype=torch.float64)
    if case == "rank_deficient":
        h = h[:, :4] @ torch.randn(4, 16, generator=g, dtype=torch.float64)
    elif case == "dead_units":
        h[:, [1, 5, 9]] = 0.0
    else:
        h = torch.zeros(500, 16, dtype=torch.float64)
    m = E.mlp_moments(E.mlp_batch_stats(h))
    keep, prune = torch.arange(10), torch.arange(10, 16)
    lam = E.oas_lambda(m.cov[keep][:, keep], m.n)
    assert math.isfinite(lam) and lam > 0
    sol = E.ridge_compensation(m, keep, prune, lam)
    assert torch.isfinite(sol.b).all() and torch.isfinite(sol.c).all()
    if case == "rank_deficient":
        # h_P is linear in h_S here, so a working solve leaves almost nothing
        w2 = torch.randn(3, 16, generator=g, dtype=torch.float64)
        assert E.mlp_predicted_error(w2, m, keep, prune, sol.b) < 1e-3 * E.mlp_predicted_error(w2, m, keep, prune, None)


def test_singular_solve_raises_lambda_instead_of_zero_correction(caplog: pytest.LogCaptureFixture) -> None:
    h = torch.randn(200, 4, dtype=torch.float64)
    h = torch.cat([h, h[:, :1], h[:, 1:2] * 2], 1)  # units 4, 5 duplicate 0, 1
    m = E.mlp_moments(E.mlp_batch_stats(h))
    keep = torch.tensor([0, 1, 2, 3, 4])
    prune = torch.tensor([5])
    sol = E.ridge_compensation(m, keep, prune, lam=0.0)  # exactly singular Sigma_SS
    assert sol.lam > 0
    assert "lambda raised" in caplog.text
    assert sol.b.abs().sum() > 0.5


def test_oas_lambda_formula() -> None:
    s = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    n, p = 50, 4
    tr, tr2 = 10.0, 30.0
    rho = min(1.0, ((1 - 2 / p) * tr2 + tr**2) / ((n + 1 - 2 / p) * (tr2 - tr**2 / p)))
    assert_close(E.oas_lambda(s, n), rho * tr / p)
    assert E.oas_lambda(s, n, lambda0=100.0) == 100.0


def test_float32_products_match_float64_accumulation() -> None:
    g = torch.Generator().manual_seed(3)
    acc32 = acc64 = None
    for _ in range(8):
        h = torch.nn.functional.gelu(torch.randn(4, 197, 96, generator=g))
        acc32 = E.add_stats(acc32, E.mlp_batch_stats(h, torch.float32))
        acc64 = E.add_stats(acc64, E.mlp_batch_stats(h, torch.float64))
    assert acc32 is not None and acc64 is not None
    assert_close(acc32["gram"], acc64["gram"], rtol=1e-6, atol=1e-6 * float(acc64["gram"].abs().max()))
    assert torch.equal(acc32["abs_hist"], acc64["abs_hist"])


def test_abs_histogram_bins_match_edges() -> None:
    vals = torch.tensor([0.0, 1e-9, 0.01, 0.3, 1.0, 1.2, 1.26, 7.9, 1e9]).reshape(1, -1, 1).repeat(1, 1, 1)
    hist = E.mlp_batch_stats(vals.reshape(-1, 1))["abs_hist"][0]
    edges = E.abs_hist_bin_lower_edges()
    idx = torch.nonzero(hist).flatten()
    for v in [0.01, 0.3, 1.0, 1.2, 1.26, 7.9]:
        b = int(torch.searchsorted(edges, torch.tensor(v, dtype=torch.float64), right=True)) - 1
        assert hist[b] >= 1, v
    assert hist[0] == 2 and hist[-1] == 1  # zero and tiny in bin 0, huge in the overflow bin
    assert int(hist.sum()) == 9 and len(idx) >= 6


def test_active_energy_discounts_mostly_silent_units() -> None:
    g = torch.Generator().manual_seed(4)
    n = 10000
    busy = torch.randn(n, generator=g) * 1.0
    spiky = torch.zeros(n)
    spiky[:100] = 10.0  # same energy as `busy`, active 1% of the time
    h = torch.stack([busy, spiky], 1)
    st = E.mlp_batch_stats(h)
    energy = E.energy_scores(st)
    active = E.active_energy_scores(st)
    assert_close(energy[0], energy[1], rtol=0.05, atol=0)
    assert active[1] < 0.05 * active[0]


def test_keep_count_rounding() -> None:
    assert E.keep_count(768, 0.5) == 384
    assert E.keep_count(768, 0.3) == 768 - 230
    assert E.keep_count(768, 0.3, round_to=64) == 512
    assert E.keep_count(100, 0.95, round_to=8) == 8
    assert E.keep_count(100, 0.99, min_keep=10) == 10
    assert E.keep_count(64, 0.0, round_to=48) == 64
    with pytest.raises(ValueError):
        E.keep_count(10, 1.0)


def test_select_top_is_deterministic_with_ties() -> None:
    s = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert E.select_top(s, 2).tolist() == [1, 2]
    assert E.complement(torch.tensor([1, 2]), 5).tolist() == [0, 3, 4]


def test_obs_greedy_matches_exhaustive_single_removal_error() -> None:
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2000, 8, generator=g, dtype=torch.float64) @ (torch.randn(8, 8, generator=g, dtype=torch.float64) + 3 * torch.eye(8, dtype=torch.float64))
    w2 = torch.randn(4, 8, generator=g, dtype=torch.float64)
    m = E.mlp_moments(E.mlp_batch_stats(h))
    lam = 1e-9
    scores = E.obs_scores(w2, m.cov, lam)
    for j in range(8):
        keep = torch.tensor([i for i in range(8) if i != j])
        sol = E.ridge_compensation(m, keep, torch.tensor([j]), lam)
        assert_close(float(scores[j]), E.mlp_predicted_error(w2, m, keep, torch.tensor([j]), sol.b), rtol=1e-6, atol=1e-9)
    keep = E.obs_greedy_keep(w2, m.cov, lam, keep=6)
    assert keep.tolist() == sorted(keep.tolist()) and len(keep) == 6
    # the first removal is the cheapest single unit
    assert int(torch.argmin(scores)) not in keep.tolist()


def test_obs_greedy_second_step_sees_the_updated_error() -> None:
    """After one removal, the next greedy choice is the cheapest given the first (exhaustive check)."""
    g = torch.Generator().manual_seed(11)
    h = torch.randn(3000, 7, generator=g, dtype=torch.float64) @ (torch.randn(7, 7, generator=g, dtype=torch.float64) + 2 * torch.eye(7, dtype=torch.float64))
    w2 = torch.randn(3, 7, generator=g, dtype=torch.float64)
    m = E.mlp_moments(E.mlp_batch_stats(h))
    lam = 1e-10
    keep5 = E.obs_greedy_keep(w2, m.cov, lam, keep=5, rounds=2)
    first = int(torch.argmin(E.obs_scores(w2, m.cov, lam)))
    best, best_err = None, float("inf")
    for j in range(7):
        if j == first:
            continue
        keep = torch.tensor([i for i in range(7) if i not in (first, j)])
        prune = torch.tensor(sorted([first, j]))
        sol = E.ridge_compensation(m, keep, prune, lam)
        err = E.mlp_predicted_error(w2, m, keep, prune, sol.b)
        if err < best_err:
            best, best_err = j, err
    assert sorted(set(range(7)) - set(keep5.tolist())) == sorted([first, best])
    # grouped rounds give a valid keep set too
    assert len(E.obs_greedy_keep(w2, m.cov, lam, keep=3, rounds=2)) == 3


# ---------------------------------------------------------------- Q/K logit compensation


def _planted_qk(n: int = 3000, heads: int = 3, d: int = 8, dp: int = 3, seed: int = 6):
    """q_P and k_P exactly linear in q_S/k_S, so the lost logit term is q_S^T A^T C k_S."""
    g = torch.Generator().manual_seed(seed)
    ds = d - dp
    qs = torch.randn(heads, n, ds, generator=g, dtype=torch.float64)
    ks = torch.randn(heads, n, ds, generator=g, dtype=torch.float64)
    a = torch.randn(heads, dp, ds, generator=g, dtype=torch.float64)
    c = torch.randn(heads, dp, ds, generator=g, dtype=torch.float64)
    q = torch.cat([qs, qs @ a.transpose(1, 2)], -1)
    k = torch.cat([ks, ks @ c.transpose(1, 2)], -1)
    return q, k, a.transpose(1, 2) @ c  # M* = A^T C


def test_qk_compensation_recovers_exact_logits_on_planted_data() -> None:
    q, k, m_true = _planted_qk()
    heads, n, d = q.shape
    st = E.qk_batch_stats(q[None], k[None])
    gq, gk = st["q_gram"] / n, st["k_gram"] / n
    keep = torch.arange(5).repeat(heads, 1)
    prune = torch.arange(5, 8).repeat(heads, 1)
    sol = E.qk_compensation(gq, gk, keep, prune, lam=1e-14, scale=d**-0.5)
    assert_close(sol.m, m_true, rtol=1e-6, atol=1e-6)
    assert float(sol.err_compensated.max()) < 1e-8 * float(sol.err_uncompensated.min())
    g = torch.Generator().manual_seed(9)
    wq = torch.randn(heads, d, 16, generator=g, dtype=torch.float64)
    wk = torch.randn(heads, d, 16, generator=g, dtype=torch.float64)
    # planted weights: the pruned Q/K rows are combinations of the kept ones
    wq[:, 5:] = torch.randn(heads, 3, 5, generator=g, dtype=torch.float64) @ wq[:, :5]
    wk[:, 5:] = torch.randn(heads, 3, 5, generator=g, dtype=torch.float64) @ wk[:, :5]
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    qd = torch.einsum("hdi,ni->hnd", wq, x)
    kd = torch.einsum("hdi,ni->hnd", wk, x)
    logits = qd @ kd.transpose(1, 2)
    st2 = E.qk_batch_stats(qd[None], kd[None])
    sol2 = E.qk_compensation(st2["q_gram"] / 200, st2["k_gram"] / 200, keep, prune, lam=1e-14)
    for balanced in (False, True):
        wqn, _, wkn, _ = E.fold_qk(wq.reshape(-1, 16), None, wk.reshape(-1, 16), None, keep, sol2.m, balanced=balanced)
        qn = torch.einsum("hdi,ni->hnd", wqn.reshape(heads, 5, 16), x)
        kn = torch.einsum("hdi,ni->hnd", wkn.reshape(heads, 5, 16), x)
        assert_close(qn @ kn.transpose(1, 2), logits, rtol=1e-6, atol=1e-6)


def kronecker_qk_solve(gq_ss: torch.Tensor, gk_ss: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """Brute-force O(d^6) solve of G_Q M G_K + lam M = R: vec(A M B) = (B^T kron A) vec(M)."""
    d = gq_ss.shape[0]
    system = torch.kron(gk_ss.T.contiguous(), gq_ss) + lam * torch.eye(d * d, dtype=gq_ss.dtype)
    vec = torch.linalg.solve(system, rhs.T.reshape(-1))
    return vec.reshape(d, d).T


def test_qk_eigen_solve_matches_kronecker_solve() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    y = torch.randn(2, 400, 6, generator=g, dtype=torch.float64)
    st = E.qk_batch_stats(x[None], y[None])
    gq, gk = st["q_gram"] / 400, st["k_gram"] / 400
    keep = torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]])
    prune = torch.tensor([[1, 4], [0, 3]])
    lam = 0.05
    sol = E.qk_compensation(gq, gk, keep, prune, lam=lam)
    for h in range(2):
        gqs = gq[h][keep[h]][:, keep[h]]
        gks = gk[h][keep[h]][:, keep[h]]
        rhs = gq[h][keep[h]][:, prune[h]] @ gk[h][prune[h]][:, keep[h]]
        assert_close(sol.m[h], kronecker_qk_solve(gqs, gks, rhs, lam), rtol=1e-9, atol=1e-10)


def test_qk_predicted_error_matches_all_pairs_error() -> None:
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    k = torch.randn(2, 200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    gq = q.transpose(1, 2) @ q / 300
    gk = k.transpose(1, 2) @ k / 200
    keep = torch.tensor([[0, 1, 2, 3]] * 2)
    prune = torch.tensor([[4, 5]] * 2)
    sol = E.qk_compensation(gq, gk, keep, prune, lam=0.0 + 1e-3, scale=0.5)
    dense = q @ k.transpose(1, 2) * 0.5
    qs, ks = q[..., :4], k[..., :4]
    comp = (qs @ (torch.eye(4, dtype=torch.float64) + sol.m) @ ks.transpose(1, 2)) * 0.5
    unc = (qs @ ks.transpose(1, 2)) * 0.5
    assert_close(((dense - comp) ** 2).mean((1, 2)), sol.err_compensated, rtol=1e-8, atol=1e-10)
    assert_close(((dense - unc) ** 2).mean((1, 2)), sol.err_uncompensated, rtol=1e-8, atol=1e-10)
    assert (sol.err_compensated <= sol.err_uncompensated).all()

"""The rotary Q/K pair solve (engine "rotary Q/K pairs"): closed form vs brute force, fold, every position.

Queries and keys are rotated pair by pair at many positions; the complex-scale correction is
fitted to the pooled statistics and must bring the logits closer to the dense ones at every
relative position, on random weights and on the real stories260K Llama's q/k projections.
"""

from __future__ import annotations


import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from corp_cli import engine as E
from .conftest import STORIES, STORIES260K, needs_stories

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


def rotate_by(x: Tensor, pairs: Tensor, angles: Tensor) -> Tensor:
    """x (N, d) with pair p rotated by angles[p]."""
    cos, sin = angles.cos(), angles.sin()
    out = x.clone()
    xi, xj = x[:, pairs[:, 0]], x[:, pairs[:, 1]]
    out[:, pairs[:, 0]] = xi * cos - xj * sin
    out[:, pairs[:, 1]] = xi * sin + xj * cos
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


# --- the positional fit: moments before the rotation, the logit at every relative offset ---


def rope_freqs(d: int, base: float = 10000.0) -> Tensor:
    return base ** (-torch.arange(d // 2, dtype=D64) * 2 / d)


def causal_offsets(freqs: Tensor, t: int) -> tuple[Tensor, Tensor]:
    """Angles (T, P) for query-minus-key offsets 0..T-1 (the key sits l tokens back), weighted by how often each occurs in a window of T."""
    off = torch.arange(t, dtype=D64)
    return -off[:, None] * freqs[None, :], t - off


def per_offset_errors(q_dense: Tensor, k_dense: Tensor, q_model: Tensor, k_model: Tensor, group: Tensor) -> Tensor:
    """Mean squared logit difference at each causal offset l = n - m, per query head: (T, Hq).

    All four are ROTATED (S, T, H, d): the dense q/k, and the model's (pruned, maybe corrected) q/k.
    """
    dense = torch.einsum("snhd,smhd->shnm", q_dense, k_dense[:, :, group])
    model = torch.einsum("snhd,smhd->shnm", q_model, k_model[:, :, group])
    err = (dense - model) ** 2
    return torch.stack([torch.diagonal(err, offset=-lag, dim1=2, dim2=3).mean((0, 2)) for lag in range(q_dense.shape[1])])


def fold_vectors(q: Tensor, pairs: Tensor, keep: Tensor, coef: Tensor, group: Tensor) -> Tensor:
    """fold_rotary_q applied to pre-rotation query vectors (S, T, Hq, d) through a linear map: W_Q = I per head."""
    hq, d = q.shape[2], q.shape[3]
    eye = torch.eye(hq * d, dtype=D64)
    w, _ = E.fold_rotary_q(eye, None, pairs, keep, coef, group)
    return (q.reshape(*q.shape[:2], hq * d) @ w.T).reshape(q.shape)


def brute_force_positional(q: Tensor, k: Tensor, pairs: Tensor, keep: Tensor, group: Tensor, angles: Tensor,
                           weights: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Weighted ridge least squares over every (query, key, offset) triple; q, k (N, H, d) before the rotation."""
    coefs, errs = [], []
    w = weights / weights.sum()
    for h in range(q.shape[1]):
        g = int(group[h])
        rows, rhs, wts = [], [], []
        for lag in range(angles.shape[0]):
            kr = rotate_by(k[:, g], pairs, angles[lag])  # R_l k
            qh = q[:, h]
            dense = (qh @ kr.T).reshape(-1)
            kept = pairs[keep[g]].reshape(-1)
            u = (qh[:, kept] @ kr[:, kept].T).reshape(-1)
            feats = []
            for i, j in pairs[keep[g]].tolist():
                feats.append((qh[:, i:i + 1] * kr[:, i][None] + qh[:, j:j + 1] * kr[:, j][None]).reshape(-1))
                feats.append((qh[:, i:i + 1] * kr[:, j][None] - qh[:, j:j + 1] * kr[:, i][None]).reshape(-1))
            rows.append(torch.stack(feats, 1))
            rhs.append(dense - u)
            wts.append(torch.full_like(u, float(w[lag]) / u.numel()))
        phi, r, wt = torch.cat(rows), torch.cat(rhs), torch.cat(wts)
        a = phi.T @ (phi * wt[:, None]) + lam * torch.eye(phi.shape[1], dtype=D64)
        theta = torch.linalg.solve(a, phi.T @ (r * wt))
        coefs.append(theta.reshape(-1, 2))
        errs.append((wt * (r - phi @ theta) ** 2).sum())
    return torch.stack(coefs), torch.stack(errs)


def test_positional_fit_equals_brute_force_over_query_key_offset_triples() -> None:
    pairs, freqs = half_split_pairs(DH), rope_freqs(DH, base=30.0)
    q, k = _random_qk(25, HQ, HKV, DH, seed=7)
    keep = torch.tensor([[0, 3], [1, 2]])
    angles, weights = causal_offsets(freqs, 9)
    sol = E.rotary_qk_compensation(head_grams(q), head_grams(k), pairs, keep, GROUP, lam=1e-3,
                                   rel_angles=angles, rel_weights=weights, every_offset=False)
    coef, err = brute_force_positional(q, k, pairs, keep, GROUP, angles, weights, lam=1e-3)
    assert_close(sol.coef, coef, rtol=1e-8, atol=1e-11)
    assert_close(sol.err_compensated, err, rtol=1e-8, atol=1e-8)
    assert sol.err_per_offset is not None and sol.err_per_offset_uncompensated is not None
    assert_close(torch.einsum("l,lh->h", weights / weights.sum(), sol.err_per_offset), sol.err_compensated)
    # shortened to help at every offset: never above the uncompensated error at any offset
    safe = E.rotary_qk_compensation(head_grams(q), head_grams(k), pairs, keep, GROUP, lam=1e-3,
                                    rel_angles=angles, rel_weights=weights)
    assert safe.err_per_offset is not None and safe.err_per_offset_uncompensated is not None
    assert bool((safe.err_per_offset <= safe.err_per_offset_uncompensated * (1 + 1e-12)).all())
    ratio = safe.coef.norm(dim=(1, 2)) / sol.coef.norm(dim=(1, 2))
    assert bool((ratio <= 1 + 1e-12).all())


def _sequences(s: int, t: int, dim: int, seed: int) -> Tensor:
    """Token inputs (S, T, dim) with correlated features and a mean, i.i.d. over positions."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=D64) * torch.linspace(0.2, 1.5, dim, dtype=D64)
    return torch.randn(s, t, dim, generator=g, dtype=D64) @ mix + 0.5 * torch.randn(dim, generator=g, dtype=D64)


def _check_every_offset(q_dense: Tensor, k_dense: Tensor, q_pre: Tensor, k_pre: Tensor, pairs: Tensor, freqs: Tensor,
                        keep: Tensor, sol: E.RotaryQKSolution, group: Tensor, head_tol: float) -> Tensor:
    """Per-offset errors with and without the correction under the real rotation; returns comp / none summed over heads."""
    pos = torch.arange(q_pre.shape[1])
    none = per_offset_errors(q_dense, k_dense, rotate(fold_vectors(q_pre, pairs, keep, 0 * sol.coef, group), pairs, freqs, pos),
                             rotate(k_pre, pairs, freqs, pos), group)
    comp = per_offset_errors(q_dense, k_dense, rotate(fold_vectors(q_pre, pairs, keep, sol.coef, group), pairs, freqs, pos),
                             rotate(k_pre, pairs, freqs, pos), group)
    layer = comp.sum(1) / none.sum(1)
    assert bool((layer < 1).all()), f"worse at offsets {torch.nonzero(layer >= 1).flatten().tolist()}: {layer.max():.4f}"
    # per head: not worse, except where the statistics cannot see: offset 0 pairs each token with
    # itself (q and k of one token are dependent; the fit assumes independent query/key pairs), and
    # the longest offsets hold only a few pairs per window (sampling noise)
    inner = slice(1, 3 * q_pre.shape[1] // 4)
    bad = torch.nonzero(comp[inner] > none[inner] * (1 + head_tol)).tolist()
    assert not bad, f"(offset, head) worse: {bad[:10]}, worst ratio {float((comp / none).max()):.4f}"
    return layer


def random_rotary_layer(t: int = 48) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pre-rotation q (64, t, 4, 16) and k (64, t, 2, 16) of random projections of correlated tokens, and their Grams."""
    hq, hkv, d = 4, 2, 16
    g = torch.Generator().manual_seed(8)
    wq = torch.randn(hq * d, 12, generator=g, dtype=D64) / 12**0.5
    wk = torch.randn(hkv * d, 12, generator=g, dtype=D64) / 12**0.5
    x = _sequences(64, t, 12, seed=9)
    q_pre, k_pre = (x @ wq.T).reshape(64, t, hq, d), (x @ wk.T).reshape(64, t, hkv, d)
    return q_pre, k_pre, head_grams(q_pre.reshape(-1, hq, d)), head_grams(k_pre.reshape(-1, hkv, d))


def test_random_weights_self_target_closer_at_every_relative_position() -> None:
    """Prune 4 of 8 pairs per kv head; every causal offset 0..47 of the real rotation."""
    d, t = 16, 48
    pairs, freqs, group = half_split_pairs(d), rope_freqs(d), torch.tensor([0, 0, 1, 1])
    q_pre, k_pre, gq, gk = random_rotary_layer(t)
    keep = E.select_top_per_head(E.rotary_pair_scores(gq, gk, pairs, group), 4)
    angles, weights = causal_offsets(freqs, t)
    sol = E.rotary_qk_compensation(gq, gk, pairs, keep, group, rel_angles=angles, rel_weights=weights)
    assert float(sol.err_compensated.sum()) < 0.99 * float(sol.err_uncompensated.sum())
    pos = torch.arange(t)
    q, k = rotate(q_pre, pairs, freqs, pos), rotate(k_pre, pairs, freqs, pos)
    _check_every_offset(q, k, q_pre, k_pre, pairs, freqs, keep, sol, group, head_tol=2e-3)


def test_random_weights_dense_target_closer_at_every_relative_position() -> None:
    """The sequential case: q/k come from a drifted (pruned upstream) stream; the target is the dense logit."""
    hq, hkv, d, t = 4, 2, 16, 48
    pairs, freqs, group = interleaved_pairs(d), rope_freqs(d, base=100.0), torch.tensor([0, 0, 1, 1])
    g = torch.Generator().manual_seed(11)
    wq = torch.randn(hq * d, 12, generator=g, dtype=D64) / 12**0.5
    wk = torch.randn(hkv * d, 12, generator=g, dtype=D64) / 12**0.5
    x_d = _sequences(64, t, 12, seed=12)
    drift = torch.eye(12, dtype=D64) + 0.3 * torch.randn(12, 12, generator=g, dtype=D64)
    x_p = x_d @ drift + 0.05 * torch.randn(x_d.shape, generator=g, dtype=D64)
    qd_pre, kd_pre = (x_d @ wq.T).reshape(64, t, hq, d), (x_d @ wk.T).reshape(64, t, hkv, d)
    qp_pre, kp_pre = (x_p @ wq.T).reshape(64, t, hq, d), (x_p @ wk.T).reshape(64, t, hkv, d)
    flat = lambda v: v.reshape(-1, v.shape[2], d)  # noqa: E731
    gq, gk = head_grams(flat(qp_pre)), head_grams(flat(kp_pre))
    keep = E.select_top_per_head(E.rotary_pair_scores(gq, gk, pairs, group), 5)
    angles, weights = causal_offsets(freqs, t)
    sol = E.rotary_qk_compensation(gq, gk, pairs, keep, group, rel_angles=angles, rel_weights=weights,
                                   q_cross=cross_grams(flat(qp_pre), flat(qd_pre)), k_cross=cross_grams(flat(kp_pre), flat(kd_pre)),
                                   qd_second=head_grams(flat(qd_pre)), kd_second=head_grams(flat(kd_pre)))
    pos = torch.arange(t)
    layer = _check_every_offset(rotate(qd_pre, pairs, freqs, pos), rotate(kd_pre, pairs, freqs, pos), qp_pre, kp_pre,
                                pairs, freqs, keep, sol, group, head_tol=2e-3)
    assert float(layer.max()) < 0.9  # the drift of each kept pair is corrected at its own frequency


def _stories_qk(model, ids: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """Pre-rotation q/k (S, T, H, d) of one layer of the real stories260K Llama on token windows ids (S, T)."""
    att = model.model.layers[layer].self_attn
    cap: dict[str, Tensor] = {}
    hooks = [att.q_proj.register_forward_hook(lambda m, i, o: cap.__setitem__("q", o.detach().to(D64))),
             att.k_proj.register_forward_hook(lambda m, i, o: cap.__setitem__("k", o.detach().to(D64)))]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    d = model.config.head_dim
    s, t = ids.shape
    return cap["q"].reshape(s, t, -1, d), cap["k"].reshape(s, t, -1, d)


def stories_layout(t: int, lines: int) -> tuple[object, Tensor, Tensor, Tensor, Tensor]:
    """The real stories260K Llama, its whole t-token windows of the first `lines` stories, the query head ->
    kv head map, its pairs (rotate_half layout: dim j pairs with j + d/2) and its rotary frequencies."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(STORIES260K)
    windows = [tok(line, return_tensors="pt").input_ids[0][:t] for line in STORIES.read_text().splitlines()[:lines]]
    cfg = model.config
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    return (model, torch.stack([w for w in windows if len(w) == t]), torch.arange(hq) // (hq // hkv),
            half_split_pairs(d), rope_freqs(d, cfg.rope_parameters["rope_theta"]))


@needs_stories
def test_real_stories260k_weights_closer_at_every_relative_position() -> None:
    """The real model's q/k projections on its own stories, its own rotary (half-split pairs, theta 10000).

    Self target: 2 of the 4 pairs kept per kv head in layer 0. Dense target: the q/k of layer 2 on a
    stream drifted by pruning half of layer 0's MLP units uncompensated, against the dense stream's.
    Every causal offset 0..63 of a 64-token window, the real rotation applied to the folded queries.
    """
    t = 64
    model, ids, group, pairs, freqs = stories_layout(t, 120)
    d = int(model.config.head_dim)
    pos = torch.arange(t)
    angles, weights = causal_offsets(freqs, t)
    flat = lambda v: v.reshape(-1, v.shape[2], d)  # noqa: E731

    q_pre, k_pre = _stories_qk(model, ids, 0)
    gq, gk = head_grams(flat(q_pre)), head_grams(flat(k_pre))
    keep = E.select_top_per_head(E.rotary_pair_scores(gq, gk, pairs, group), 2)
    sol = E.rotary_qk_compensation(gq, gk, pairs, keep, group, rel_angles=angles, rel_weights=weights)
    assert bool((sol.coef != 0).any())
    q, k = rotate(q_pre, pairs, freqs, pos), rotate(k_pre, pairs, freqs, pos)
    _check_every_offset(q, k, q_pre, k_pre, pairs, freqs, keep, sol, group, head_tol=1e-2)

    qd_pre, kd_pre = _stories_qk(model, ids, 2)
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.weight[:, ::2] = 0.0
    qp_pre, kp_pre = _stories_qk(model, ids, 2)
    gq, gk = head_grams(flat(qp_pre)), head_grams(flat(kp_pre))
    keep = E.select_top_per_head(E.rotary_pair_scores(gq, gk, pairs, group), 3)
    sol = E.rotary_qk_compensation(gq, gk, pairs, keep, group, rel_angles=angles, rel_weights=weights,
                                   q_cross=cross_grams(flat(qp_pre), flat(qd_pre)), k_cross=cross_grams(flat(kp_pre), flat(kd_pre)),
                                   qd_second=head_grams(flat(qd_pre)), kd_second=head_grams(flat(kd_pre)))
    _check_every_offset(rotate(qd_pre, pairs, freqs, pos), rotate(kd_pre, pairs, freqs, pos), qp_pre, kp_pre,
                        pairs, freqs, keep, sol, group, head_tol=1e-2)


def test_pair_scores_over_offsets_average_the_rotated_pair_energy() -> None:
    pairs, freqs = interleaved_pairs(DH), rope_freqs(DH, base=50.0)
    q, k = _random_qk(30, HQ, HKV, DH, seed=13)
    angles, weights = causal_offsets(freqs, 7)
    got = E.rotary_pair_scores(head_grams(q), head_grams(k), pairs, GROUP, rel_angles=angles, rel_weights=weights)
    want = torch.zeros(HKV, DH // 2, dtype=D64)
    w = weights / weights.sum()
    for lag in range(7):
        for h in range(HQ):
            kr = rotate_by(k[:, int(GROUP[h])], pairs, angles[lag])
            for p, (i, j) in enumerate(pairs.tolist()):
                want[int(GROUP[h]), p] += w[lag] * (q[:, h][:, [i, j]] @ kr[:, [i, j]].T).square().mean()
    assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_correction_matrix_folded_on_the_query_side_is_the_rotary_fold() -> None:
    pairs = interleaved_pairs(DH)
    keep = torch.tensor([[1, 3], [0, 2]])
    coef = torch.randn(HQ, 2, 2, generator=torch.Generator().manual_seed(14), dtype=D64)
    dims, m = E.rotary_correction_matrix(pairs, keep, coef, GROUP)
    assert dims.tolist() == [[2, 3, 6, 7], [2, 3, 6, 7], [0, 1, 4, 5], [0, 1, 4, 5]]
    assert_close(E.rotary_pairs_of_dims(pairs, dims[::2]), keep)
    with pytest.raises(ValueError, match="whole rotation pairs"):
        E.rotary_pairs_of_dims(pairs, torch.tensor([[0, 2, 3, 4]]))
    wq = torch.randn(HQ * DH, 5, dtype=D64)
    wk = torch.randn(HKV * DH, 5, dtype=D64)
    folded, _ = E.fold_rotary_q(wq, None, pairs, keep, coef, GROUP)
    rows = (torch.arange(HQ)[:, None] * DH + dims).reshape(-1)
    wq_n, _ = E.fold_rotary_mix(wq, None, torch.arange(HQ), dims, m)
    assert_close(wq_n, folded[rows])

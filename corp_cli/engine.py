"""The CORP linear algebra, all of it: statistics, ranking, ridge and logit compensation, folding.

Pure tensor functions: tensors in, tensors out, no I/O, no printing, no model objects.
Every sum is accumulated, and every solve done, in ACC_DTYPE; results are cast back to
the model dtype only by the caller, when folded into weights. Works on any device.
The notation follows docs/method.md: h are MLP hidden activations, S the kept units, P the
pruned ones, B/c the affine compensation, M the Q/K logit correction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# The one precision for accumulation and solves.
ACC_DTYPE = torch.float64

# |h| histogram for the active-energy ranker: bins follow the float exponent, with
# HIST_SUB linear sub-bins per octave, covering 2^HIST_EXP_MIN .. 2^HIST_EXP_MAX; bin 0
# also takes exact zeros and everything below the range, the last bin everything above.
HIST_EXP_MIN = -24
HIST_EXP_MAX = 16
HIST_SUB = 4
HIST_BINS = (HIST_EXP_MAX - HIST_EXP_MIN) * HIST_SUB + 1

# Relative floor on ridge lambda: keeps the Cholesky factorisation defined on
# rank-deficient covariances without visibly biasing well-conditioned ones.
LAMBDA_REL_FLOOR = 1e-8
# How many times a failed factorisation may raise lambda (x100 each) before giving up.
LAMBDA_MAX_RETRIES = 8
# A factorisation whose condition estimate exceeds this is treated as singular.
COND_LIMIT = 1e12
# Group-removal rounds of the greedy OBS ranker (one unit per round is the exact greedy).
OBS_GREEDY_ROUNDS = 32
# Default relative ridge for the Q/K logit solve (relative to mean(a) * mean(b)).
QK_LAMBDA_REL = 1e-6


def qk_lambda_rel(forward_dtype: torch.dtype | None) -> float:
    """The Q/K solve's relative ridge for statistics of a forward in `forward_dtype`.

    A bf16/fp16 forward rounds q and k to 2^-8 / 2^-11: the near-null directions of their
    second moments are then noise, and a tiny ridge divides that noise by near-zero
    eigenvalues (measured on real DeiT-tiny: a bf16-calibrated 50% Q/K prune fell from 72.4%
    to 26.4% held-out top-1 at 1e-6, and recovered to 72.4% at 1e-2, where fp32 gives 72.8%).
    The ridge is raised to 2.5 rounding units of the dtype: 1e-2 for bf16, 1.2e-3 for fp16.
    """
    if forward_dtype is None or torch.finfo(forward_dtype).eps < 1e-6:
        return QK_LAMBDA_REL
    return max(QK_LAMBDA_REL, 2.5 * torch.finfo(forward_dtype).eps)


# --------------------------------------------------------------------------------------
# Streaming sufficient statistics
# --------------------------------------------------------------------------------------


def abs_hist_bin_lower_edges(device: torch.device | str = "cpu") -> Tensor:
    """Lower edge of every |h| histogram bin (bin 0's edge is 0)."""
    k = torch.arange(HIST_BINS - 1, dtype=ACC_DTYPE, device=device)
    exp = HIST_EXP_MIN + torch.div(k, HIST_SUB, rounding_mode="floor")
    sub = k - (exp - HIST_EXP_MIN) * HIST_SUB
    edges = torch.pow(2.0, exp) * (1.0 + sub / HIST_SUB)
    return torch.cat([torch.zeros(1, dtype=ACC_DTYPE, device=device), edges])


def _abs_hist_flat_index(h2: Tensor) -> Tensor:
    """Flat histogram index unit * HIST_BINS + bin of every |h| in h2 (N, D), as int32.

    For IEEE float32 the bits above the top log2(HIST_SUB) mantissa bits are exactly
    (biased exponent, linear sub-octave bin), so one shift replaces log/frexp; the unit
    offset and the range clamp are fused into in-place passes (this runs on every token).
    """
    d = h2.shape[1]
    shift = 23 - int(math.log2(HIST_SUB))
    idx = h2.float().abs().view(torch.int32) >> shift
    base = torch.arange(d, device=h2.device, dtype=torch.int32) * HIST_BINS
    idx += base - ((127 + HIST_EXP_MIN) * HIST_SUB - 1)
    return torch.clamp(idx, base, base + (HIST_BINS - 1), out=idx)


def sym_gram(x: Tensor, chunks: int = 4) -> Tensor:
    """x^T x computing only the upper block triangle (about 5/8 of the work for 4 chunks)."""
    d = x.shape[1]
    if d < 256 or chunks < 2:
        return x.T @ x
    edges = [d * i // chunks for i in range(chunks + 1)]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for i in range(chunks):
        a = x[:, edges[i] : edges[i + 1]]
        for j in range(i, chunks):
            blk = a.T @ x[:, edges[j] : edges[j + 1]]
            out[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = blk
            if j != i:
                out[edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = blk.T
    return out


def mlp_batch_stats(h: Tensor, product_dtype: torch.dtype = ACC_DTYPE) -> dict[str, Tensor]:
    """Sums over one batch of hidden activations h (..., D): count, sum, Gram, |h| histogram.

    The Gram product and the sum may run in float32 (`product_dtype`) and are then added
    into float64 sums: one batch's rounding error is tiny next to the calibration noise.
    """
    h2 = h.reshape(-1, h.shape[-1])
    n, d = h2.shape
    hp = h2.to(product_dtype)
    # kept at the product precision until added into the float64 sums (add_stats): a batch
    # held back until its forward completes costs half the memory of a float64 copy
    gram = sym_gram(hp)
    total = hp.sum(0)
    # int32 indices keep bincount on its fast path (d * HIST_BINS is far below 2^31)
    flat = _abs_hist_flat_index(h2)
    hist = torch.bincount(flat.reshape(-1), minlength=d * HIST_BINS).reshape(d, HIST_BINS).to(torch.int64)
    return {
        "count": torch.tensor([n], dtype=torch.int64, device=h.device),
        "sum": total,
        "gram": gram,
        "abs_hist": hist,
    }


def gram_batch_stats(x: Tensor, product_dtype: torch.dtype = ACC_DTYPE) -> dict[str, Tensor]:
    """Sums over one batch of vectors x (..., D): count, sum and Gram (the V/O statistics; no histogram)."""
    x2 = x.reshape(-1, x.shape[-1])
    xp = x2.to(product_dtype)
    return {
        "count": torch.tensor([x2.shape[0]], dtype=torch.int64, device=x.device),
        "sum": xp.sum(0).to(ACC_DTYPE),
        "gram": sym_gram(xp).to(ACC_DTYPE),
    }


def qk_batch_stats(q: Tensor, k: Tensor, product_dtype: torch.dtype = ACC_DTYPE) -> dict[str, Tensor]:
    """Per-head sums over one batch of queries (B, Hq, N, d) and keys (B, Hkv, N, d).

    Full per-head second moments (for the logit solve and its error), and the same-token
    sum of q_j^2 k_j^2 (for the joint ranker). Under grouped-query attention (Hkv < Hq, query
    heads h*G .. h*G+G-1 reading kv head h) the key moments are per kv head, qk_sq per query head.
    """
    b, nh, t, d = q.shape
    nkv = k.shape[1]
    qh = q.transpose(0, 1).reshape(nh, b * t, d)
    kh = k.transpose(0, 1).reshape(nkv, b * t, d)
    qp, kp = qh.to(product_dtype), kh.to(product_dtype)
    return {
        "count": torch.tensor([b * t], dtype=torch.int64, device=q.device),
        "q_gram": torch.bmm(qp.transpose(1, 2), qp),
        "k_gram": torch.bmm(kp.transpose(1, 2), kp),
        "qk_sq": (qh.to(ACC_DTYPE).square() * kh.to(ACC_DTYPE).square().repeat_interleave(nh // nkv, 0)).sum(1),
    }


def add_stats(acc: dict[str, Tensor] | None, new: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sufficient statistics are plain sums: accumulating, and merging shards, is addition (in ACC_DTYPE)."""
    if acc is None:
        return {k: v.to(ACC_DTYPE, copy=True) if v.is_floating_point() else v.clone() for k, v in new.items()}
    for k, v in new.items():
        acc[k] += v
    return acc


@dataclass(frozen=True)
class Moments:
    """Mean, centred covariance and uncentred second moment of the MLP hidden units."""

    n: int
    mean: Tensor  # (D,)
    cov: Tensor  # (D, D)  Q/n - mu mu^T
    second: Tensor  # (D, D)  Q/n


def mlp_moments(stats: dict[str, Tensor]) -> Moments:
    n = int(stats["count"].sum())
    if n <= 0:
        raise ValueError("statistics hold no samples")
    second = stats["gram"].to(ACC_DTYPE) / n
    second = 0.5 * (second + second.T)
    mean = stats["sum"].to(ACC_DTYPE) / n
    cov = second - torch.outer(mean, mean)
    return Moments(n=n, mean=mean, cov=cov, second=second)


def fit_moments(stats: dict[str, Tensor], *, intercept: bool = True, raw: Moments | None = None) -> Moments:
    """The moments the MLP fit uses: affine (h_P ~ B h_S + c) or, without intercept, linear (h_P ~ B h_S).

    An output projection without a bias has nowhere to hold W2_P c, so its fit has no
    intercept: the same ridge on uncentred second moments in place of covariances (zero
    mean), B = E[h_P h_S^T] (E[h_S h_S^T] + lambda I)^-1 and c = 0. B = 0 stays a candidate,
    so compensation still never makes the calibration error larger, and every formula below
    (solve, error, fold) applies unchanged to these moments. `raw`: mlp_moments(stats), when the
    caller has them already.
    """
    m = raw if raw is not None else mlp_moments(stats)
    return m if intercept else Moments(n=m.n, mean=torch.zeros_like(m.mean), cov=m.second, second=m.second)


# --------------------------------------------------------------------------------------
# How many to keep, and which
# --------------------------------------------------------------------------------------


def keep_count(width: int, sparsity: float, *, round_to: int = 1, min_keep: int = 1) -> int:
    """Survivor count: width - floor(sparsity * width), rounded to a multiple of round_to.

    Rounding goes to the nearest multiple (ties up), never below round_to or min_keep and
    never above width.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    keep = width - math.floor(sparsity * width + 1e-9)
    if round_to > 1 and keep < width:
        keep = max(round_to, int(math.floor(keep / round_to + 0.5)) * round_to)
    keep = max(keep, min_keep)
    return min(keep, width)


def select_top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the `keep` highest scores, ascending; ties broken by lower index (deterministic)."""
    order = torch.sort(-scores.to(ACC_DTYPE), stable=True).indices
    return torch.sort(order[:keep]).values


def complement(keep: Tensor, width: int) -> Tensor:
    mask = torch.ones(width, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return torch.nonzero(mask).flatten()


def energy_scores(stats: dict[str, Tensor]) -> Tensor:
    """E[h_j^2]."""
    return torch.diagonal(stats["gram"]).to(ACC_DTYPE) / int(stats["count"].sum())


def active_energy_scores(stats: dict[str, Tensor], eps_rel: float = 0.01) -> Tensor:
    """E[h_j^2] * P(|h_j| > eps_j), eps_j = eps_rel * RMS_j.

    P is read off the |h| histogram: counts in the bins whose lower edge is >= eps_j, so
    eps_j is effectively rounded up to the next bin edge (at most 1/HIST_SUB of an octave).
    """
    energy = energy_scores(stats)
    eps = eps_rel * energy.sqrt()
    hist = stats["abs_hist"].to(ACC_DTYPE)
    edges = abs_hist_bin_lower_edges(hist.device)
    above = edges[None, :] >= eps[:, None]
    frac = (hist * above).sum(1) / hist.sum(1).clamp_min(1)
    return energy * frac


def magnitude_scores(w1: Tensor, w2: Tensor) -> Tensor:
    """||W1[j,:]|| * ||W2[:,j]||."""
    return w1.to(ACC_DTYPE).norm(dim=1) * w2.to(ACC_DTYPE).norm(dim=0)


def obs_scores(w2: Tensor, cov: Tensor, lam: float) -> Tensor:
    """Error left after compensating unit j alone: ||W2[:,j]||^2 / [(Sigma + lam I)^-1]_jj."""
    inv = _spd_inverse(cov, lam)
    return w2.to(ACC_DTYPE).square().sum(0) / torch.diagonal(inv)


def obs_greedy_keep(w2: Tensor, cov: Tensor, lam: float, keep: int, rounds: int = OBS_GREEDY_ROUNDS) -> Tensor:
    """Greedy OBS: remove the units whose compensated removal costs least, update, repeat.

    Each round removes the cheapest (width - keep) / rounds units as a group, then
    downdates the inverse (Schur complement) and folds their compensation into W2, so
    later rounds see the error that really remains. rounds = width - keep is the
    one-unit-at-a-time greedy; a few dozen rounds cost O(rounds * D^2 * out) instead.
    """
    width = cov.shape[0]
    inv = _spd_inverse(cov, lam)
    w = w2.to(ACC_DTYPE).clone()
    alive = torch.ones(width, dtype=torch.bool, device=cov.device)
    big = torch.tensor(float("inf"), dtype=ACC_DTYPE, device=cov.device)
    to_remove = width - keep
    rounds = max(1, min(rounds, to_remove))
    for r in range(rounds):
        step = (to_remove * (r + 1)) // rounds - (to_remove * r) // rounds
        if step == 0:
            continue
        score = torch.where(alive, w.square().sum(0) / torch.diagonal(inv), big)
        gone = torch.sort(torch.sort(score, stable=True).indices[:step]).values
        rest = torch.nonzero(alive).flatten()
        rest = rest[~torch.isin(rest, gone)]
        # h_P ~= -inv_PP^-1 inv_PS h_S (+ const): fold into W2, then the Schur downdate of inv
        inv_pp = inv[gone][:, gone]
        inv_ps = inv[gone][:, rest]
        coef = torch.linalg.solve(inv_pp, inv_ps)  # (|P|, |S|)
        w[:, rest] -= w[:, gone] @ coef
        inv[rest[:, None], rest[None, :]] -= inv_ps.T @ coef
        alive[gone] = False
        inv[gone, :] = 0
        inv[:, gone] = 0
        inv[gone, gone] = 1.0
        w[:, gone] = 0
    return torch.nonzero(alive).flatten()


def qk_energy_scores(stats: dict[str, Tensor]) -> Tensor:
    """E[q_j^2] * E[k_j^2] per head: (H, d)."""
    n = int(stats["count"].sum())
    q = torch.diagonal(stats["q_gram"], dim1=-2, dim2=-1).to(ACC_DTYPE) / n
    k = torch.diagonal(stats["k_gram"], dim1=-2, dim2=-1).to(ACC_DTYPE) / n
    return q * k


def qk_joint_scores(stats: dict[str, Tensor]) -> Tensor:
    """Same-token E[q_j^2 k_j^2] per head: (H, d)."""
    return stats["qk_sq"].to(ACC_DTYPE) / int(stats["count"].sum())


def qk_magnitude_scores(wq: Tensor, wk: Tensor, num_heads: int) -> Tensor:
    """||W_Q[j,:]|| * ||W_K[j,:]|| per head dim: (H, d)."""
    nq = wq.to(ACC_DTYPE).norm(dim=1).reshape(num_heads, -1)
    nk = wk.to(ACC_DTYPE).norm(dim=1).reshape(num_heads, -1)
    return nq * nk


def select_top_per_head(scores: Tensor, keep: int) -> Tensor:
    """(H, keep) kept dims per head, ascending within each head."""
    return torch.stack([select_top(s, keep) for s in scores])


def ranking_order(scores: Tensor) -> Tensor:
    """All indices, highest score first, ties by lower index: every prefix is a select_top set."""
    return torch.sort(-scores.to(ACC_DTYPE), stable=True).indices


# --------------------------------------------------------------------------------------
# MLP: affine ridge compensation
# --------------------------------------------------------------------------------------


def oas_lambda(sigma_ss: Tensor, n: int, lambda0: float = 0.0) -> float:
    """OAS-style shrinkage scaled to the data (docs/method.md §2): max(lambda0, rho * tr(S)/p)."""
    s = sigma_ss.to(ACC_DTYPE)
    p = s.shape[0]
    tr = float(torch.trace(s))
    tr2 = float((s * s).sum())  # tr(S^2) for symmetric S
    floor = max(lambda0, LAMBDA_REL_FLOOR * tr / max(p, 1))
    if p == 0 or tr <= 0.0:
        return max(floor, 1e-12)
    denom = (n + 1.0 - 2.0 / p) * (tr2 - tr * tr / p)
    num = (1.0 - 2.0 / p) * tr2 + tr * tr
    rho = 1.0 if denom <= 0.0 else min(1.0, num / denom)
    return max(floor, rho * tr / p)


@dataclass(frozen=True)
class RidgeSolution:
    b: Tensor  # (|P|, |S|)
    c: Tensor  # (|P|,)
    lam: float  # the lambda actually used (may have been raised)
    cond_estimate: float  # (max/min Cholesky diagonal)^2 of Sigma_SS + lambda I


def _cholesky_with_retries(a: Tensor, lam: float) -> tuple[Tensor, float]:
    """Cholesky of a + lam*I, raising lam until it factorises and is not near-singular.

    Never gives up silently: raising lambda is logged, and a matrix that cannot be made
    well posed raises ArithmeticError.
    """
    eye = torch.eye(a.shape[0], dtype=ACC_DTYPE, device=a.device)
    scale = float(torch.diagonal(a).abs().mean()) if a.numel() else 1.0
    lam_try = lam
    for attempt in range(LAMBDA_MAX_RETRIES + 1):
        chol, info = torch.linalg.cholesky_ex(a + lam_try * eye)
        if int(info) == 0 and _cond_from_cholesky(chol) <= COND_LIMIT:
            if attempt:
                log.warning("ridge solve was ill-conditioned; lambda raised from %.3g to %.3g", lam, lam_try)
            return chol, lam_try
        lam_try = max(lam_try * 100.0, LAMBDA_REL_FLOOR * max(scale, 1e-30), 1e-12)
    raise ArithmeticError(f"covariance could not be factorised even with lambda={lam_try:.3g}")


def _cond_from_cholesky(chol: Tensor) -> float:
    """Cheap condition estimate (max/min diag L)^2: a lower bound that flags near-singularity."""
    diag = torch.diagonal(chol)
    if diag.numel() == 0:
        return 1.0
    low = float(diag.min())
    return float("inf") if low <= 0.0 else float(diag.max() / low) ** 2


def _spd_inverse(a: Tensor, lam: float) -> Tensor:
    chol, _ = _cholesky_with_retries(a.to(ACC_DTYPE), lam)
    return torch.cholesky_inverse(chol)


def ridge_compensation(m: Moments, keep: Tensor, prune: Tensor, lam: float) -> RidgeSolution:
    """h_P ~= B h_S + c with B = Sigma_PS (Sigma_SS + lam I)^-1, c = mu_P - B mu_S."""
    sigma_ss = m.cov[keep][:, keep]
    sigma_sp = m.cov[keep][:, prune]
    chol, lam_used = _cholesky_with_retries(sigma_ss, lam)
    b = torch.cholesky_solve(sigma_sp, chol).T  # (|P|, |S|); Sigma_SS symmetric
    c = m.mean[prune] - b @ m.mean[keep]
    return RidgeSolution(b=b, c=c, lam=lam_used, cond_estimate=_cond_from_cholesky(chol))


def mlp_predicted_error(
    w2: Tensor, m: Moments, keep: Tensor, prune: Tensor, b: Tensor | None
) -> float:
    """Expected ||y_dense - y_pruned||^2 per token on the calibration distribution.

    Compensated: tr(W2_P R W2_P^T), R = Cov(h_P - B h_S). Uncompensated (B = 0, c = 0):
    the removed units' whole contribution, mean included: tr(W2_P E[h_P h_P^T] W2_P^T).
    """
    w2p = w2.to(ACC_DTYPE)[:, prune]
    if b is None:
        r = m.second[prune][:, prune]
    else:
        spp = m.cov[prune][:, prune]
        sps = m.cov[prune][:, keep]
        sss = m.cov[keep][:, keep]
        bs = b @ sps.T
        r = spp - bs - bs.T + b @ sss @ b.T
    return weighted_trace(w2p, r)


def weighted_trace(w: Tensor, r: Tensor) -> float:
    """tr(W R W^T): the expected squared norm of W h for a second-moment matrix R of h."""
    w = w.to(ACC_DTYPE)
    return float(torch.einsum("oi,ij,oj->", w, r.to(ACC_DTYPE), w))


def fold_mlp_output(
    w2: Tensor, b2: Tensor | None, keep: Tensor, prune: Tensor, sol: RidgeSolution | None,
) -> tuple[Tensor, Tensor | None]:
    """The output projection over the kept units, with the compensation folded in.

    W2' = W2_S + W2_P B, b2' = b2 + W2_P c; without a solution, W2_S and b2 as they were.
    A projection without a bias gets none from an intercept-free fit (c = 0, see fit_moments).
    """
    dtype = w2.dtype
    w2a = w2.to(ACC_DTYPE)
    w2n = w2a[:, keep]
    b2n = b2.to(ACC_DTYPE).clone() if b2 is not None else None
    if sol is not None:
        w2p = w2a[:, prune]
        w2n = w2n + w2p @ sol.b
        if b2n is not None or bool(sol.c.any()):
            shift = w2p @ sol.c
            b2n = shift if b2n is None else b2n + shift
    return w2n.to(dtype), (b2n.to(dtype) if b2n is not None else None)


def fold_mlp(
    w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    keep: Tensor, prune: Tensor, sol: RidgeSolution | None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Narrow fc1 to S and fold the compensation into fc2 (see fold_mlp_output)."""
    w1n = w1[keep].clone()
    b1n = b1[keep].clone() if b1 is not None else None
    return (w1n, b1n, *fold_mlp_output(w2, b2, keep, prune, sol))


# --- sequential targets ---
#
# Sequential calibration (docs/method.md §10) fits the kept weights to a regression target t
# given in the space of the output projection's output: the block's own output on the pruned
# stream (self; exactly the paper's solve, on that stream's moments) or what the dense model's
# residual stream holds (dense). The features h are read on the pruned stream. The optional
# statistics keys are t_cross = sum t h^T, t_sum = sum t, t_sq = sum ||t||^2 (MLP / V/O parts)
# and q_cross, k_cross, qd_gram, kd_gram (attention part).


def target_batch_stats(t: Tensor, h: Tensor, product_dtype: torch.dtype = ACC_DTYPE) -> dict[str, Tensor]:
    """Sums over one batch of targets t (..., out) paired token by token with features h (..., D)."""
    t2 = t.reshape(-1, t.shape[-1]).to(product_dtype)
    h2 = h.reshape(-1, h.shape[-1]).to(product_dtype)
    return {
        "t_cross": (t2.T @ h2).to(ACC_DTYPE),
        "t_sum": t2.sum(0).to(ACC_DTYPE),
        "t_sq": t2.to(ACC_DTYPE).square().sum().reshape(()),
    }


def qk_cross_batch_stats(q_p: Tensor, k_p: Tensor, q_d: Tensor, k_d: Tensor,
                         product_dtype: torch.dtype = ACC_DTYPE) -> dict[str, Tensor]:
    """Per-head sums pairing the pruned-stream q/k with the dense-stream q/k of the same tokens, all (B, H, N, d)."""
    def heads(x: Tensor) -> Tensor:
        return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1]).to(product_dtype)

    qp, kp, qd, kd = heads(q_p), heads(k_p), heads(q_d), heads(k_d)
    return {
        "q_cross": torch.bmm(qp.transpose(1, 2), qd).to(ACC_DTYPE),
        "k_cross": torch.bmm(kp.transpose(1, 2), kd).to(ACC_DTYPE),
        "qd_gram": torch.bmm(qd.transpose(1, 2), qd).to(ACC_DTYPE),
        "kd_gram": torch.bmm(kd.transpose(1, 2), kd).to(ACC_DTYPE),
    }


TARGET_KEYS = ("t_cross", "t_sum", "t_sq")
QK_TARGET_KEYS = ("q_cross", "k_cross", "qd_gram", "kd_gram")


def has_target(stats: dict[str, Tensor]) -> bool:
    """Whether a part's statistics carry a regression target (else the paper's self-target solve applies)."""
    return all(k in stats for k in TARGET_KEYS) or all(k in stats for k in QK_TARGET_KEYS)


@dataclass(frozen=True)
class TargetSolution:
    weight: Tensor  # (out, |S|) W' over the kept features
    bias: Tensor | None  # (out,) b' (None: no intercept)
    lam: float
    cond_estimate: float
    err_compensated: float  # E||t - W' h_S - b'||^2
    err_uncompensated: float  # E||t - W_S h_S - b||^2 (the kept weights as they were)


def _affine_error(t_sq: float, mu_t: Tensor, c_raw: Tensor, second: Tensor, mu: Tensor, w: Tensor,
                  b: Tensor | None) -> float:
    """E||t - W h - b||^2 from E||t||^2, E[t], E[t h^T], E[h h^T] and E[h] (uncentred moments)."""
    err = t_sq - 2.0 * float(torch.sum(w * c_raw)) + weighted_trace(w, second)
    if b is not None:
        err += -2.0 * float(b @ mu_t) + 2.0 * float(b @ (w @ mu)) + float(b @ b)
    return max(err, 0.0)


def target_compensation(stats: dict[str, Tensor], w: Tensor, bias: Tensor | None, keep: Tensor, lam: float, *,
                        intercept: bool = True, raw: Moments | None = None) -> TargetSolution:
    """Ridge of the target on the kept features, relative to the kept weights (docs/method.md §10).

    min E||t - W' h_S - b'||^2 + lam ||W' - W_S||^2 gives
    W' = W_S + (C_tS - W_S Sigma_SS)(Sigma_SS + lam I)^-1 and b' = mu_t - W' mu_S, with C_tS and
    Sigma the centred moments (uncentred, and b' absent, without an intercept). For the self
    target t = W h + b this is W_S + W_P B, b + W_P c: the paper's solve, exactly. `raw`:
    mlp_moments(stats), when the caller has them already.
    """
    raw = raw if raw is not None else mlp_moments(stats)
    m = fit_moments(stats, intercept=intercept, raw=raw)
    n = m.n
    wa = w.to(ACC_DTYPE)
    w_s = wa[:, keep]
    mu_t = stats["t_sum"].to(ACC_DTYPE) / n
    c_raw = stats["t_cross"].to(ACC_DTYPE)[:, keep] / n
    c = c_raw - torch.outer(mu_t, raw.mean[keep]) if intercept else c_raw
    sigma = m.cov[keep][:, keep]
    chol, lam_used = _cholesky_with_retries(sigma, lam)
    w_new = w_s + torch.cholesky_solve((c - w_s @ sigma).T, chol).T
    b_new = mu_t - w_new @ raw.mean[keep] if intercept else None
    t_sq = float(stats["t_sq"]) / n
    second = raw.second[keep][:, keep]
    mu_s = raw.mean[keep]
    old_b = bias.to(ACC_DTYPE) if bias is not None else None
    return TargetSolution(
        weight=w_new, bias=b_new, lam=lam_used, cond_estimate=_cond_from_cholesky(chol),
        err_compensated=_affine_error(t_sq, mu_t, c_raw, second, mu_s, w_new, b_new),
        err_uncompensated=_affine_error(t_sq, mu_t, c_raw, second, mu_s, w_s, old_b),
    )


def qk_target_compensation(
    q_second: Tensor, k_second: Tensor, q_cross: Tensor, k_cross: Tensor, qd_second: Tensor, kd_second: Tensor,
    keep: Tensor, *, lam: float | None = None, scale: float = 1.0, lam_rel: float = QK_LAMBDA_REL,
) -> QKSolution:
    """The logit solve toward a target logit q_d^T k_d (docs/method.md §10), per head.

    min E(q_d^T k_d - q_S^T (I+M) k_S)^2 + lam ||M||^2 over independent (query, key) pairs:
    G_Q M G_K + lam M = X Y - G_Q G_K, X = E[q_S q_d^T], Y = E[k_d k_S^T]. All inputs are
    moments (divided by the count): q/k_second of the pruned stream (H, d, d), q/k_cross =
    E[q_p q_d^T], E[k_p k_d^T], qd/kd_second of the target. With the target equal to the
    pruned stream itself (X, Y its own Grams) this is qk_compensation's equation.
    """
    gq = q_second.to(ACC_DTYPE)
    gk = k_second.to(ACC_DTYPE)
    hq = torch.arange(keep.shape[0], device=gq.device)[:, None]
    gq_ss = _gather_blocks(gq, keep, keep)
    gk_ss = _gather_blocks(gk, keep, keep)
    x = q_cross.to(ACC_DTYPE)[hq, keep]  # (H, s, d): E[q_S q_d^T]
    y = k_cross.to(ACC_DTYPE)[hq, keep].transpose(1, 2)  # (H, d, s): E[k_d k_S^T]
    xy = x @ y
    base = torch.einsum("hij,hji->h", qd_second.to(ACC_DTYPE), kd_second.to(ACC_DTYPE))  # E[(q_d^T k_d)^2]
    m, lam_t = _qk_eigen_solve(gq_ss, gk_ss, xy - gq_ss @ gk_ss, lam, lam_rel)
    eye = torch.eye(keep.shape[1], dtype=ACC_DTYPE, device=gq.device).expand_as(m)

    def err(n_: Tensor) -> Tensor:
        quad = torch.einsum("hji,hjk,hkl,hil->h", n_, gq_ss, n_, gk_ss)  # tr(N^T G_Q N G_K)
        return (quad - 2.0 * torch.einsum("hij,hij->h", n_, xy) + base).clamp_min(0) * scale**2

    return QKSolution(m=m, lam=lam_t, err_compensated=err(eye + m), err_uncompensated=err(eye))


# The dense target's fit is blended with the self target's: W(a) = (1 - a) W_self + a W_dense
# (both are the formula above, whose solution is affine in C_tS, so this is the fit to the
# target y_p + a (s_d - s_p)), with a chosen by 2-fold cross-validation over the calibration
# batches. The self target is an exact function of h and cannot overfit; the dense target's
# residual error is not, and with few images a full fit to it does (docs/sequential.md).
BLEND_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
CV_PREFIX = "cv_"  # a part's sums over the first fold, beside its totals


def split_folds(stats: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
    """(first fold, second fold) of statistics that carry the first fold's sums as cv_ keys; None without."""
    first = {k[len(CV_PREFIX):]: v for k, v in stats.items() if k.startswith(CV_PREFIX)}
    if not first or int(first["count"].sum()) in (0, int(stats["count"].sum())):
        return None
    return first, {k: stats[k] - v for k, v in first.items()}


def _self_and_dense(st: dict[str, Tensor], w: Tensor, bias: Tensor | None, keep: Tensor, lam: float,
                    intercept: bool, raw: Moments,
                    dense: TargetSolution | None = None) -> tuple[tuple[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]:
    m = fit_moments(st, intercept=intercept, raw=raw)
    prune = complement(keep, w.shape[1])
    sol = ridge_compensation(m, keep, prune, lam) if prune.numel() else None
    ws, bs = fold_mlp_output(w.to(ACC_DTYPE), bias.to(ACC_DTYPE) if bias is not None else None, keep, prune, sol)
    d = dense if dense is not None else target_compensation(st, w, bias, keep, lam, intercept=intercept, raw=raw)
    return (ws, bs if intercept else None), (d.weight, d.bias)


def _target_error(st: dict[str, Tensor], keep: Tensor, w: Tensor, b: Tensor | None, raw: Moments) -> float:
    n = raw.n
    return _affine_error(float(st["t_sq"]) / n, st["t_sum"].to(ACC_DTYPE) / n,
                         st["t_cross"].to(ACC_DTYPE)[:, keep] / n, raw.second[keep][:, keep], raw.mean[keep], w, b)


def blended_target_compensation(stats: dict[str, Tensor], w: Tensor, bias: Tensor | None, keep: Tensor, lam: float, *,
                                intercept: bool = True,
                                raw: Moments | None = None) -> tuple[TargetSolution, float, list[float]]:
    """target_compensation blended with the self target's solve, the blend chosen by 2-fold CV.

    Returns (the blended solution, its weight a on the dense fit, the cross-validated error of
    every a in BLEND_GRID). Without fold sums, a = 1 (the dense fit alone).
    """
    # each statistics' moments once (`raw`: the caller's mlp_moments(stats)): on a wide MLP they cost more than the solves
    raw = raw if raw is not None else mlp_moments(stats)
    full = target_compensation(stats, w, bias, keep, lam, intercept=intercept, raw=raw)
    folds = split_folds(stats)
    if folds is None:
        return full, 1.0, []
    cv = [0.0] * len(BLEND_GRID)
    fold_raw = [mlp_moments(f) for f in folds]
    for f, c in ((0, 1), (1, 0)):
        (ws, bs), (wd, bd) = _self_and_dense(folds[f], w, bias, keep, lam, intercept, fold_raw[f])
        # W(a) and b(a) are affine in a, so the held-out error is a parabola in a: three errors give it exactly
        e0, eh, e1 = (_target_error(folds[c], keep, (1 - a) * ws + a * wd,
                                    None if bd is None else (1 - a) * bs + a * bd, fold_raw[c])  # type: ignore[operator]
                      for a in (0.0, 0.5, 1.0))
        for j, a in enumerate(BLEND_GRID):
            cv[j] += e0 + a * (4 * eh - 3 * e0 - e1) + 2 * a * a * (e0 + e1 - 2 * eh)
    a = BLEND_GRID[min(range(len(cv)), key=lambda j: (cv[j], -j))]
    (ws, bs), (wd, bd) = _self_and_dense(stats, w, bias, keep, lam, intercept, raw, dense=full)
    wb = (1 - a) * ws + a * wd
    bb = None if bd is None else (1 - a) * bs + a * bd  # type: ignore[operator]
    sol = TargetSolution(weight=wb, bias=bb, lam=full.lam, cond_estimate=full.cond_estimate,
                         err_compensated=_target_error(stats, keep, wb, bb, raw), err_uncompensated=full.err_uncompensated)
    return sol, a, cv


def _qk_pair_error(mo: dict[str, Tensor], heads: Tensor, keep: Tensor, n_: Tensor, scale: float) -> Tensor:
    """E(q_d^T k_d - q_S^T N k_S)^2 per head on moments `mo` (divided by the count)."""
    hq = heads[:, None]
    gq = _gather_blocks(mo["q_gram"][heads], keep, keep)
    gk = _gather_blocks(mo["k_gram"][heads], keep, keep)
    xy = mo["q_cross"][hq, keep] @ mo["k_cross"][hq, keep].transpose(1, 2)
    base = torch.einsum("hij,hji->h", mo["qd_gram"][heads], mo["kd_gram"][heads])
    quad = torch.einsum("hji,hjk,hkl,hil->h", n_, gq, n_, gk)
    return (quad - 2.0 * torch.einsum("hij,hij->h", n_, xy) + base).clamp_min(0) * scale**2


def _qk_moments(st: dict[str, Tensor]) -> dict[str, Tensor]:
    n = int(st["count"].sum())
    return {k: st[k].to(ACC_DTYPE) / n for k in ("q_gram", "k_gram", *QK_TARGET_KEYS)}


def _qk_self_and_dense(mo: dict[str, Tensor], heads: Tensor, keep: Tensor, lam: float | None, scale: float,
                       lam_rel: float) -> tuple[Tensor, Tensor, QKSolution]:
    q2, k2 = mo["q_gram"][heads], mo["k_gram"][heads]
    d = q2.shape[-1]
    prune = torch.stack([complement(k, d) for k in keep])
    m_self = qk_compensation(q2, k2, keep, prune, lam=lam, scale=scale, lam_rel=lam_rel).m
    dense = qk_target_compensation(q2, k2, mo["q_cross"][heads], mo["k_cross"][heads], mo["qd_gram"][heads],
                                   mo["kd_gram"][heads], keep, lam=lam, scale=scale, lam_rel=lam_rel)
    return m_self, dense.m, dense


def blended_qk_target_compensation(stats: dict[str, Tensor], heads: Tensor, keep: Tensor, *, lam: float | None,
                                   scale: float, lam_rel: float = QK_LAMBDA_REL) -> tuple[QKSolution, Tensor]:
    """qk_target_compensation blended per head with the self target's M, the blend chosen by 2-fold CV.

    Returns (the solution, the weight a on the dense M per head). Without fold sums, a = 1.
    """
    mo = _qk_moments(stats)
    m_self, m_dense, dense = _qk_self_and_dense(mo, heads, keep, lam, scale, lam_rel)
    folds = split_folds(stats)
    alpha = torch.ones(keep.shape[0], dtype=ACC_DTYPE, device=keep.device)
    if folds is not None:
        eye = torch.eye(keep.shape[1], dtype=ACC_DTYPE, device=keep.device)
        cv = torch.zeros(len(BLEND_GRID), keep.shape[0], dtype=ACC_DTYPE, device=keep.device)
        for fit, check in (folds, folds[::-1]):
            ms, md, _ = _qk_self_and_dense(_qk_moments(fit), heads, keep, lam, scale, lam_rel)
            mc = _qk_moments(check)
            for j, a in enumerate(BLEND_GRID):
                cv[j] += _qk_pair_error(mc, heads, keep, eye + (1 - a) * ms + a * md, scale)
        alpha = torch.tensor(BLEND_GRID, dtype=ACC_DTYPE, device=keep.device)[torch.argmin(cv, 0)]
    m = (1 - alpha)[:, None, None] * m_self + alpha[:, None, None] * m_dense
    eye = torch.eye(keep.shape[1], dtype=ACC_DTYPE, device=keep.device)
    err = _qk_pair_error(mo, heads, keep, eye + m, scale)
    return QKSolution(m=m, lam=dense.lam, err_compensated=err, err_uncompensated=dense.err_uncompensated), alpha


# --------------------------------------------------------------------------------------
# Attention output: V/O dims and whole heads
# --------------------------------------------------------------------------------------
#
# o, the concatenated head outputs (H*d), feeds the output projection as h feeds fc2: the
# removed dims of o are predicted by the same ridge (ridge_compensation on Moments of o,
# cross-head) and folded by fold_mlp_output. Only which dims go is attention-specific:
# equal counts per kept head, and whole heads.


def head_dims(heads: Tensor, head_dim: int) -> Tensor:
    """The o indices of whole heads, (len(heads) * d,), head by head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def vo_kept_dims(heads: Tensor, v_keep: Tensor | None, head_dim: int) -> Tensor:
    """The kept o indices, ascending: the kept dims `v_keep` (Hk, dv) of the kept heads (all dims when None)."""
    if v_keep is None:
        return head_dims(heads, head_dim)
    return (heads[:, None] * head_dim + v_keep).reshape(-1)


def removal_error(w: Tensor, inv: Tensor, gone: Tensor, lam: float = 0.0) -> float:
    """Error left after removing the units `gone` and predicting them from all the others by the ridge.

    inv = (Sigma + lam I)^-1. The ridge's B is -(inv_PP)^-1 inv_PS, and its residual covariance
    R = Sigma_PP - B Sigma_SP - Sigma_PS B^T + B Sigma_SS B^T = (inv_PP)^-1 - lam I - lam B B^T,
    so the error is tr(W_P R W_P^T), as mlp_predicted_error gives it, without a solve per removal.
    """
    wp = w.to(ACC_DTYPE)[:, gone]
    keep = complement(gone, inv.shape[0])
    schur = torch.linalg.inv(inv[gone][:, gone])  # (inv_PP)^-1, |P| x |P|
    schur = 0.5 * (schur + schur.T)
    b = -schur @ inv[gone][:, keep]
    r = schur - lam * torch.eye(len(gone), dtype=ACC_DTYPE, device=inv.device) - lam * (b @ b.T)
    return weighted_trace(wp, r)


def head_energy_scores(w_out: Tensor, second: Tensor, num_heads: int) -> Tensor:
    """E||W_O,h o_h||^2 per head: what removing head h costs with no compensation, (H,)."""
    d = second.shape[0] // num_heads
    w = w_out.to(ACC_DTYPE)
    return torch.stack([
        torch.tensor(weighted_trace(w[:, idx], second[idx][:, idx]), dtype=ACC_DTYPE)
        for idx in (torch.arange(h * d, (h + 1) * d, device=w.device) for h in range(num_heads))
    ])


def head_error_scores(w_out: Tensor, cov: Tensor, lam: float, num_heads: int) -> Tensor:
    """The compensated error of removing head h alone, predicted from every other head's dims, (H,)."""
    d = cov.shape[0] // num_heads
    chol, lam = _cholesky_with_retries(cov.to(ACC_DTYPE), lam)
    inv = torch.cholesky_inverse(chol)
    return torch.tensor([removal_error(w_out, inv, torch.arange(h * d, (h + 1) * d, device=cov.device), lam)
                         for h in range(num_heads)], dtype=ACC_DTYPE)


def head_greedy_order(w_out: Tensor, cov: Tensor, lam: float, num_heads: int) -> Tensor:
    """Heads, most important first: remove, one at a time, the head whose compensated removal (with
    the heads already removed) costs least. The last one removed comes first."""
    d = cov.shape[0] // num_heads
    chol, lam = _cholesky_with_retries(cov.to(ACC_DTYPE), lam)
    inv = torch.cholesky_inverse(chol)
    removed: list[int] = []
    for _ in range(num_heads - 1):
        best, best_err = -1, float("inf")
        for h in range(num_heads):
            if h in removed:
                continue
            gone = head_dims(torch.tensor(removed + [h], device=cov.device), d)
            err = removal_error(w_out, inv, gone, lam)
            if err < best_err:
                best, best_err = h, err
        removed.append(best)
    rest = [h for h in range(num_heads) if h not in removed]
    return torch.tensor(rest + removed[::-1], dtype=torch.int64)


def vo_order(dim_rank: Tensor, heads: Tensor, num_heads: int) -> Tensor:
    """An order of all o indices whose prefixes of length k*dv are the kept sets of `heads` with dv dims each.

    dim_rank (H, d): each head's dims, most important first. The kept heads' dims come
    rank by rank (every kept head's best dim, then every second best, ...), then the
    removed heads' dims.
    """
    d = dim_rank.shape[1]
    kept = (heads[None, :] * d + dim_rank[heads].T).reshape(-1)
    gone = complement(heads, num_heads)
    return torch.cat([kept, head_dims(gone, d)])


# --------------------------------------------------------------------------------------
# Attention: Q/K logit compensation
# --------------------------------------------------------------------------------------


def _gather_blocks(g: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """g (H, d, d), rows (H, r), cols (H, c) -> (H, r, c) with g[h, rows[h]][:, cols[h]]."""
    h = torch.arange(g.shape[0], device=g.device)[:, None, None]
    return g[h, rows[:, :, None], cols[:, None, :]]


@dataclass(frozen=True)
class QKSolution:
    m: Tensor  # (H, ds, ds); the rotary solve: (H, d, ds), see engine.fold_rotary_mix
    lam: Tensor  # (H,) lambda used per head
    err_compensated: Tensor  # (H,) expected squared logit error (scaled logits)
    err_uncompensated: Tensor  # (H,)


def qk_compensation(
    q_second: Tensor, k_second: Tensor, keep: Tensor, prune: Tensor,
    *, lam: float | None = None, scale: float = 1.0, compensate: bool = True, lam_rel: float = QK_LAMBDA_REL,
) -> QKSolution:
    """Solve G_Q M G_K + lam M = C_Q C_K per head by eigendecomposition, O(d^3).

    q_second/k_second: uncentred second moments E[q q^T], E[k k^T], (H, d, d).
    keep/prune: (H, ds) and (H, dp) dim indices. lam=None picks lam_rel * mean(a) mean(b).
    Errors are E[(logit_dense - logit_pruned)^2] over independent (query, key) pairs,
    in logits scaled by `scale` (the softmax scale, d^-1/2).
    """
    gq = q_second.to(ACC_DTYPE)
    gk = k_second.to(ACC_DTYPE)
    gq_ss = _gather_blocks(gq, keep, keep)
    gk_ss = _gather_blocks(gk, keep, keep)
    gq_pp = _gather_blocks(gq, prune, prune)
    gk_pp = _gather_blocks(gk, prune, prune)
    rhs = _gather_blocks(gq, keep, prune) @ _gather_blocks(gk, prune, keep)  # C_Q C_K
    base = torch.einsum("hij,hji->h", gq_pp, gk_pp)  # E[(q_P^T k_P)^2]
    ds = keep.shape[1]
    if not compensate or prune.shape[1] == 0:
        zero = torch.zeros(keep.shape[0], ds, ds, dtype=ACC_DTYPE, device=gq.device)
        lam_t = torch.zeros(keep.shape[0], dtype=ACC_DTYPE, device=gq.device)
        err = base * scale**2
        return QKSolution(m=zero, lam=lam_t, err_compensated=err, err_uncompensated=err)
    m, lam_t = _qk_eigen_solve(gq_ss, gk_ss, rhs, lam, lam_rel)
    quad = torch.einsum("hji,hjk,hkl,hil->h", m, gq_ss, m, gk_ss)  # tr(M^T G_Q M G_K)
    cross = torch.einsum("hij,hij->h", m, rhs)  # tr(M^T C_Q C_K)
    err = (quad - 2.0 * cross + base).clamp_min(0)
    return QKSolution(m=m, lam=lam_t, err_compensated=err * scale**2, err_uncompensated=base * scale**2)


def _qk_eigen_solve(gq_ss: Tensor, gk_ss: Tensor, rhs: Tensor, lam: float | None,
                    lam_rel: float) -> tuple[Tensor, Tensor]:
    """M with G_Q M G_K + lam M = rhs per head, by the two eigendecompositions; (M, lam per head)."""
    a, u = torch.linalg.eigh(gq_ss)
    b, v = torch.linalg.eigh(gk_ss)
    a = a.clamp_min(0)  # PSD up to rounding
    b = b.clamp_min(0)
    if lam is None:
        lam_t = lam_rel * a.mean(-1) * b.mean(-1)
    else:
        lam_t = torch.full((gq_ss.shape[0],), float(lam), dtype=ACC_DTYPE, device=gq_ss.device)
    lam_t = torch.where(lam_t > 0, lam_t, torch.full_like(lam_t, 1e-30))
    lam_t = _qk_well_posed_lambda(a, b, lam_t)
    denom = a[:, :, None] * b[:, None, :] + lam_t[:, None, None]
    mt = (u.transpose(1, 2) @ rhs @ v) / denom
    return u @ mt @ v.transpose(1, 2), lam_t


def _qk_well_posed_lambda(a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
    """Raise a head's lambda where a_i b_j + lam spans more than COND_LIMIT.

    The eigen-solve divides by a_i b_j + lam: with a dead or collinear kept Q/K dim and a
    tiny explicit --lambda, rounding noise divided by ~lam would become a huge correction.
    Same rule as the MLP solve: raise lambda until the system is well posed, and say so.
    """
    top = a.amax(-1) * b.amax(-1)
    bottom = a.amin(-1) * b.amin(-1)
    bad = (top + lam) > COND_LIMIT * (bottom + lam)
    if not bool(bad.any()):
        return lam
    needed = (top - COND_LIMIT * bottom) / (COND_LIMIT - 1.0)
    raised = torch.where(bad, torch.maximum(lam, needed), lam)
    heads = bad.nonzero().flatten().tolist()
    log.warning(
        "Q/K logit solve was ill-conditioned for head(s) %s; lambda raised from %.3g to %.3g",
        heads, float(lam[heads].max()), float(raised[heads].max()),
    )
    return raised


def fold_qk(
    wq: Tensor, bq: Tensor | None, wk: Tensor, bk: Tensor | None,
    keep: Tensor, m: Tensor, *, balanced: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Fold (I + M_h) into each head's kept Q/K rows; wq/wk are (H*d, dim), keep (H, ds).

    q'^T k' must equal q_S^T (I + M) k_S. Unbalanced: W_Q' = (I+M)^T W_Q[S], W_K' = W_K[S].
    Balanced: (I+M) = U s V^T, W_Q' = (U s^1/2)^T W_Q[S], W_K' = (V s^1/2)^T W_K[S], which keeps
    both factors at similar magnitude (kinder to low precision). No symmetrisation either way.
    """
    nh, ds = keep.shape
    d = wq.shape[0] // nh
    rows = (torch.arange(nh, device=keep.device)[:, None] * d + keep).reshape(-1)
    dtype = wq.dtype
    wq_s = wq.to(ACC_DTYPE)[rows].reshape(nh, ds, -1)
    wk_s = wk.to(ACC_DTYPE)[rows].reshape(nh, ds, -1)
    bq_s = bq.to(ACC_DTYPE)[rows].reshape(nh, ds, 1) if bq is not None else None
    bk_s = bk.to(ACC_DTYPE)[rows].reshape(nh, ds, 1) if bk is not None else None
    t = torch.eye(ds, dtype=ACC_DTYPE, device=m.device) + m.to(ACC_DTYPE)
    if balanced:
        u, s, vh = torch.linalg.svd(t)
        root = s.sqrt()[:, None, :]
        left = (u * root).transpose(1, 2)  # (U s^1/2)^T
        right = (vh.transpose(1, 2) * root).transpose(1, 2)  # (V s^1/2)^T
    else:
        left = t.transpose(1, 2)
        right = None

    def apply(mat: Tensor | None, x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        return x if mat is None else mat @ x

    wq_n = apply(left, wq_s).reshape(nh * ds, -1).to(dtype)
    wk_n = apply(right, wk_s).reshape(nh * ds, -1).to(dtype)
    bq_n = apply(left, bq_s)
    bk_n = apply(right, bk_s)
    return (
        wq_n,
        bq_n.reshape(-1).to(dtype) if bq_n is not None else None,
        wk_n,
        bk_n.reshape(-1).to(dtype) if bk_n is not None else None,
    )


# --------------------------------------------------------------------------------------
# Allocation: predicted errors for every width, and the choice under a FLOPs budget
# --------------------------------------------------------------------------------------


def _suffix_sums(x: Tensor) -> Tensor:
    """s[p] = sum(x[p:]), p = 0..len(x) (s[len(x)] = 0)."""
    return torch.cat([x.flip(0).cumsum(0).flip(0), x.new_zeros(1)])


def prefix_errors(w: Tensor, m: Moments, order: Tensor, lam: float, *, compensated: bool = True) -> Tensor:
    """Predicted error of keeping the first p units of `order`, for every p = 0..D, from ONE factorisation.

    Compensated: with Sigma + lam I = L L^T in `order`, x = L z (z white), and the residual of
    the removed units given the kept ones is L_PP z_P; since L is lower triangular, column j of
    W L (j >= p) is column j of W_P L_PP, so the error is the suffix sum of the squared column
    norms of W L, less lam ||W_P||_F^2. That is mlp_predicted_error up to the lam B B^T term
    (and lambda chosen for the whole set rather than per kept set), checked in tests.
    Uncompensated: tr(W_P E[h_P h_P^T] W_P^T), the trailing-block sums of (W^T W) * E[h h^T].
    """
    wp = w.to(ACC_DTYPE)[:, order]
    if not compensated:
        a = (wp.T @ wp) * m.second[order][:, order]
        tail = a.flip(0).flip(1).cumsum(0).cumsum(1).flip(0).flip(1)  # tail[p, q] = sum a[p:, q:]
        return torch.cat([torch.diagonal(tail), a.new_zeros(1)]).clamp_min(0)
    chol, lam_used = _cholesky_with_retries(m.cov[order][:, order], lam)
    cols = (wp @ chol).square().sum(0)
    return (_suffix_sums(cols) - lam_used * _suffix_sums(wp.square().sum(0))).clamp_min(0)


def qk_error_grid(
    q_second: Tensor, k_second: Tensor, scores: Tensor, widths: list[int], *,
    lam: float | None = None, scale: float = 1.0, compensate: bool = True,
) -> Tensor:
    """Per-head logit error (len(widths), H) when each head keeps its top-`w` dims by `scores` (H, d).

    Heads of many blocks may be stacked into H: one batched solve per width. The solves run
    on one CPU thread: batched small eigendecompositions are slower threaded (measured 40x
    slower on two busy cores), and this is where an allocation spends most of its time.
    """
    d = scores.shape[1]
    out = torch.zeros(len(widths), scores.shape[0], dtype=ACC_DTYPE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for j, w in enumerate(widths):
            if w >= d:
                continue
            keep = select_top_per_head(scores, w)
            prune = torch.stack([complement(k, d) for k in keep])
            sol = qk_compensation(q_second, k_second, keep, prune, lam=lam, scale=scale, compensate=compensate)
            out[j] = (sol.err_compensated if compensate else sol.err_uncompensated).cpu()
    finally:
        torch.set_num_threads(threads)
    return out


# --- rotary Q/K pairs ---
#
# Rotary embeddings rotate each frequency pair (i, j) of a head's q and k by an angle set by
# the position. Whole pairs are pruned (the same pairs in every query head of a GQA group and
# in their kv head). From statistics before the rotation (the positional fit, what the families use)
# every dim of each QUERY head is mixed into its kept dims (rotary_mix_compensation, below). From
# statistics after it (pooled), each kept pair of each query head gets a complex scale, q_pair <- (I + C) q_pair
# with C = [[a, -b], [b, a]], which commutes with every 2-D rotation (docs/method.md §3). With
# q, k the vectors as they enter the logits (after the rotation), logit = q^T (Pi_S + M) k where
# M = C^T on each kept pair: M = a E_a + b E_b with E_a = [[1, 0], [0, 1]], E_b = [[0, 1], [-1, 0]].

# The two 2x2 basis blocks of M on one kept pair, for the coefficients (a, b).
_ROTARY_BASIS = ((1.0, 0.0, 0.0, 1.0), (0.0, 1.0, -1.0, 0.0))


def _rotary_basis(device: torch.device) -> Tensor:
    return torch.tensor(_ROTARY_BASIS, dtype=ACC_DTYPE, device=device).reshape(2, 2, 2)


def _pair_blocks(g: Tensor, dims: Tensor) -> Tensor:
    """g (H, d, d), dims (H, s, 2) -> (H, s, 2, s, 2): the 2x2 blocks of g between kept pairs."""
    h, s, _ = dims.shape
    flat = dims.reshape(h, 2 * s)
    return _gather_blocks(g, flat, flat).reshape(h, s, 2, s, 2)


def _gather_rows(g: Tensor, rows: Tensor) -> Tensor:
    """g (H, d, c), rows (H, r) -> (H, r, c)."""
    return torch.gather(g, 1, rows[:, :, None].expand(-1, -1, g.shape[2]))


def _gather_cols(g: Tensor, cols: Tensor) -> Tensor:
    """g (H, r, d), cols (H, c) -> (H, r, c)."""
    return torch.gather(g, 2, cols[:, None, :].expand(-1, g.shape[1], -1))


def rotary_pair_scores(q_second: Tensor, k_second: Tensor, pairs: Tensor, group: Tensor, *,
                       rel_angles: Tensor | None = None, rel_weights: Tensor | None = None) -> Tensor:
    """Energy of each pair's logit term, E[(q_p . k_p)^2] = tr(G_Q[p,p] G_K[p,p]), summed over a group: (Hkv, P).

    q_second (Hq, d, d) and k_second (Hkv, d, d) are the second moments of q and k as they enter
    the logits; group (Hq,) maps each query head to its kv head; pairs (P, 2) are the two dims of
    each frequency pair. A pair is kept or removed for the whole group, so the group's query
    heads' energies add (independent query/key pairs, as in the logit solve). With rel_angles
    (moments before the rotation, as in rotary_qk_compensation) the energy is averaged over the
    offsets: G_K is replaced by its rel_weights-weighted mean rotation.
    """
    gq = q_second.to(ACC_DTYPE)
    gk = k_second.to(ACC_DTYPE)[group]
    if rel_angles is not None:
        ang = rel_angles.to(device=gq.device, dtype=ACC_DTYPE)
        w = torch.ones(ang.shape[0], dtype=ACC_DTYPE, device=gq.device) if rel_weights is None else \
            rel_weights.to(device=gq.device, dtype=ACC_DTYPE)
        gk = _offset_mean(gk, pairs.to(gq.device), ang, w / w.sum())
    dims = pairs.to(gq.device)[None].expand(gq.shape[0], -1, -1)
    bq = torch.diagonal(_pair_blocks(gq, dims), dim1=1, dim2=3)  # (Hq, 2, 2, P)
    bk = torch.diagonal(_pair_blocks(gk, dims), dim1=1, dim2=3)
    per_q = torch.einsum("habp,hbap->hp", bq, bk)
    out = torch.zeros(int(k_second.shape[0]), pairs.shape[0], dtype=ACC_DTYPE, device=gq.device)
    return out.index_add_(0, group.to(gq.device), per_q)


@dataclass(frozen=True)
class RotaryQKSolution:
    coef: Tensor  # (Hq, s, 2): (a, b) per kept pair per query head; the pair's q becomes (I + [[a,-b],[b,a]]) q
    lam: Tensor  # (Hq,) lambda used per query head
    err_compensated: Tensor  # (Hq,) expected squared logit error against the target (scaled logits)
    err_uncompensated: Tensor  # (Hq,)
    err_per_offset: Tensor | None = None  # (L, Hq) at each relative offset (positional fit only)
    err_per_offset_uncompensated: Tensor | None = None  # (L, Hq)


def _rotary_system(gq: Tensor, gk: Tensor, dims: Tensor, dense: tuple[Tensor, Tensor, Tensor, Tensor] | None,
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The normal equations (F (B, 2s, 2s), g (B, 2s)) and the uncompensated error (B,) of a batch of query heads.

    gq, gk (B, d, d): the q and k second moments of each query head (k of its kv head); dims (B, s, 2);
    dense = (X, Y, qd_second, kd_second) per query head, X = E[q q_d^T], Y = E[k_d k^T], or None.
    """
    nb, s = gq.shape[0], dims.shape[1]
    flat = dims.reshape(nb, 2 * s)
    qss = _gather_blocks(gq, flat, flat)
    kss = _gather_blocks(gk, flat, flat)
    if dense is not None:
        x, y, qd, kd = dense
        xy = x @ y
        # E[(t - u)^2], t = q_d^T k_d, u = q^T Pi_S k
        t_sq = (qd * kd).sum((1, 2))
        tu = torch.diagonal(_gather_blocks(xy, flat, flat), dim1=1, dim2=2).sum(-1)
        base = (t_sq - 2.0 * tu + (qss * kss).sum((1, 2))).clamp_min(0)
        target = xy - _gather_cols(gq, flat) @ _gather_rows(gk, flat)  # X Y - G_Q Pi_S G_K
    else:
        prune_dims = torch.stack([complement(f, gq.shape[1]) for f in flat]) if nb else flat
        # E[(q_P^T k_P)^2] directly: no cancellation between large terms
        base = (_gather_blocks(gq, prune_dims, prune_dims) * _gather_blocks(gk, prune_dims, prune_dims)).sum((1, 2))
        target = _gather_cols(gq, prune_dims) @ _gather_rows(gk, prune_dims)  # G_Q Pi_P G_K
    basis = _rotary_basis(gq.device)
    qb = qss.reshape(nb, s, 2, s, 2)
    kb = kss.reshape(nb, s, 2, s, 2)
    # F_fg = tr(E_f G_K E_g^T G_Q) on the kept pairs' 2x2 blocks
    f = torch.einsum("fab,hpbqd,gcd,hqcpa->hpfqg", basis, kb, basis, qb).reshape(nb, 2 * s, 2 * s)
    f = 0.5 * (f + f.transpose(1, 2))
    blocks = _pair_blocks(target, dims).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (B, s, 2, 2)
    g = torch.einsum("hpab,fab->hpf", blocks, basis).reshape(nb, 2 * s)
    return f, g, base


# Offsets rotated per chunk: about this many float64 numbers in one (chunk, Hq, d, d) block.
_ROTARY_CHUNK_NUMBERS = 1 << 22


def _pair_order(x: Tensor, pairs: Tensor) -> Tensor:
    """x (H, d, d) as the 2x2 blocks between pairs, (H, P, P, 2, 2): block [p, q] is x[pairs[p]][:, pairs[q]]."""
    return x[:, pairs[:, None, :, None], pairs[None, :, None, :]]


def _block_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A 2x2 block [[x00, x01], [x10, x11]] as x00 + x11, x10 - x01 (the rotation-like part) and x00 - x11, x01 + x10."""
    x00, x01, x10, x11 = x[..., 0, 0], x[..., 0, 1], x[..., 1, 0], x[..., 1, 1]
    return x00 + x11, x10 - x01, x00 - x11, x01 + x10


def _offset_bases(angles: Tensor):  # noqa: ANN202 - a generator of (slice, (l, 4, P, P))
    """cos and sin of phi_p - phi_q and of phi_p + phi_q per offset, chunked: what R_l b R_l^T is linear in.

    With R(phi) a 2x2 rotation, a block b = b_c + b_a splits into a part that commutes with
    rotations (a complex scale) and a scaled reflection, and R(phi) b R(psi)^T = b_c R(phi - psi)
    + b_a R(-(phi + psi)): every rotated moment, and every inner product with one, is linear in
    these four (P, P) tables, so no rotated (d x d) matrix is ever formed.
    """
    nl, npairs = angles.shape
    step = max(1, _ROTARY_CHUNK_NUMBERS // max(1, 4 * npairs * npairs))
    for lo in range(0, nl, step):
        a = angles[lo:lo + step]
        c, s_ = a.cos(), a.sin()
        cc, ss = c[:, :, None] * c[:, None, :], s_[:, :, None] * s_[:, None, :]
        sc, cs = s_[:, :, None] * c[:, None, :], c[:, :, None] * s_[:, None, :]
        yield slice(lo, lo + a.shape[0]), torch.stack([cc + ss, sc - cs, cc - ss, sc + cs], 1)


def _offset_mean(b: Tensor, pairs: Tensor, angles: Tensor, weights: Tensor) -> Tensor:
    """sum_l w_l R_l b R_l^T: the moment the offset-averaged fit uses (every quantity of the fit is linear in it).

    weights (L,) for every head, or (L, H): one weighting per head (the reweighted mixing fit).
    """
    npairs = pairs.shape[0]
    per_head = weights.dim() == 2
    mean = torch.zeros(*((b.shape[0],) if per_head else ()), 4, npairs, npairs, dtype=ACC_DTYPE, device=b.device)
    for sl, basis in _offset_bases(angles):
        mean += torch.einsum("lh,lkpq->hkpq" if per_head else "l,lkpq->kpq", weights[sl], basis)
    cd, sd, cs_, ss_ = mean.unbind(-3)  # mean cos/sin of the difference and of the sum
    al, be, ga, de = (0.5 * t for t in _block_parts(_pair_order(b, pairs)))
    # b_c R(D) + b_a R(-S), with b_c = [[al, -be], [be, al]], b_a = [[ga, de], [de, -ga]], entry by entry
    blocks = torch.stack([
        torch.stack([al * cd - be * sd + ga * cs_ - de * ss_, -al * sd - be * cd + ga * ss_ + de * cs_], -1),
        torch.stack([be * cd + al * sd + de * cs_ + ga * ss_, al * cd - be * sd + de * ss_ - ga * cs_], -1),
    ], -2)  # (H, P, P, 2, 2)
    out = torch.empty_like(b)
    out[:, pairs[:, None, :, None], pairs[None, :, None, :]] = blocks
    return out


def _offset_inner(b: Tensor, pairs: Tensor, angles: Tensor, a: list[Tensor]) -> list[Tensor]:
    """<a_k, R_l b R_l^T> for every offset l and every a_k (H, d, d): (L, H) each, one matrix product per chunk."""
    al, be, ga, de = (0.5 * t for t in _block_parts(_pair_order(b, pairs)))
    coefs = []
    for ak in a:
        aa, ab, ag, ad = _block_parts(_pair_order(ak, pairs))
        # <A, b_c R(D) + b_a R(-S)> block by block: the coefficients of cos D, sin D, cos S, sin S
        coefs.append(torch.stack([al * aa + be * ab, al * ab - be * aa, ga * ag + de * ad, ga * ad - de * ag], 1))
    out = [torch.zeros(angles.shape[0], b.shape[0], dtype=ACC_DTYPE, device=b.device) for _ in a]
    for sl, basis in _offset_bases(angles):
        flat = basis.reshape(basis.shape[0], -1)
        for o, c in zip(out, coefs):
            o[sl] = flat @ c.reshape(c.shape[0], -1).T
    return out


def _rotary_m(theta: Tensor, dims: Tensor, d: int) -> Tensor:
    """The (Hq, d, d) logit correction M = sum_f theta_f E_f of coefficients theta (Hq, s, 2) on the kept pairs dims (Hq, s, 2)."""
    hq = theta.shape[0]
    m = torch.zeros(hq, d, d, dtype=ACC_DTYPE, device=theta.device)
    h = torch.arange(hq, device=theta.device)[:, None].expand_as(dims[..., 0])
    i, j = dims[..., 0], dims[..., 1]
    a, b = theta[..., 0], theta[..., 1]
    m[h, i, i] = a
    m[h, j, j] = a
    m[h, i, j] = b
    m[h, j, i] = -b
    return m


def _dims_projector(flat: Tensor, d: int) -> Tensor:
    """(Hq, d, d) diagonal 0/1 matrices selecting the dims in flat (Hq, r)."""
    p = torch.zeros(flat.shape[0], d, dtype=ACC_DTYPE, device=flat.device)
    p.scatter_(1, flat, 1.0)
    return torch.diag_embed(p)


def rotary_qk_compensation(
    q_second: Tensor, k_second: Tensor, pairs: Tensor, keep: Tensor, group: Tensor, *,
    q_cross: Tensor | None = None, k_cross: Tensor | None = None,
    qd_second: Tensor | None = None, kd_second: Tensor | None = None,
    rel_angles: Tensor | None = None, rel_weights: Tensor | None = None, every_offset: bool = True,
    lam: float | None = None, scale: float = 1.0, compensate: bool = True, lam_rel: float = QK_LAMBDA_REL,
) -> RotaryQKSolution:
    """Fit one complex scale per kept pair per query head to the target logits, in closed form.

    q_second (Hq, d, d) = E[q q^T], k_second (Hkv, d, d) = E[k k^T] on the stream being pruned;
    pairs (P, 2); keep (Hkv, s) kept pair indices per kv head; group (Hq,) query head -> kv head.
    The target is the logit q^T k itself (self target) unless the dense-stream moments are given:
    q_cross = E[q q_d^T] (Hq, d, d), k_cross = E[k k_d^T] (Hkv, d, d), qd_second = E[q_d q_d^T],
    kd_second = E[k_d k_d^T]; the target is then q_d^T k_d.

    Pooled (rel_angles None): q, k are taken as they enter the logits (after the rotation), and the
    fit is least squares over independent (query, key) pairs: with features phi_f = q^T E_f k (two
    per kept pair), F theta = g, F_fg = tr(E_f G_K E_g^T G_Q), g_f = <E_f, X Y - G_Q Pi_S G_K>,
    X = E[q q_d^T], Y = E[k_d k^T]: a (2s x 2s) system per query head.

    Positional (rel_angles (L, P) given): the moments are of q, k BEFORE the rotation, and the
    logit at relative offset l is q^T R_l k, R_l rotating pair p by rel_angles[l, p] (key position
    minus query position, times the pair's frequency; a token without rotation counts as position 0).
    R_l commutes with the correction, so offset l's system is the pooled one with G_K, Y and
    E[k_d k_d^T] replaced by R_l G_K R_l^T etc.; every term is linear in those, so the
    rel_weights-weighted mean over the offsets is the pooled system on their weighted means.
    Then (every_offset) the solution is shortened, per query head, to the largest step t <= 1 along
    it that lowers the predicted error at EVERY offset: along it the error at offset l is
    e_l - 2 t alpha_l + t^2 beta_l, so t = min_l alpha_l / beta_l (0 when an offset has alpha_l <= 0).
    err_per_offset then holds the (L, Hq) errors.

    Ridge lam (None: lam_rel * the mean eigenvalue of F), raised where ill-conditioned.
    Cost per query head: O(s^2) to form F from the 2x2 blocks, O(s^3) to solve; the positional fit
    adds O(L d^2) for the offset means and the per-offset errors.
    """
    gq = q_second.to(ACC_DTYPE)
    dev = gq.device
    d = gq.shape[1]
    group = group.to(dev)
    pairs = pairs.to(dev)
    gk = k_second.to(ACC_DTYPE)[group]
    hq, s = gq.shape[0], keep.shape[1]
    dims = pairs[keep.to(dev)][group]  # (Hq, s, 2)
    dense = _dense_moments(group, q_cross, k_cross, qd_second, kd_second)
    ang = weights = None
    if rel_angles is None:
        f, g, base = _rotary_system(gq, gk, dims, dense)
    else:
        ang = rel_angles.to(device=dev, dtype=ACC_DTYPE)
        weights = (torch.ones(ang.shape[0], dtype=ACC_DTYPE, device=dev) if rel_weights is None
                   else rel_weights.to(device=dev, dtype=ACC_DTYPE))
        weights = weights / weights.sum()
        mean_dense = None
        if dense is not None:
            x, y, qd, kd = dense
            mean_dense = (x, _offset_mean(y, pairs, ang, weights), qd, _offset_mean(kd, pairs, ang, weights))
        f, g, base = _rotary_system(gq, _offset_mean(gk, pairs, ang, weights), dims, mean_dense)
    zero = torch.zeros(hq, s, 2, dtype=ACC_DTYPE, device=dev)
    keep_p = _dims_projector(dims.reshape(hq, 2 * s), d)
    prune_p = torch.eye(d, dtype=ACC_DTYPE, device=dev) - keep_p
    if not compensate or s == 0:
        per = None if ang is None else _offset_errors(gq, gk, dense, pairs, ang, keep_p, prune_p, None)[0] * scale**2
        return RotaryQKSolution(coef=zero, lam=torch.zeros(hq, dtype=ACC_DTYPE, device=dev),
                                err_compensated=base * scale**2, err_uncompensated=base * scale**2,
                                err_per_offset=per, err_per_offset_uncompensated=per)
    e, v = torch.linalg.eigh(f)
    e = e.clamp_min(0)  # PSD up to rounding
    lam_t = lam_rel * e.mean(-1) if lam is None else torch.full((hq,), float(lam), dtype=ACC_DTYPE, device=dev)
    lam_t = torch.where(lam_t > 0, lam_t, torch.full_like(lam_t, 1e-30))
    lam_t = _rotary_well_posed_lambda(e, lam_t)
    theta = (v @ ((v.transpose(1, 2) @ g[:, :, None]) / (e + lam_t[:, None])[:, :, None]))[:, :, 0]
    if ang is None:
        err = (base - 2.0 * (theta * g).sum(-1) + torch.einsum("hi,hij,hj->h", theta, f, theta)).clamp_min(0)
        return RotaryQKSolution(coef=theta.reshape(hq, s, 2), lam=lam_t, err_compensated=err * scale**2,
                                err_uncompensated=base * scale**2)
    assert weights is not None
    m = _rotary_m(theta.reshape(hq, s, 2), dims, d)
    base_l, alpha, beta = _offset_errors(gq, gk, dense, pairs, ang, keep_p, prune_p, m)
    step = torch.where(alpha > 0, alpha / beta.clamp_min(1e-300), torch.zeros_like(alpha))
    t = step.amin(0).clamp(0.0, 1.0) if every_offset else torch.ones_like(alpha[0])
    per = (base_l - 2.0 * t * alpha + t * t * beta).clamp_min(0)
    return RotaryQKSolution(coef=(theta * t[:, None]).reshape(hq, s, 2), lam=lam_t,
                            err_compensated=(weights @ per) * scale**2, err_uncompensated=(weights @ base_l) * scale**2,
                            err_per_offset=per * scale**2, err_per_offset_uncompensated=base_l * scale**2)


def _offset_errors(gq: Tensor, gk: Tensor, dense: tuple[Tensor, Tensor, Tensor, Tensor] | None, pairs: Tensor,
                   ang: Tensor, keep_p: Tensor, prune_p: Tensor, m: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """At every offset l, (L, Hq) each: the uncompensated error e_l and, for the correction m, alpha_l and beta_l.

    The error with m is e_l - 2 alpha_l + beta_l: beta_l = E[(q^T M R_l k)^2] = <K_l, M^T G_Q M>,
    alpha_l = <M, X Y_l - G_Q Pi_S K_l> = <X^T M, Y_l> - <Pi_S G_Q M, K_l> (self: <Pi_P G_Q M, K_l>), with
    K_l = R_l G_K R_l^T, Y_l = R_l Y R_l^T: inner products with rotated moments, never a per-offset solve.
    """
    zero = torch.zeros(ang.shape[0], gq.shape[0], dtype=ACC_DTYPE, device=gq.device)
    if dense is None:
        k_terms = [prune_p @ gq @ prune_p]
        if m is not None:
            k_terms += [prune_p @ gq @ m, m.transpose(1, 2) @ gq @ m]
        out = _offset_inner(gk, pairs, ang, k_terms)
        return (out[0], out[1], out[2]) if m is not None else (out[0], zero, zero)
    x, y, qd, kd = dense
    k_terms = [keep_p @ gq @ keep_p]
    y_terms = [x.transpose(1, 2) @ keep_p]
    if m is not None:
        k_terms += [keep_p @ gq @ m, m.transpose(1, 2) @ gq @ m]
        y_terms += [x.transpose(1, 2) @ m]
    ko = _offset_inner(gk, pairs, ang, k_terms)
    yo = _offset_inner(y, pairs, ang, y_terms)
    (kdo,) = _offset_inner(kd, pairs, ang, [qd])
    base = (kdo - 2.0 * yo[0] + ko[0]).clamp_min(0)
    if m is None:
        return base, zero, zero
    return base, yo[1] - ko[1], ko[2]


# Rounds of the mixing fit's reweighting: offsets where the fit is worse than none weigh double in the next solve.
ROTARY_REWEIGHT_ROUNDS = 12


@dataclass(frozen=True)
class RotaryMixSolution:
    m: Tensor  # (Hq, d, 2s): logit = q^T (E_S^T + m) (R_l k)_S, the kept query rows become (E_S + m^T) W_Q[head]
    kept: Tensor  # (Hq, 2s) the kept dims of each query head, ascending: m's columns
    lam: Tensor  # (Hq,)
    err_compensated: Tensor  # (Hq,) offset-weighted expected squared logit error (scaled logits)
    err_uncompensated: Tensor  # (Hq,)
    err_per_offset: Tensor  # (L, Hq)
    err_per_offset_uncompensated: Tensor  # (L, Hq)
    rounds: int  # reweighting rounds used


def _mix_solve(gq_eig: tuple[Tensor, Tensor], gq: Tensor, gk: Tensor,
               dense: tuple[Tensor, Tensor, Tensor, Tensor] | None, pairs: Tensor, ang: Tensor, w: Tensor,
               kept: Tensor, keep_p: Tensor, prune_p: Tensor, lam: float | None, lam_rel: float) -> tuple[Tensor, Tensor]:
    """The mixing fit's normal equations under offset weights w (L, Hq), solved: (M (Hq, d, d), lambda (Hq,)).

    F = G_Q (x) Kbar_SS is a Kronecker product, so with G_Q = U diag(a) U^T and Kbar_SS = V diag(b) V^T
    the ridge solution is U [(U^T C V) / (a_i b_j + lambda)] V^T: O(d^3 + s^3 + d^2 s) per head, not O((d s)^3).
    """
    a, u = gq_eig
    kbar = _offset_mean(gk, pairs, ang, w)
    if dense is None:
        c = _gather_cols(gq @ prune_p @ kbar, kept)  # G_Q Pi_P Kbar[:, S]
    else:
        x, y, _, _ = dense
        c = _gather_cols(x @ _offset_mean(y, pairs, ang, w) - gq @ keep_p @ kbar, kept)  # X Ybar[:, S] - G_Q Pi_S Kbar[:, S]
    b, v = torch.linalg.eigh(_gather_blocks(kbar, kept, kept))
    e = a[:, :, None] * b.clamp_min(0)[:, None, :]  # F's eigenvalues, (Hq, d, 2s)
    hq = gq.shape[0]
    lam_t = lam_rel * e.mean((1, 2)) if lam is None else torch.full((hq,), float(lam), dtype=ACC_DTYPE, device=gq.device)
    lam_t = torch.where(lam_t > 0, lam_t, torch.full_like(lam_t, 1e-30))
    lam_t = _rotary_well_posed_lambda(e.flatten(1), lam_t)
    n = u @ ((u.transpose(1, 2) @ c @ v) / (e + lam_t[:, None, None])) @ v.transpose(1, 2)
    m = torch.zeros_like(gq)
    m.scatter_(2, kept[:, None, :].expand(-1, gq.shape[1], -1), n)
    return m, lam_t


def rotary_mix_compensation(
    q_second: Tensor, k_second: Tensor, pairs: Tensor, keep: Tensor, group: Tensor, rel_angles: Tensor,
    rel_weights: Tensor | None = None, *,
    q_cross: Tensor | None = None, k_cross: Tensor | None = None,
    qd_second: Tensor | None = None, kd_second: Tensor | None = None,
    lam: float | None = None, scale: float = 1.0, compensate: bool = True, lam_rel: float = QK_LAMBDA_REL,
    rounds: int = ROTARY_REWEIGHT_ROUNDS, every_offset: bool = True,
) -> RotaryMixSolution:
    """Mix every dim of a query head (kept pairs and removed ones) into its kept dims, fit over every offset.

    The moments are of q, k BEFORE the rotation (rotary_qk_compensation's positional arguments). Any
    linear map of q before the rotation folds into W_Q, so the kept query dims may become
    q_S + N^T q with N (d x 2s) free: the logit at offset l is then q^T Pi_S R_l k + q^T N (R_l k)_S,
    exactly, at every position, with no commutation needed (the mixed-in part rotates with the kept
    pair's frequency, and the fit sees that). The features q_j (R_l k)_i are bilinear, so over
    independent (query, key) pairs and the rel_weights-weighted offsets the normal equations are
    G_Q N Kbar_SS + lambda N = C, Kbar = sum_l w_l R_l G_K R_l^T and C = G_Q Pi_P Kbar[:, S] (self
    target) or X Ybar[:, S] - G_Q Pi_S Kbar[:, S] (dense target, Ybar the same mean of E[k_d k^T]).

    The mean over offsets can trade one offset for another; offsets where the fit comes out worse
    than none weigh double in the next solve (up to `rounds` re-solves, each the cheap one above),
    and then (every_offset) the solution is shortened per query head to t = min_l alpha_l / beta_l
    (rotary_qk_compensation's step; t = 1 when the reweighting already made every offset better).
    Cost per query head and solve: O(L P^2) for the rotated means, O(d^3 + s^3 + d^2 s) to solve.
    """
    gq = q_second.to(ACC_DTYPE)
    dev = gq.device
    d = gq.shape[1]
    group, pairs = group.to(dev), pairs.to(dev)
    gk = k_second.to(ACC_DTYPE)[group]
    hq, s = gq.shape[0], keep.shape[1]
    dims = pairs[keep.to(dev)][group]
    kept = torch.sort(dims.reshape(hq, 2 * s), dim=1).values
    dense = _dense_moments(group, q_cross, k_cross, qd_second, kd_second)
    ang = rel_angles.to(device=dev, dtype=ACC_DTYPE)
    w0 = (torch.ones(ang.shape[0], dtype=ACC_DTYPE, device=dev) if rel_weights is None
          else rel_weights.to(device=dev, dtype=ACC_DTYPE))
    w0 = w0 / w0.sum()
    keep_p = _dims_projector(kept, d)
    prune_p = torch.eye(d, dtype=ACC_DTYPE, device=dev) - keep_p
    base_l = _offset_errors(gq, gk, dense, pairs, ang, keep_p, prune_p, None)[0]
    none = RotaryMixSolution(m=torch.zeros(hq, d, 2 * s, dtype=ACC_DTYPE, device=dev), kept=kept,
                             lam=torch.zeros(hq, dtype=ACC_DTYPE, device=dev),
                             err_compensated=(w0 @ base_l) * scale**2, err_uncompensated=(w0 @ base_l) * scale**2,
                             err_per_offset=base_l * scale**2, err_per_offset_uncompensated=base_l * scale**2, rounds=0)
    if not compensate or s == 0:
        return none
    a, u = torch.linalg.eigh(gq)
    eig = (a.clamp_min(0), u)
    w = w0[:, None].expand(-1, hq).clone()
    used = 0
    while True:
        m, lam_t = _mix_solve(eig, gq, gk, dense, pairs, ang, w, kept, keep_p, prune_p, lam, lam_rel)
        _, alpha, beta = _offset_errors(gq, gk, dense, pairs, ang, keep_p, prune_p, m)
        worse = beta > 2.0 * alpha  # e_l - 2 alpha_l + beta_l > e_l
        if used == rounds or not bool(worse.any()):
            break
        w = w * torch.where(worse, 2.0, 1.0)
        w = w / w.sum(0)
        used += 1
    step = torch.where(alpha > 0, alpha / beta.clamp_min(1e-300), torch.zeros_like(alpha))
    t = step.amin(0).clamp(0.0, 1.0) if every_offset else torch.ones_like(alpha[0])
    per = (base_l - 2.0 * t * alpha + t * t * beta).clamp_min(0)
    return RotaryMixSolution(m=_gather_cols(m, kept) * t[:, None, None], kept=kept, lam=lam_t,
                             err_compensated=(w0 @ per) * scale**2, err_uncompensated=(w0 @ base_l) * scale**2,
                             err_per_offset=per * scale**2, err_per_offset_uncompensated=base_l * scale**2, rounds=used)


def _dense_moments(group: Tensor, q_cross: Tensor | None, k_cross: Tensor | None, qd_second: Tensor | None,
                   kd_second: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(X, Y, E[q_d q_d^T], E[k_d k_d^T]) per query head, X = E[q q_d^T], Y = E[k_d k^T]; None for the self target."""
    present = [x is not None for x in (q_cross, k_cross, qd_second, kd_second)]
    if any(present) and not all(present):
        raise ValueError("the dense target needs all of q_cross, k_cross, qd_second, kd_second")
    if not all(present):
        return None
    assert q_cross is not None and k_cross is not None and qd_second is not None and kd_second is not None
    return (q_cross.to(ACC_DTYPE), k_cross.to(ACC_DTYPE)[group].transpose(1, 2),
            qd_second.to(ACC_DTYPE), kd_second.to(ACC_DTYPE)[group])


def _rotary_well_posed_lambda(e: Tensor, lam: Tensor) -> Tensor:
    """Raise a query head's lambda where e_i + lam spans more than COND_LIMIT (a dead kept pair), and say so."""
    top, bottom = e.amax(-1), e.amin(-1)
    bad = (top + lam) > COND_LIMIT * (bottom + lam)
    if not bool(bad.any()):
        return lam
    raised = torch.where(bad, torch.maximum(lam, (top - COND_LIMIT * bottom) / (COND_LIMIT - 1.0)), lam)
    heads = bad.nonzero().flatten().tolist()
    log.warning("rotary Q/K solve was ill-conditioned for query head(s) %s; lambda raised from %.3g to %.3g",
                heads, float(lam[heads].max()), float(raised[heads].max()))
    return raised


def fold_rotary_q(
    wq: Tensor, bq: Tensor | None, pairs: Tensor, keep: Tensor, coef: Tensor, group: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """Fold the complex scales into W_Q (Hq*d, dim) at full width: kept pairs' rows get (I + C), removed pairs' rows 0.

    For kept pair (i, j) of query head h with (a, b) = coef[h, p]: q_i' = (1+a) q_i - b q_j,
    q_j' = b q_i + (1+a) q_j, a complex multiplication, so it commutes with the rotation and
    the folded model's logits equal the fitted ones at every position. W_K is untouched (one
    kv head serves the group). Zeroed rows make the masked model equal the compacted one;
    a family compacts by taking the kept rows in its own rotary layout (rotary_kept_dims).
    """
    hq = int(group.shape[0])
    d = wq.shape[0] // hq
    dev = wq.device
    dims = pairs.to(dev)[keep.to(dev)][group.to(dev)]  # (Hq, s, 2)
    base = torch.arange(hq, device=dev)[:, None] * d
    ri = (base + dims[..., 0]).reshape(-1)
    rj = (base + dims[..., 1]).reshape(-1)
    a = 1.0 + coef[..., 0].reshape(-1, 1).to(device=dev, dtype=ACC_DTYPE)
    b = coef[..., 1].reshape(-1, 1).to(device=dev, dtype=ACC_DTYPE)

    def apply(x: Tensor) -> Tensor:
        x64 = x.to(ACC_DTYPE).reshape(hq * d, -1)
        out = torch.zeros_like(x64)
        xi, xj = x64[ri], x64[rj]
        out[ri] = a * xi - b * xj
        out[rj] = b * xi + a * xj
        return out.reshape(x.shape).to(x.dtype)

    return apply(wq), (apply(bq) if bq is not None else None)


def rotary_pairs_of_dims(pairs: Tensor, dims: Tensor) -> Tensor:
    """Kept pair indices (H, s) from kept dims (H, 2s): a ValueError unless the dims are whole pairs."""
    d = int(pairs.max()) + 1
    member = torch.zeros(dims.shape[0], d, dtype=torch.bool, device=dims.device)
    member.scatter_(1, dims, True)
    both = member[:, pairs[:, 0]] & member[:, pairs[:, 1]]
    either = member[:, pairs[:, 0]] | member[:, pairs[:, 1]]
    if bool((both != either).any()) or int(both.sum(1).min()) * 2 != dims.shape[1] or \
            int(both.sum(1).max()) * 2 != dims.shape[1]:
        raise ValueError("kept Q/K dims of a rotary head must be whole rotation pairs")
    return torch.stack([torch.nonzero(r).flatten() for r in both])


def rotary_correction_matrix(pairs: Tensor, keep: Tensor, coef: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """The complex scales as a query-side correction: (kept dims (Hq, 2s) ascending, M (Hq, d, 2s)).

    logit = q^T (E_S^T + M) k_S, M = C^T on each kept pair and 0 on the removed dims' rows: the
    form of rotary_mix_compensation's M, so fold_rotary_mix folds either; it is fold_rotary_q in
    the kept-dims order.
    """
    d = int(pairs.max()) + 1
    dims = pairs[keep][group]  # (Hq, s, 2)
    full = _rotary_m(coef.to(ACC_DTYPE), dims, d)
    flat = torch.sort(dims.reshape(dims.shape[0], -1), dim=1).values
    return flat, _gather_cols(full, flat)


def fold_rotary_mix(wq: Tensor, bq: Tensor | None, heads: Tensor, kept: Tensor, m: Tensor,
                    ) -> tuple[Tensor, Tensor | None]:
    """The kept query rows (Hk * 2s, dim) of query heads `heads` with a query-side correction folded in.

    kept (Hk, 2s): each head's kept dims in the order its narrow head holds them; m (Hk, d, 2s) with
    logit = q^T (E_S^T + m) k_S: the rows become (E_S + m^T) W_Q[head], every dim of the head mixed
    into the kept ones. A linear map of q before the rotation, so the logits are the fitted ones at
    every position (rotary_mix_compensation).
    """
    hk, ds = kept.shape
    d = m.shape[1]
    dev = wq.device
    rows = (heads.to(dev)[:, None] * d + torch.arange(d, device=dev)).reshape(-1)
    t = m.to(device=dev, dtype=ACC_DTYPE).transpose(1, 2).clone()  # (Hk, 2s, d)
    t.scatter_add_(2, kept.to(dev)[:, :, None], torch.ones(hk, ds, 1, dtype=ACC_DTYPE, device=dev))
    w = (t @ wq.to(ACC_DTYPE)[rows].reshape(hk, d, -1)).reshape(hk * ds, -1).to(wq.dtype)
    b = None if bq is None else (t @ bq.to(ACC_DTYPE)[rows].reshape(hk, d, 1)).reshape(-1).to(bq.dtype)
    return w, b


def rotary_kept_dims(pairs: Tensor, keep: Tensor, *, split: bool) -> Tensor:
    """The kept dims of each kv head (Hkv, 2s), in the order a compacted head keeps its rotary layout.

    split=True (half-split layout, pairs (j, j + d/2)): every pair's first dim, then every
    pair's second, so the narrow head is half-split again. split=False (interleaved, (2j, 2j+1)):
    pair by pair.
    """
    dims = pairs[keep]  # (Hkv, s, 2)
    return (dims.transpose(1, 2) if split else dims).reshape(keep.shape[0], -1)


def rotary_qk_error_grid(
    q_second: Tensor, k_second: Tensor, scores: Tensor, pairs: Tensor, group: Tensor, widths: list[int], *,
    lam: float | None = None, scale: float = 1.0, compensate: bool = True,
    q_cross: Tensor | None = None, k_cross: Tensor | None = None,
    qd_second: Tensor | None = None, kd_second: Tensor | None = None,
    rel_angles: Tensor | None = None, rel_weights: Tensor | None = None,
) -> Tensor:
    """Per-query-head logit error (len(widths), Hq) when each kv head keeps its top-`w` pairs by `scores` (Hkv, P).

    The keyword moments are rotary_qk_compensation's; with rel_angles the solve is the prune's,
    rotary_mix_compensation. Without a dense target keeping all P
    pairs costs nothing (0); with one it is the remaining dense-vs-pruned error, solved too.
    One thread, as qk_error_grid (many small batched eigendecompositions).
    """
    npairs = scores.shape[1]
    dense = q_cross is not None
    out = torch.zeros(len(widths), int(group.shape[0]), dtype=ACC_DTYPE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for j, w in enumerate(widths):
            if w >= npairs and not dense:
                continue
            keep = select_top_per_head(scores, min(w, npairs))
            target = dict(q_cross=q_cross, k_cross=k_cross, qd_second=qd_second, kd_second=kd_second)
            if rel_angles is not None:  # the positional fit the prune folds: every query dim mixed in
                sol: RotaryQKSolution | RotaryMixSolution = rotary_mix_compensation(
                    q_second, k_second, pairs, keep, group, rel_angles, rel_weights, lam=lam, scale=scale,
                    compensate=compensate, **target)
            else:
                sol = rotary_qk_compensation(q_second, k_second, pairs, keep, group, lam=lam, scale=scale,
                                             compensate=compensate, **target)
            out[j] = (sol.err_compensated if compensate else sol.err_uncompensated).cpu()
    finally:
        torch.set_num_threads(threads)
    return out

@dataclass
class Menu:
    """One choice among options: option k costs `flops[k]` and adds `err[k]` to the objective."""

    err: Tensor  # (K,) float64
    flops: Tensor  # (K,) float64
    kv: Tensor | None = None  # (K,) a second cost (KV-cache bytes per token); None: 0


@dataclass
class Alternative:
    """A fixed cost plus one option from each of its menus (e.g. a head count, then Q/K and V/O widths)."""

    err: float
    flops: float
    menus: list[Menu]
    kv: float = 0.0  # the second cost of the fixed part


def picked_kv(groups: list[list[Alternative]], picks: list[tuple[int, list[int]]]) -> float:
    """The second cost (KV bytes) of a choice."""
    return sum(alts[a].kv + sum(float(m.kv[k]) for m, k in zip(alts[a].menus, ks) if m.kv is not None)
               for alts, (a, ks) in zip(groups, picks))


def _priced(groups: list[list[Alternative]], nu: float) -> list[list[Alternative]]:
    """The groups with the second cost priced into the error at nu per unit."""
    return [[Alternative(a.err + nu * a.kv, a.flops,
                         [Menu(m.err + nu * m.kv if m.kv is not None else m.err, m.flops, m.kv) for m in a.menus], a.kv)
             for a in alts] for alts in groups]


def allocate_two_budgets(groups: list[list[Alternative]], budget: float, kv_budget: float) -> list[tuple[int, list[int]]]:
    """allocate_budget with a second budget on the `kv` costs (KV-cache bytes), both held.

    The second constraint is priced into the error at a multiplier nu (a second Lagrangian), bisected
    to the smallest nu whose FLOPs-budgeted choice also fits the KV budget; the FLOPs allocation (and its
    greedy fill, which then never buys KV bytes that are not worth nu each) runs for every nu tried.
    Raises ValueError when even the KV-cheapest choice within the FLOPs budget does not fit.
    """
    picks = allocate_budget(groups, budget)
    if picked_kv(groups, picks) <= kv_budget:
        return picks
    nu = _smallest_multiplier(lambda x: picked_kv(groups, allocate_budget(_priced(groups, x), budget)) > kv_budget,
                              100, 1e-9, "no choice within the FLOPs budget meets the KV budget")
    return allocate_budget(_priced(groups, nu), budget)


def _smallest_multiplier(too_big: Callable[[float], bool], rounds: int, rel: float, why: str) -> float:
    """The smallest multiplier (> 0, bisected in log space) whose choice is not `too_big`; ValueError(why) if none."""
    lo, hi = 0.0, 1e-30
    while too_big(hi):
        lo, hi = hi, hi * 10.0
        if hi > 1e300:
            raise ValueError(why)
    for _ in range(rounds):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 10.0
        if mid <= lo or mid >= hi:
            break
        if too_big(mid):
            lo = mid
        else:
            hi = mid
        if lo > 0 and hi / lo < 1 + rel:
            break
    return hi


def _lagrangian(groups: list[list[Alternative]], mu: float) -> tuple[float, list[tuple[int, list[int]]]]:
    total = 0.0
    picks: list[tuple[int, list[int]]] = []
    for alts in groups:
        best: tuple[float, float, int, list[int]] | None = None
        for a, alt in enumerate(alts):
            cost, flops, opts = alt.err + mu * alt.flops, alt.flops, []
            for menu in alt.menus:
                k = int(torch.argmin(menu.err + mu * menu.flops))
                opts.append(k)
                cost += float(menu.err[k] + mu * menu.flops[k])
                flops += float(menu.flops[k])
            if best is None or cost < best[0]:
                best = (cost, flops, a, opts)
        assert best is not None
        total += best[1]
        picks.append((best[2], best[3]))
    return total, picks


def _picked_flops(groups: list[list[Alternative]], picks: list[tuple[int, list[int]]]) -> float:
    return sum(alts[a].flops + sum(float(m.flops[k]) for m, k in zip(alts[a].menus, ks))
               for alts, (a, ks) in zip(groups, picks))


def allocate_budget(groups: list[list[Alternative]], budget: float) -> list[tuple[int, list[int]]]:
    """Choose one alternative per group and one option per menu, minimising total err with total flops <= budget.

    The Lagrangian relaxation min sum(err + mu * flops) separates into groups and menus; mu
    is bisected (in log space) to the smallest value whose choice fits the budget, and the
    budget left over is then filled greedily, one option at a time, by the steps that lower
    the error most per FLOP (or keep it, when nothing lowers it). The relaxation only finds
    choices on the convex hull, so last each group tries its other alternatives (a head count
    off the hull) with what the rest leaves it. Raises ValueError when even the cheapest
    choice does not fit.
    """
    cheapest = sum(min(a.flops + sum(float(m.flops.min()) for m in a.menus) for a in alts) for alts in groups)
    if cheapest > budget:
        raise ValueError(f"the cheapest allowed widths cost {cheapest:.6g} FLOPs, above the budget {budget:.6g}")
    flops0, picks = _lagrangian(groups, 0.0)
    if flops0 > budget:
        hi = _smallest_multiplier(lambda mu: _lagrangian(groups, mu)[0] > budget, 200, 1e-12,
                                  "no multiplier meets the budget")
        picks = _lagrangian(groups, hi)[1]
    return _switch_alternatives(groups, _fill(groups, picks, budget), budget)


def _picked_err(groups: list[list[Alternative]], picks: list[tuple[int, list[int]]]) -> float:
    return sum(alts[a].err + sum(float(m.err[k]) for m, k in zip(alts[a].menus, ks))
               for alts, (a, ks) in zip(groups, picks))


def _switch_alternatives(groups: list[list[Alternative]], picks: list[tuple[int, list[int]]],
                         budget: float) -> list[tuple[int, list[int]]]:
    """Local search: move one group to another alternative, best-filled within the FLOPs it may use, while it helps."""
    picks = [(a, list(ks)) for a, ks in picks]
    improved = True
    while improved:
        improved = False
        for g, alts in enumerate(groups):
            if len(alts) < 2:
                continue
            own = [picks[g]]
            room = budget - _picked_flops(groups, picks) + _picked_flops([alts], own)
            current = _picked_err([alts], own)
            for a, alt in enumerate(alts):
                if a == picks[g][0] or alt.flops + sum(float(m.flops.min()) for m in alt.menus) > room:
                    continue
                (_, ks), = allocate_budget([[alt]], room) if len(alt.menus) else [(0, [])]
                if _picked_err([alts], [(a, ks)]) < current - 1e-12 * max(1.0, abs(current)):
                    picks[g] = (a, ks)
                    current = _picked_err([alts], picks[g:g + 1])
                    improved = True
    return picks


def _fill(groups: list[list[Alternative]], picks: list[tuple[int, list[int]]], budget: float) -> list[tuple[int, list[int]]]:
    """Spend what the budget leaves: repeatedly take the single option change with the best error drop per FLOP."""
    picks = [(a, list(ks)) for a, ks in picks]
    spent = _picked_flops(groups, picks)
    while True:
        left = budget - spent
        best: tuple[float, int, int, int, float] | None = None  # (score, group, menu, option, extra flops)
        for g, (a, ks) in enumerate(picks):
            for j, (menu, k) in enumerate(zip(groups[g][a].menus, ks)):
                extra = menu.flops - menu.flops[k]
                gain = menu.err[k] - menu.err
                ok = (extra > 0) & (extra <= left) & (gain >= 0)
                if not bool(ok.any()):
                    continue
                score = torch.where(ok, gain / extra.clamp_min(1e-30), torch.full_like(gain, -1.0))
                # among equal scores the larger step first, so flat error curves still fill the budget quickly
                kk = int(torch.argmax(score + 1e-300 * extra))
                cand = (float(score[kk]), g, j, kk, float(extra[kk]))
                if best is None or cand[0] > best[0] or (cand[0] == best[0] and cand[4] > best[4]):
                    best = cand
        if best is None:
            return picks
        _, g, j, kk, extra = best
        picks[g][1][j] = kk
        spent += extra

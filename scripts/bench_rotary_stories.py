"""Rotary Q/K pair compensation on the real TinyStories Llama's q/k projections, at every relative offset.

For each layer of ../shared/data/llama-stories260k (8 query heads, 4 kv heads, 4 rotary pairs
per head, half-split layout), on 64-token windows of its own stories: keep the top `keep` pairs
per kv head (pair-energy ranker), fit the correction, fold it into the queries and apply the real
rotation; print, per layer, the logit error with the correction relative to without it (weighted
over causal offsets 0..63 as they occur in a window, and the worst offset), for
  - pooled:     complex scales (engine.rotary_qk_compensation), statistics of q, k after the
                rotation, pooled over positions (independent pairs);
  - averaged:   complex scales, statistics before the rotation, the offset-weighted mean error minimised;
  - positional: the same, shortened per query head to help at every offset;
  - mixing:     every query dim mixed into the kept ones (engine.rotary_mix_compensation, the
                default): offsets worse than none reweighted, then shortened to help at every offset;
  - dense:      mixing, but the q/k come from a stream drifted by pruning half of layer 0's MLP
                units uncompensated, and the target is the dense stream's logit (layers 1-4).
Calibration (fit) and evaluation windows are disjoint stories. Then, per layer, the share of the dense
attention mass within the last 1 / 4 / 16 / 64 / 128 tokens of whole stories.

    python scripts/bench_rotary_stories.py [--data DIR] [--keep 2,3]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from corp_cli import engine as E  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llama-stories260k"
D64 = torch.float64
T = 64


def rotate(x: Tensor, pairs: Tensor, freqs: Tensor) -> Tensor:
    """x (S, T, H, d) rotated at positions 0..T-1."""
    ang = torch.arange(x.shape[1], dtype=D64)[:, None] * freqs[None]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    out = x.clone()
    xi, xj = x[..., pairs[:, 0]], x[..., pairs[:, 1]]
    out[..., pairs[:, 0]] = xi * cos - xj * sin
    out[..., pairs[:, 1]] = xi * sin + xj * cos
    return out


def grams(x: Tensor, y: Tensor | None = None) -> Tensor:
    x = x.reshape(-1, *x.shape[2:])
    y = x if y is None else y.reshape(-1, *y.shape[2:])
    return torch.einsum("nhi,nhj->hij", x, y) / x.shape[0]


def capture(model, ids: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    att = model.model.layers[layer].self_attn
    cap: dict[str, Tensor] = {}
    hs = [att.q_proj.register_forward_hook(lambda m, i, o: cap.__setitem__("q", o.detach().to(D64))),
          att.k_proj.register_forward_hook(lambda m, i, o: cap.__setitem__("k", o.detach().to(D64)))]
    with torch.no_grad():
        model(ids)
    for h in hs:
        h.remove()
    d = model.config.head_dim
    return cap["q"].reshape(*ids.shape, -1, d), cap["k"].reshape(*ids.shape, -1, d)


def offset_errors(qd: Tensor, kd: Tensor, qm: Tensor, km: Tensor, group: Tensor) -> Tensor:
    """(T,) mean squared logit error at each causal offset, summed over query heads (all rotated)."""
    err = (torch.einsum("snhd,smhd->shnm", qd, kd[:, :, group]) - torch.einsum("snhd,smhd->shnm", qm, km[:, :, group])) ** 2
    return torch.stack([torch.diagonal(err, offset=-lag, dim1=2, dim2=3).mean((0, 2)).sum() for lag in range(qd.shape[1])])


def fold(q: Tensor, pairs: Tensor, keep: Tensor, coef: Tensor, group: Tensor) -> Tensor:
    hq, d = q.shape[2], q.shape[3]
    w, _ = E.fold_rotary_q(torch.eye(hq * d, dtype=D64), None, pairs, keep, coef, group)
    return (q.reshape(*q.shape[:2], -1) @ w.T).reshape(q.shape)


def fold_mix(q: Tensor, sol: E.RotaryMixSolution) -> Tensor:
    """The folded narrow queries (engine.fold_rotary_mix, W_Q = I) at their kept dims, zeros elsewhere."""
    hq, d = q.shape[2], q.shape[3]
    w, _ = E.fold_rotary_mix(torch.eye(hq * d, dtype=D64), None, torch.arange(hq), sol.kept, sol.m)
    narrow = (q.reshape(*q.shape[:2], -1) @ w.T).reshape(*q.shape[:2], hq, -1)
    return torch.zeros_like(q).scatter_(3, sol.kept[None, None].expand(*q.shape[:2], -1, -1), narrow)


def attention_mass(data: Path, stories: list[str], tok, spans: tuple[int, ...] = (1, 4, 16, 64, 128)) -> None:  # noqa: ANN001
    """Print, per layer, the share of the dense attention mass on keys fewer than each span tokens back.

    Whole stories (up to 512 tokens, one at a time), the model's attention probabilities summed
    over queries and heads by causal offset: what the decoder family's offset range (hf_llama
    ROTARY_OFFSETS) is read against."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(data, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    mass = torch.zeros(model.config.num_hidden_layers, 512, dtype=D64)
    with torch.no_grad():
        for text in stories:
            ids = tok(text, return_tensors="pt").input_ids[:, :512]
            for i, a in enumerate(model(ids, output_attentions=True).attentions):  # (1, H, N, N)
                n = a.shape[-1]
                mass[i, :n] += torch.stack([torch.diagonal(a[0], offset=-lag, dim1=1, dim2=2).sum() for lag in range(n)]).double()
    print(f"\nshare of the attention mass within the last k tokens ({len(stories)} whole stories, up to 512 tokens):")
    print("| layer | " + " | ".join(f"k = {k}" for k in spans) + " |")
    print("|---|" + "---|" * len(spans))
    for i, m in enumerate(mass):
        share = m.cumsum(0) / m.sum()
        print(f"| {i} | " + " | ".join(f"{float(share[k - 1]):.3f}" for k in spans) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--keep", default="2,3", help="kept pairs per kv head (of 4), comma list")
    args = ap.parse_args()
    import transformers

    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.data, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(args.data)
    wins = [tok(s, return_tensors="pt").input_ids[0][:T] for s in (args.data / "stories.txt").read_text().splitlines()]
    wins = [w for w in wins if len(w) == T]
    calib, held = torch.stack(wins[0::2]), torch.stack(wins[1::2])
    cfg = model.config
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    group = torch.arange(hq) // (hq // hkv)
    pairs = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], 1)
    freqs = cfg.rope_parameters["rope_theta"] ** (-torch.arange(d // 2, dtype=D64) * 2 / d)
    off = torch.arange(T, dtype=D64)
    angles, weights = -off[:, None] * freqs[None], T - off
    wn = weights / weights.sum()
    dense_qk = {i: (capture(model, calib, i), capture(model, held, i)) for i in range(cfg.num_hidden_layers)}
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.weight[:, ::2] = 0.0
    drift_qk = {i: (capture(model, calib, i), capture(model, held, i)) for i in range(1, cfg.num_hidden_layers)}
    print(f"windows: {len(calib)} calibration, {len(held)} held-out, {T} tokens; ratio = error with / without "
          "the correction on the held-out windows (weighted over offsets 0..63 | worst offset)")
    print("| layer | kept pairs | pooled | averaged | positional | mixing (default) | dense target (drifted stream) |")
    print("|---|---|---|---|---|---|---|")
    for keep_n in [int(x) for x in args.keep.split(",")]:
        for i in range(cfg.num_hidden_layers):
            cells = []
            (qc, kc), (qh, kh) = dense_qk[i]
            qh_r, kh_r = rotate(qh, pairs, freqs), rotate(kh, pairs, freqs)
            for mode in ("pooled", "averaged", "positional", "mixing", "dense"):
                if mode == "dense" and i == 0:
                    cells.append("-")
                    continue
                if mode == "dense":
                    (qpc, kpc), (qph, kph) = drift_qk[i]
                    gq, gk = grams(qpc), grams(kpc)
                    kw = dict(rel_angles=angles, rel_weights=weights, q_cross=grams(qpc, qc), k_cross=grams(kpc, kc),
                              qd_second=grams(qc), kd_second=grams(kc))
                    q_eval, k_eval = qph, kph
                elif mode == "pooled":
                    gq, gk = grams(rotate(qc, pairs, freqs)), grams(rotate(kc, pairs, freqs))
                    kw, q_eval, k_eval = {}, qh, kh
                else:
                    gq, gk = grams(qc), grams(kc)
                    kw = dict(rel_angles=angles, rel_weights=weights, every_offset=mode != "averaged")
                    q_eval, k_eval = qh, kh
                keep = E.select_top_per_head(E.rotary_pair_scores(gq, gk, pairs, group, **({} if mode == "pooled" else
                                                    dict(rel_angles=angles, rel_weights=weights))), keep_n)
                k_r = rotate(k_eval, pairs, freqs)
                if mode in ("mixing", "dense"):
                    mix = E.rotary_mix_compensation(gq, gk, pairs, keep, group, angles, weights,
                                                    **{k: v for k, v in kw.items() if not k.startswith("rel_")})
                    q_fold = fold_mix(q_eval, mix)
                else:
                    sol = E.rotary_qk_compensation(gq, gk, pairs, keep, group, **kw)
                    q_fold = fold(q_eval, pairs, keep, sol.coef, group)
                with_c = offset_errors(qh_r, kh_r, rotate(q_fold, pairs, freqs), k_r, group)
                without = offset_errors(qh_r, kh_r, rotate(fold(q_eval, pairs, keep, torch.zeros(hq, keep_n, 2, dtype=D64),
                                                                group), pairs, freqs), k_r, group)
                ratio = with_c / without
                cells.append(f"{float(wn @ with_c / (wn @ without)):.3f} \\| {float(ratio.max()):.3f}")
            print(f"| {i} | {keep_n} of 4 | " + " | ".join(cells) + " |")
    attention_mass(args.data, (args.data / "stories.txt").read_text().splitlines(), tok)


if __name__ == "__main__":
    main()

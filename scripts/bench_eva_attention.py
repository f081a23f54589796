"""EVA-02 attention pruning: compensated vs uncompensated error for each new part, on real images.

Random-init EVA-02 weights of the eva02_tiny / eva02_small shapes (timm, seed 0; no pretrained
weights are needed for the question asked: does the compensation lower the error the removal
causes?) and the shared ImageNet sample (../shared/data/imagenet-sample): calibrate on the
first --calib images, measure on the next --held images (disjoint). For each new part at
--sparsity (Q/K rotary pairs, value/output dims, whole heads, and all three at once), with and
without compensation, it prints the predicted error summed over the blocks (the report's, in
each part's own units: scaled logits for Q/K, the projection output for V/O and heads) and the
measured held-out error of the model's output features, relative to the dense features:
mean ||f - f_dense||^2 / mean ||f_dense||^2, and the classifier logits' the same way.

    python scripts/bench_eva_attention.py [--models eva02_tiny_patch14_224,eva02_small_patch14_224]
        [--calib 64] [--held 64] [--sparsity 0.5] [--data DIR]

With --offsets BLOCKS (e.g. 0,5,11) it instead measures the Q/K correction of those blocks alone
(half the pairs of every head removed) by (query, key) offset class on the held-out images: the
logit error with / without the correction for each relative offset of the patch grid (worst and
mean over the offsets), and for the class token's row (as query) and column (as key), whose
query and key are never rotated.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch

from timm.layers.pos_embed_sincos import apply_rot_embed_cat

from corp_cli import api, engine
from corp_cli.data import make_batches, open_source
from corp_cli.preprocess import resolve_preprocessing
from corp_cli.pruning import rotary_layout

SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
PARTS = {"Q/K pairs": "qk", "V/O dims": "vo", "heads": "heads", "Q/K + V/O + heads": "qk,vo,heads"}


def _outputs(loaded: api.Loaded, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = [], []
    with torch.inference_mode():
        for x in batches:
            out = loaded.family.outputs(loaded, {"pixel_values": x})
            feats.append(out.features.double())
            logits.append(loaded.model(x).double())  # the (random) 1000-class head, which is not pruned
    return torch.cat(feats), torch.cat(logits)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).square().sum(1).mean() / ref.square().sum(1).mean())


def _predicted(blocks: list[dict], key: str) -> tuple[float, float]:
    """Summed predicted errors: key "_logit_error" for Q/K (the report's "attn"), "_error" for o ("vo")."""
    part = "attn" if key == "_logit_error" else "vo"
    comp = unc = 0.0
    for b in blocks:
        if part in b:
            e = b[part]
            c, u = e[f"predicted{key}_compensated"], e[f"predicted{key}_uncompensated"]
            comp += sum(c) if isinstance(c, list) else c
            unc += sum(u) if isinstance(u, list) else u
    return comp, unc


def _offset_study(dense: api.Loaded, stats: object, held: list[torch.Tensor], blocks: list[int], sparsity: float) -> None:
    model, fam = dense.model, dense.family
    side = int(model.patch_embed.grid_size[0])
    rows, cols = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    # patch-patch offset class of every (query a, key b) pair, numbered; the class token is token 0
    dr = rows[None, :] - rows[:, None] + side - 1
    dc = cols[None, :] - cols[:, None] + side - 1
    patch_class = (dr * (2 * side - 1) + dc).reshape(-1)
    rope = model.rope.get_embed().double()

    def rot(x: torch.Tensor) -> torch.Tensor:  # timm's rotation: patch tokens turned, the class token not
        return torch.cat([x[:, :, :1], apply_rot_embed_cat(x[:, :, 1:], rope)], 2)

    print("| block | patch offsets: worst | patch offsets: mean | class token as query | class token as key | all pairs |")
    print("|---|---|---|---|---|---|")
    for i in blocks:
        st = stats.blocks[i]["attn"]
        n = int(st["count"].sum())
        lay = rotary_layout(fam, model, i)
        gq, gk = st["q_gram"] / n, st["k_gram"] / n
        npairs = lay.pairs.shape[0]
        keep = engine.select_top_per_head(engine.rotary_pair_scores(gq, gk, lay.pairs, lay.group, **lay.fit_kwargs()),
                                          npairs - int(sparsity * npairs))
        assert lay.angles is not None
        mix = engine.rotary_mix_compensation(gq, gk, lay.pairs, keep, lay.group, lay.angles, lay.weights)
        hq, d = gq.shape[0], gq.shape[1]
        dims = engine.rotary_kept_dims(lay.pairs, keep, split=False)
        kmask = torch.zeros(hq, d, dtype=torch.float64).scatter_(1, dims, 1.0)[None, :, None, :]
        sums = [torch.zeros(side * side + 1, side * side + 1, dtype=torch.float64) for _ in range(2)]
        for x in held:
            got: dict[str, torch.Tensor] = {}
            hooks = fam.qk_hook(model, i, lambda q, k: got.update(q=q.detach().double(), k=k.detach().double()))
            with torch.inference_mode():
                model(x)
            for h in hooks:
                h.remove()
            q, k = got["q"], got["k"]
            ref = rot(q) @ rot(k).transpose(-1, -2)
            for s_, m in zip(sums, (mix.m, 0 * mix.m)):
                # the folded rows (engine.fold_rotary_mix, W_Q = I per head) placed at their kept dims
                w, _ = engine.fold_rotary_mix(torch.eye(hq * d, dtype=torch.float64), None, torch.arange(hq), mix.kept, m)
                per_head = torch.zeros(hq, d, d, dtype=torch.float64)
                per_head.scatter_(1, mix.kept[:, :, None].expand(-1, -1, d),
                                  torch.stack([w[h * mix.kept.shape[1]:(h + 1) * mix.kept.shape[1], h * d:(h + 1) * d]
                                               for h in range(hq)]))
                qf = torch.einsum("hij,bhnj->bhni", per_head, q)
                s_ += ((rot(qf) @ rot(k * kmask).transpose(-1, -2) - ref) ** 2).sum((0, 1))
        comp, none = sums
        pc = torch.zeros(int(patch_class.max()) + 1, dtype=torch.float64).index_add_(0, patch_class, comp[1:, 1:].reshape(-1))
        pn = torch.zeros_like(pc).index_add_(0, patch_class, none[1:, 1:].reshape(-1))
        ratio = pc / pn
        print(f"| {i} | {float(ratio.max()):.4f} | {float(ratio.mean()):.4f} | {float(comp[0].sum() / none[0].sum()):.4f} | "
              f"{float(comp[:, 0].sum() / none[:, 0].sum()):.4f} | {float(comp.sum() / none.sum()):.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="eva02_tiny_patch14_224,eva02_small_patch14_224")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--held", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data", default=str(SHARED_IMAGES))
    ap.add_argument("--offsets", default=None, help="blocks for the per-offset Q/K study (comma list), instead of the table")
    args = ap.parse_args()
    print(f"images: {args.calib} calibration + {args.held} held-out from {args.data}; sparsity {args.sparsity}; "
          "random-init weights (timm, seed 0)")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        dense = api.adopt(model)
        prep = resolve_preprocessing(model)
        src = open_source(args.data, samples=args.calib + args.held, seed=0)
        images = torch.cat([x for x, _ in make_batches(src, prep.transform(), args.batch_size, num_workers=0)])
        calib = list(images[:args.calib].split(args.batch_size))
        held = list(images[args.calib:args.calib + args.held].split(args.batch_size))
        t0 = time.perf_counter()
        stats = api.calibrate(dense, calib, parts=("mlp", "attn", "vo"))
        t_cal = time.perf_counter() - t0
        if args.offsets is not None:
            print(f"\n{name}: Q/K logit error with / without the correction, held-out images\n")
            _offset_study(dense, stats, held, [int(b) for b in args.offsets.split(",")], args.sparsity)
            continue
        f_dense, l_dense = _outputs(dense, held)
        print(f"\n{name} (calibration {t_cal:.1f} s)\n")
        print("| part | compensation | predicted error (sum over blocks) | held-out feature error | held-out logit error | prune s |")
        print("|---|---|---|---|---|---|")
        for label, target in PARTS.items():
            for comp in (True, False):
                t0 = time.perf_counter()
                res = api.prune(dense, stats, target=target, sparsity=args.sparsity, compensation=comp)
                t_pr = time.perf_counter() - t0
                f, lg = _outputs(res.loaded, held)
                parts = []
                if "qk" in target:
                    c, u = _predicted(res.blocks, "_logit_error")
                    parts.append(f"Q/K {c if comp else u:.4g}")
                if "vo" in target or "heads" in target:
                    c, u = _predicted(res.blocks, "_error")
                    parts.append(f"o {c if comp else u:.4g}")
                print(f"| {label} | {'yes' if comp else 'no'} | {', '.join(parts)} | {_rel(f, f_dense):.4g} | "
                      f"{_rel(lg, l_dense):.4g} | {t_pr:.1f} |")


if __name__ == "__main__":
    main()

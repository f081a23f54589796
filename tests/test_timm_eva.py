"""timm Eva (EVA-02): rotary Q/K pairs, value/output dims and whole heads.

The rope layout is read off timm's own rotation, the class token (never rotated) keeps its
logits right, the narrow attention with nothing removed is timm's attention, the Q/K
correction lowers the logit error at every (query, key) offset class of the patch grid on
real images, a FLOPs budget keeps whole pairs, and what is saved reloads.
compacted == masked with every part, and a reload in a fresh process: tests/test_family_contract.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from torch import Tensor
from torch.testing import assert_close

from corp_cli import api, engine
from corp_cli.compact import load_pruned_loaded
from corp_cli.family import AttentionCut
from corp_cli.registry import by_name

from .conftest import masked_reference
from .test_family_contract import _images, _outputs

FAM = by_name("timm-eva")
IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"


def _eva(size: int = 28, depth: int = 2, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=size, depth=depth, num_classes=5,
                             **kw).eval()


def _rotate_pairs(x: Tensor, pairs: Tensor, theta: Tensor) -> Tensor:
    """x (..., N, d): pair p of token n turned by theta[n, p]."""
    out = x.clone()
    i, j = pairs[:, 0], pairs[:, 1]
    c, s = theta.cos(), theta.sin()
    out[..., i] = x[..., i] * c - x[..., j] * s
    out[..., j] = x[..., i] * s + x[..., j] * c
    return out


@pytest.mark.parametrize("half", [False, True])
def test_rotary_pairs_are_timms_rope_layout(half: bool) -> None:
    """timm's rotation of the patch tokens is each of rotary_pairs turned by one angle: pairs and angles agree."""
    model = _eva(56, depth=1, rope_rotate_half=half) if half else _eva(56, depth=1)
    assert bool(getattr(model.blocks[0].attn, "rotate_half", False)) == half
    pairs = FAM.rotary_pairs(model, 0)
    d = model.blocks[0].attn.head_dim
    assert pairs is not None and pairs.shape == (d // 2, 2)
    assert sorted(pairs.reshape(-1).tolist()) == list(range(d))
    rope = model.rope.get_embed()
    sin, cos = rope.chunk(2, -1)
    assert_close(sin[:, pairs[:, 0]], sin[:, pairs[:, 1]])  # both dims of a pair share their angle
    theta = torch.atan2(sin[:, pairs[:, 0]], cos[:, pairs[:, 0]])
    x = torch.randn(rope.shape[0], d)
    assert_close(apply_rot_embed_cat(x, rope, half=half), _rotate_pairs(x, pairs, theta), rtol=1e-5, atol=1e-5)


def test_offsets_are_every_token_pair_with_the_class_token_unrotated() -> None:
    """Each (query, key) token pair's logit is q^T R(angle) k with an angle in rotary_offsets, weighted by its count."""
    model = _eva(56, depth=1)
    pairs = FAM.rotary_pairs(model, 0)
    angles, weights = FAM.rotary_offsets(model, 0)
    n = model.patch_embed.num_patches + 1
    assert float(weights.sum()) == n * n
    rope = model.rope.get_embed().double()
    sin, cos = rope.chunk(2, -1)
    at_origin = int((sin.abs().amax(1) < 1e-12).sum())  # a patch the rope does not turn pairs with the class token at 0
    # every token against itself, and the class token against such a patch: no rotation
    zero = (angles.abs().amax(1) < 1e-12).nonzero().flatten()
    assert zero.numel() == 1 and float(weights[zero]) == n + 2 * at_origin
    g = torch.Generator().manual_seed(0)
    d = model.blocks[0].attn.head_dim
    q, k = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    qr = torch.cat([q[:1], apply_rot_embed_cat(q[1:], rope)])
    kr = torch.cat([k[:1], apply_rot_embed_cat(k[1:], rope)])
    logits = qr @ kr.T  # what timm's attention computes for one head, the class token unrotated
    # every (query n, key m) logit is q_n^T R(angle) k_m for exactly one offset, as often as its weight says
    cand = torch.stack([q @ _rotate_pairs(k, pairs, a.expand(n, -1)).T for a in angles])  # (L, n, n)
    hits = (cand - logits[None]).abs() < 1e-4  # the rope embedding is float32
    assert bool((hits.sum(0) == 1).all())
    assert_close(hits.sum((1, 2)).double(), weights)


def test_narrow_attention_with_nothing_removed_is_timms_attention() -> None:
    """EvaPrunedAttention at full width (rope_dims = every dim, M = 0): the dense model's outputs, class token included."""
    model = _eva(42).double()
    narrow = _eva(42).double()
    for i in range(2):
        attn = narrow.blocks[i].attn
        FAM.install_attention(narrow, i, AttentionCut(
            heads=torch.arange(attn.num_heads), qk_keep=None, qk_m=None, v_keep=None,
            out_weight=attn.proj.weight.detach(), out_bias=attn.proj.bias.detach()))
        assert type(narrow.blocks[i].attn).__name__ == "EvaPrunedAttention"
    x = _images(2, 42).double()
    with torch.inference_mode():
        assert_close(narrow(x), model(x), rtol=1e-12, atol=1e-12)


def _capture_qk(model: torch.nn.Module, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """Block i's q and k before the rotation, (B, H, N, d)."""
    got: dict[str, Tensor] = {}

    def emit(q: Tensor, k: Tensor) -> None:
        got["q"], got["k"] = q.detach().clone(), k.detach().clone()

    hooks = FAM.qk_hook(model, i, emit)
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return got["q"].double(), got["k"].double()


def _rotated(model: torch.nn.Module, x: Tensor) -> Tensor:
    """timm's rotation of (B, H, N, d) q or k: patch tokens turned, the class token not."""
    rope = model.rope.get_embed().double()
    return torch.cat([x[:, :, :1], apply_rot_embed_cat(x[:, :, 1:], rope)], 2)


@pytest.mark.skipif(not IMAGES.is_dir(), reason="the shared ImageNet sample (../shared/data/imagenet-sample) is not present")
def test_q_k_pairs_lower_the_logit_error_at_every_offset_on_real_images() -> None:
    """Half the pairs of every head removed in block 1; on held-out real images, the compensated logits are closer to
    the dense ones at every relative offset of the patch grid, and over all token pairs.

    The class token's rows are not held to that: its query and key are unrotated, and the fit sees them only
    through the statistics pooled over all tokens (1 in 65 here), so its own logits may get slightly worse
    (measured here: a few percent; docs/eva-attention.md)."""
    from corp_cli.data import make_batches, open_source
    from corp_cli.preprocess import resolve_preprocessing
    from corp_cli.pruning import rotary_layout

    model = _eva(112)
    prep = resolve_preprocessing(model)
    imgs = torch.cat([x for x, _ in make_batches(open_source(str(IMAGES), samples=48, seed=0), prep.transform(), 16,
                                                 num_workers=0)])
    imgs = torch.nn.functional.interpolate(imgs, size=(112, 112), mode="bilinear", antialias=True)  # an 8x8 patch grid
    dense = api.adopt(model)
    stats = api.calibrate(dense, list(imgs[:32].split(16)), parts=("attn",))
    st = stats.blocks[1]["attn"]
    n = int(st["count"].sum())
    lay = rotary_layout(FAM, model, 1)
    gq, gk = st["q_gram"] / n, st["k_gram"] / n
    keep = engine.select_top_per_head(engine.rotary_pair_scores(gq, gk, lay.pairs, lay.group, **lay.fit_kwargs()), 16)
    sol = engine.rotary_qk_compensation(gq, gk, lay.pairs, keep, lay.group, **lay.fit_kwargs())
    assert bool((sol.coef != 0).any()), "the fit found something to correct (else the check below is vacuous)"
    q, k = _capture_qk(model, 1, imgs[32:])
    hq, d = q.shape[1], q.shape[3]
    dims = engine.rotary_kept_dims(lay.pairs, keep, split=False)
    kmask = torch.zeros(hq, d, dtype=torch.float64).scatter_(1, dims, 1.0)[None, :, None, :]
    dense_logits = _rotated(model, q) @ _rotated(model, k).transpose(-1, -2)
    errs = []
    for coef in (sol.coef, 0 * sol.coef):
        w, _ = engine.fold_rotary_q(torch.eye(hq * d, dtype=torch.float64), None, lay.pairs, keep, coef, lay.group)
        qf = (q.transpose(1, 2).reshape(*q.shape[:1], q.shape[2], -1) @ w.T).reshape(q.shape[0], q.shape[2], hq, d)
        logits = _rotated(model, qf.transpose(1, 2)) @ _rotated(model, k * kmask).transpose(-1, -2)
        errs.append((logits - dense_logits).square().mean(0).sum(0))  # (N, N): summed over heads
    # offset classes from the grid coordinates alone (not from the family's offsets)
    side = model.patch_embed.grid_size[0]
    rows, cols = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    classes: dict[tuple, list[tuple[int, int]]] = {}
    for a in range(side * side + 1):
        for b in range(side * side + 1):
            if a == 0 or b == 0:
                key = ("cls", a, b) if a == b == 0 else (("cls-q", int(rows[b - 1]), int(cols[b - 1])) if a == 0 else
                                                          ("cls-k", int(rows[a - 1]), int(cols[a - 1])))
            else:
                key = ("patch", int(rows[b - 1] - rows[a - 1]), int(cols[b - 1] - cols[a - 1]))
            classes.setdefault(key, []).append((a, b))
    worse = []
    for key, members in classes.items():
        idx = torch.tensor(members)
        comp, none = errs[0][idx[:, 0], idx[:, 1]].mean(), errs[1][idx[:, 0], idx[:, 1]].mean()
        if key[0] == "patch" and not comp < none:
            worse.append((key, float(comp / none)))
    assert not worse, worse[:8]
    assert len([k for k in classes if k[0] == "patch"]) == (2 * side - 1) ** 2
    assert float(errs[0].mean()) < float(errs[1].mean())


def _calibrated(size: int = 28) -> tuple[api.Loaded, object, dict]:
    dense = api.adopt(_eva(size))
    dense.model.double()
    x = _images(12, size).double()
    stats = api.calibrate(dense, [x[:6], x[6:]], precision="float64", parts=("mlp", "attn", "vo"))
    return dense, stats, {"pixel_values": _images(3, size, seed=9).double()}


def test_flops_budget_keeps_whole_pairs_and_compacted_equals_masked() -> None:
    """--flops-budget over Q/K pairs and value dims: even Q/K widths of whole pairs, the budget held."""
    from corp_cli.flops import model_counts

    dense, stats, check = _calibrated()
    result = api.prune(dense, stats, target="qk,vo", flops_budget=0.8)
    fam = dense.family
    pairs = fam.rotary_pairs(dense.model, 0)
    for i, bm in enumerate(result.masks):
        shape = fam.shape(result.model, i)
        assert shape.qk_dim % 2 == 0
        if bm.attn is not None:
            engine.rotary_pairs_of_dims(pairs, bm.attn)  # raises unless whole pairs
    assert any(m.attn is not None for m in result.masks), "the allocator pruned some Q/K pairs"
    flops = model_counts(result.model, family=fam)["flops"] / model_counts(dense.model, family=fam)["flops"]
    assert flops <= 0.8 + 1e-9
    got, ref = _outputs(result.loaded, check), _outputs(masked_reference(dense, result.masks, result.stats, result.blocks), check)
    assert_close(got[1], ref[1], rtol=1e-9, atol=1e-9)


def test_uniform_q_k_sparsity_rounds_to_whole_pairs() -> None:
    dense, stats, _ = _calibrated()
    result = api.prune(dense, stats, target="qk", sparsity=0.3)  # 64 - floor(19.2) = 45 dims: 46 (nearest, ties up)
    assert {dense.family.shape(result.model, i).qk_dim for i in range(2)} == {46}
    assert all(r["attn"]["qk_kept"] == 46 for r in result.blocks)
    for r in result.blocks:
        assert all(c <= u + 1e-12 for c, u in zip(r["attn"]["predicted_logit_error_compensated"],
                                                  r["attn"]["predicted_logit_error_uncompensated"]))


def test_saved_attention_pruned_eva_reloads_and_only_mlp_pruned_stays_stock(tmp_path: Path) -> None:
    dense, stats, check = _calibrated()
    check = {k: v.float() for k, v in check.items()}
    for target, stock in (("mlp", True), ("mlp,qk,vo,heads", False)):
        result = api.prune(dense, stats, target=target, sparsity=0.5)
        result.loaded.model.float()
        out = tmp_path / target.replace(",", "-")
        api.save_pruned(result, out)
        again = load_pruned_loaded(out)
        assert_close(_outputs(again, check)[1], _outputs(result.loaded, check)[1], rtol=0, atol=0)
        assert (FAM.stock_loader(FAM.architecture(result.loaded)) is not None) == stock

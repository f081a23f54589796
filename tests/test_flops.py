"""The analytical FLOP count (corp_cli.flops) against a brute-force count of every matmul actually run.

The brute force is a TorchDispatchMode that sees each aten op of a real forward pass
(under inference_mode some composite ops such as aten.linear arrive undecomposed, so
both they and their decompositions are handled).
torch's FlopCounterMode is not used: on CPU the fused SDPA kernel it does not know
(`_scaled_dot_product_flash_attention_for_cpu`) would go uncounted. Any op that looks
like a matmul but is not handled makes the test fail, so nothing slips through.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from corp_cli.flops import block_flops, model_counts

from .conftest import narrowed

aten = torch.ops.aten

_SDPA = {
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_fused_attention_overrideable",
}
_MATMUL_HINTS = ("mm", "conv", "attention", "matmul", "linear", "einsum", "dot", "mv")
_NOT_MATMUL = {"_to_copy", "copy_", "empty_like", "_unsafe_view", "clone"}


def _conv_flops(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> int:
    # 2 * (every output element) * (input channels per group) * (kernel area)
    return 2 * out.numel() * w.shape[1] * math.prod(w.shape[2:])


class MatmulCounter(TorchDispatchMode):
    """2 FLOPs per multiply-accumulate of every matmul-like aten op; elementwise ops ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.by_op: dict[str, int] = {}
        self.unhandled: set[str] = set()

    def _add(self, name: str, n: int) -> None:
        self.flops += n
        self.by_op[name] = self.by_op.get(name, 0) + n

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name == "linear":
            x, w = args[0], args[1]
            self._add(name, 2 * (x.numel() // x.shape[-1]) * w.shape[1] * w.shape[0])
        elif name == "matmul":
            a, b = args[0], args[1]
            assert a.ndim >= 2 and b.ndim >= 2, "vector matmuls are not expected in a ViT"
            batch = math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
            self._add(name, 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1])
        elif name == "mm":
            a, b = args[0], args[1]
            self._add(name, 2 * a.shape[0] * a.shape[1] * b.shape[1])
        elif name == "addmm":
            a, b = args[1], args[2]
            self._add(name, 2 * a.shape[0] * a.shape[1] * b.shape[1])
        elif name in ("bmm", "baddbmm"):
            a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
            self._add(name, 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])
        elif name in ("convolution", "_convolution", "conv2d"):
            self._add(name, _conv_flops(args[0], args[1], out))
        elif name == "einsum":  # two operands: 2 * the product of every index's size
            eq, ops = args[0], args[1]
            sizes: dict[str, int] = {}
            for spec, t in zip(eq.split("->")[0].split(","), ops):
                sizes.update(zip(spec, t.shape))
            assert len(ops) == 2, eq
            self._add(name, 2 * math.prod(sizes.values()))
        elif name in _SDPA:
            q, k, v = args[0], args[1], args[2]  # (B, H, L, E_qk), (B, H, S, E_qk), (B, H, S, E_v)
            b, h, l, e_qk = q.shape
            s, e_v = k.shape[-2], v.shape[-1]
            self._add(name, 2 * b * h * l * s * e_qk + 2 * b * h * l * s * e_v)
        elif any(hint in name for hint in _MATMUL_HINTS) and name not in _NOT_MATMUL:
            self.unhandled.add(name)
        return out


def brute_force_flops(model: torch.nn.Module, batch: int = 2) -> MatmulCounter:
    x = torch.randn(batch, 3, 224, 224)
    counter = MatmulCounter()
    with torch.inference_mode(), counter:
        model(x)
    assert not counter.unhandled, f"matmul-like ops not counted: {counter.unhandled}"
    assert counter.flops % batch == 0
    return counter


def _dense() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


def _pruned() -> torch.nn.Module:
    """Uneven per-block widths, MLP and Q/K pruned, as `corp prune` can produce them."""
    torch.manual_seed(0)
    blocks = [{"mlp_hidden": 768 - 53 * i, "qk_dim": 64 - 5 * i if i % 3 else 64} for i in range(12)]
    return narrowed("deit_tiny_patch16_224", blocks)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit-matmuls"])
def test_dense_deit_tiny_matches_brute_force(fused: bool) -> None:
    model = _dense()
    for blk in model.blocks:
        blk.attn.fused_attn = fused  # timm's two attention code paths issue different aten ops
    counter = brute_force_flops(model)
    assert model_counts(model)["flops"] == counter.flops // 2
    # the path we meant to test was the one taken
    assert any(op in _SDPA for op in counter.by_op) == fused


@pytest.fixture
def unpadded_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the narrow Q/K computation itself, not the CPU kernel's zero padding of it."""
    import corp_cli.attention

    monkeypatch.setattr(corp_cli.attention, "PAD_NARROW_QK_ON_CPU", False)


def test_pruned_deit_tiny_matches_brute_force(unpadded_attention: None) -> None:
    model = _pruned()
    counts = model_counts(model)
    assert [b.mlp.fc1.out_features for b in model.blocks][:3] == [768, 715, 662]
    assert {getattr(b.attn, "qk_dim", 64) for b in model.blocks} > {64}  # some Q/K widths really are pruned
    counter = brute_force_flops(model)
    assert counts["flops"] == counter.flops // 2
    # and pruning did remove work, so the test could not pass by counting dense shapes
    assert counts["flops"] < model_counts(_dense())["flops"]


def test_per_block_counts_match_brute_force_per_block(unpadded_attention: None) -> None:
    model = _pruned()
    counts = model_counts(model)
    tokens = counts["tokens"]
    for i in (0, 1, 11):
        blk = model.blocks[i]
        x = torch.randn(1, tokens, 192)
        counter = MatmulCounter()
        with torch.inference_mode(), counter:
            blk(x)
        assert not counter.unhandled
        assert counts["per_block"][i]["total"] == counter.flops, i


def test_block_flops_attention_core_uses_pruned_qk_width() -> None:
    full = block_flops(192, 768, 3, 64, 64, 197)
    half = block_flops(192, 768, 3, 64, 32, 197)
    # Q/K projections shrink by 2*t*dim*H*32 each... plus logits 2*H*t*t*32; values and MLP do not change.
    saved = 2 * 197 * 192 * 3 * 64 + 2 * 3 * 197 * 197 * 32
    assert full["attn"] - half["attn"] == saved
    assert full["mlp"] == half["mlp"]


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned-uneven"])
def test_decoder_with_grouped_query_attention_matches_brute_force(pruned: bool, tmp_path) -> None:  # noqa: ANN001
    """Fewer K/V projections under GQA, a gated MLP (gate and up), the LM head at every position."""
    pytest.importorskip("transformers")
    from corp_cli import api
    from corp_cli.loading import load_dense

    from .conftest import tiny_decoder

    loaded = load_dense(tiny_decoder(tmp_path / "llama", "llama", tokenizer=False))
    if pruned:
        ids = torch.randint(3, 512, (4, 12), generator=torch.Generator().manual_seed(0))
        stats = api.calibrate(loaded, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
        # round_to=1: widths that are no multiple of 8 (36), what this count must get right too
        loaded = api.prune(loaded, stats, target="mlp", sparsity=0.5, round_to=1,
                           block_overrides={1: {"mlp_sparsity": 0.25}}).loaded
        assert [loaded.family.shape(loaded.model, i).mlp_hidden for i in range(2)] == [24, 36]
    assert loaded.family.shape(loaded.model, 0).kv_heads == 2
    tokens = 20
    counter = MatmulCounter()
    with torch.inference_mode(), counter:
        loaded.model(input_ids=torch.randint(3, 512, (1, tokens)), use_cache=False)
    assert not counter.unhandled
    assert model_counts(loaded.model, tokens=tokens, family=loaded.family)["flops"] == counter.flops


def _vo_heads_pruned() -> torch.nn.Module:
    """Value/output dims and whole heads pruned too, per block differently, with and without Q/K pruning."""
    blocks = [{"mlp_hidden": 768 - 40 * i, "qk_dim": 64 - 8 * (i % 3), "v_dim": 64 - 4 * i, "num_heads": 3 - i % 3}
              for i in range(12)]
    blocks[0] = {"mlp_hidden": 768, "qk_dim": 64, "v_dim": 16}  # V/O only: queries wider than values
    return narrowed("deit_tiny_patch16_224", blocks)


def test_vo_and_head_pruned_deit_tiny_matches_brute_force(unpadded_attention: None) -> None:
    model = _vo_heads_pruned()
    assert [b.attn.num_heads for b in model.blocks][:4] == [3, 2, 1, 3]
    assert model.blocks[0].attn.v_dim == 16 and model.blocks[0].attn.qk_dim == 64
    counts = model_counts(model)
    counter = brute_force_flops(model)
    assert counts["flops"] == counter.flops // 2
    assert counts["flops"] < model_counts(_pruned())["flops"]


@pytest.mark.parametrize("maps", [True, False], ids=["qk-pruned", "vo-heads-only"])
def test_qk_norm_pruned_vit_matches_brute_force(unpadded_attention: None, maps: bool) -> None:
    """q/k-norm attention keeps full-width q/k projections (and, Q/K-pruned, per-head maps): the count says so."""
    blocks = [{"mlp_hidden": 1536 - 100 * i, "qk_dim": (48 - 8 * i) if maps else 64, "qk_norm": True,
               **({} if maps else {"qk_maps": False}), "v_dim": 64 - 4 * i, "num_heads": 6 - i} for i in range(3)]
    model = narrowed("vit_small_patch16_224", blocks, depth=3, qk_norm=True)
    assert all((b.attn.q_out is not None) == maps for b in model.blocks)
    counts = model_counts(model)
    counter = brute_force_flops(model)
    assert counts["flops"] == counter.flops // 2

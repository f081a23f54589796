"""Analytical parameter and FLOP counts for (pruned) models of any family, per block and in total.

FLOPs count 2 per multiply-accumulate of every matmul; elementwise work (norms, GELU,
softmax) is left out, as is customary. The attention logits use the pruned Q/K width, the
value mix and output projection the pruned V/O width, and only the heads left are counted.
The blocks are counted here from their shapes; the family counts what lies outside them
(the patch embedding, the heads) and says how many tokens one item is.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from corp_cli.family import BlockShape, ModelFamily


def block_flops(dim: int, mlp_hidden: int, num_heads: int, head_dim: int, qk_dim: int, tokens: int,
                mlp_inputs: int = 1, kv_heads: int | None = None, *, v_dim: int | None = None,
                qk_mapped: bool = False) -> dict[str, int]:
    """One block's FLOPs at `tokens` tokens; `mlp_inputs` is 2 for gated MLPs (gate and up projections).

    `num_heads` are the heads the block computes, `v_dim` each one's value/output width
    (head_dim when None). `kv_heads`: key/value heads under grouped-query attention (fewer K
    and V projections); None: num_heads. `qk_mapped`: the q/k projections stay head_dim wide
    and each head maps its (normalised) q and k to qk_dim dims (the q/k-norm layout of Q/K pruning).
    """
    t = tokens
    v = head_dim if v_dim is None else v_dim
    kv = num_heads if kv_heads is None else kv_heads
    qk_proj = head_dim if qk_mapped else qk_dim
    qkv = 2 * t * dim * (num_heads * qk_proj + kv * (qk_proj + v))
    maps = 2 * 2 * t * num_heads * qk_dim * head_dim if qk_mapped else 0
    logits = 2 * num_heads * t * t * qk_dim
    mix = 2 * num_heads * t * t * v
    proj = 2 * t * num_heads * v * dim
    mlp = 2 * t * dim * mlp_hidden * (1 + mlp_inputs)
    attn = qkv + maps + logits + mix + proj
    return {"attn": attn, "mlp": mlp, "total": attn + mlp}


def shape_flops(family: ModelFamily, model: nn.Module, i: int, shape: BlockShape, tokens: int) -> dict[str, int]:
    """Block i's FLOPs at `shape`, as it is or as pruning would make it (the family counts layouts of its own)."""
    own = family.layout_flops(model, i, shape, tokens)
    if own is not None:
        return own
    inputs = len(family.mlp_weights(model, i).inputs)
    return block_flops(shape.dim, shape.mlp_hidden, shape.num_heads, shape.head_dim, shape.qk_dim, tokens, inputs,
                       shape.kv_heads, v_dim=shape.v_dim)


def kv_cache_bytes(shapes: list[BlockShape], bytes_per_value: int) -> int:
    """KV-cache bytes one token adds during generation: every block's kv heads x (key width + value width)."""
    return sum((s.kv_heads or s.num_heads) * (s.qk_dim + s.v_dim) for s in shapes) * bytes_per_value


def model_counts(model: nn.Module, tokens: int | None = None, family: ModelFamily | None = None) -> dict[str, Any]:
    """Parameters and per-item forward FLOPs of the blocks and the whole model.

    `tokens` defaults to the family's sequence length for one item (patches + prefix
    tokens for images, the calibration max length for text).
    """
    if family is None:
        from corp_cli.registry import family_of

        family = family_of(model)
    if tokens is None:
        tokens = family.tokens_per_item(model)
    shapes = [family.shape(model, i) for i in range(family.num_blocks(model))]
    blocks = [shape_flops(family, model, i, s, tokens) for i, s in enumerate(shapes)]
    in_blocks = sum(b["total"] for b in blocks)
    out = {
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": tokens,
        "flops": family.outer_flops(model, tokens) + in_blocks,
        "flops_blocks": in_blocks,
        "per_block": blocks,
    }
    if family.caches_keys_values:
        # in the model's own dtype (the cache holds keys and values as the model computes them)
        p = next(iter(model.parameters()), None)
        out["kv_bytes_per_token"] = kv_cache_bytes(shapes, p.element_size() if p is not None else 4)
    return out

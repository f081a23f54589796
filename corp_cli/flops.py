"""Analytical parameter and FLOP counts for (pruned) models of any family, per block and in total.

FLOPs count 2 per multiply-accumulate of every matmul; elementwise work (norms, GELU,
softmax) is left out, as is customary. The attention logits use the pruned Q/K width.
The blocks are counted here from their shapes; the family counts what lies outside them
(the patch embedding, the heads) and says how many tokens one item is.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from corp_cli.family import ModelFamily


def block_flops(dim: int, mlp_hidden: int, num_heads: int, head_dim: int, qk_dim: int, tokens: int,
                mlp_inputs: int = 1, kv_heads: int | None = None) -> dict[str, int]:
    """One block's FLOPs at `tokens` tokens; `mlp_inputs` is 2 for gated MLPs (gate and up projections).

    `kv_heads`: key/value heads under grouped-query attention (fewer K and V projections); None: num_heads.
    """
    t = tokens
    kv = num_heads if kv_heads is None else kv_heads
    qkv = 2 * t * dim * (num_heads * qk_dim + kv * (qk_dim + head_dim))
    logits = 2 * num_heads * t * t * qk_dim
    mix = 2 * num_heads * t * t * head_dim
    proj = 2 * t * num_heads * head_dim * dim
    mlp = 2 * t * dim * mlp_hidden * (1 + mlp_inputs)
    return {"attn": qkv + logits + mix + proj, "mlp": mlp, "total": qkv + logits + mix + proj + mlp}


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
    blocks = []
    for i in range(family.num_blocks(model)):
        s = family.shape(model, i)
        inputs = len(family.mlp_weights(model, i).inputs)
        blocks.append(block_flops(s.dim, s.mlp_hidden, s.num_heads, s.head_dim, s.qk_dim, tokens, inputs, s.kv_heads))
    in_blocks = sum(b["total"] for b in blocks)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": tokens,
        "flops": family.outer_flops(model, tokens) + in_blocks,
        "flops_blocks": in_blocks,
        "per_block": blocks,
    }

"""Analytical parameter and FLOP counts for (pruned) timm ViTs, per block and in total.

FLOPs count 2 per multiply-accumulate of every matmul; elementwise work (norms, GELU,
softmax) is left out, as is customary. The attention logits use the pruned Q/K width.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from corp_cli.adapters import adapter_for


def block_flops(dim: int, mlp_hidden: int, num_heads: int, head_dim: int, qk_dim: int, tokens: int) -> dict[str, int]:
    t = tokens
    qkv = 2 * t * dim * num_heads * (2 * qk_dim + head_dim)
    logits = 2 * num_heads * t * t * qk_dim
    mix = 2 * num_heads * t * t * head_dim
    proj = 2 * t * num_heads * head_dim * dim
    mlp = 2 * t * dim * mlp_hidden * 2
    return {"attn": qkv + logits + mix + proj, "mlp": mlp, "total": qkv + logits + mix + proj + mlp}


def model_counts(model: nn.Module, tokens: int | None = None) -> dict[str, Any]:
    """Parameters and per-image forward FLOPs of the transformer blocks and the whole model.

    The patch embedding and head are counted once; `tokens` defaults to the model's own
    sequence length (patches + prefix tokens).
    """
    if str(getattr(adapter_for(model), "family", "")).startswith("hf-"):
        from corp_cli.hf.flops import hf_model_counts

        return hf_model_counts(model, tokens)
    ad = adapter_for(model)
    if tokens is None:
        tokens = int(model.patch_embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))
    blocks = []
    for i in range(len(ad.blocks)):
        s = ad.shape(i)
        blocks.append(block_flops(s.dim, s.mlp_hidden, s.num_heads, s.head_dim, s.qk_dim, tokens))
    pe = model.patch_embed.proj
    n_patches = int(model.patch_embed.num_patches)
    embed = 2 * n_patches * pe.out_channels * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1]
    head = 0
    for name in ("head", "head_dist"):
        lin = getattr(model, name, None)
        if isinstance(lin, nn.Linear):
            head += 2 * lin.in_features * lin.out_features
    total = embed + head + sum(b["total"] for b in blocks)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": tokens,
        "flops": total,
        "flops_blocks": sum(b["total"] for b in blocks),
        "per_block": blocks,
    }

"""Parameter and FLOP counts for HF encoders, on the same conventions as corp_cli.flops (2 per MAC)."""

from __future__ import annotations

from typing import Any

from torch import nn

from corp_cli.hf.models import DEFAULT_MAX_LENGTH, is_text_model


def hf_model_counts(model: nn.Module, tokens: int | None = None) -> dict[str, Any]:
    """Text models count `tokens` (default: the calibration max_length) tokens per sequence."""
    from corp_cli.adapters import adapter_for
    from corp_cli.flops import block_flops

    ad = adapter_for(model)
    cfg = model.config
    embed = 0
    if is_text_model(model):
        tokens = tokens or DEFAULT_MAX_LENGTH  # embeddings are lookups: no matmul work
    else:
        n_patches = (int(cfg.image_size) // int(cfg.patch_size)) ** 2
        prefix = 2 if cfg.model_type == "deit" else 1  # DeiT adds a distillation token
        tokens = tokens or n_patches + prefix
        embed = 2 * n_patches * int(cfg.hidden_size) * int(cfg.num_channels) * int(cfg.patch_size) ** 2
    blocks = []
    for i in range(len(ad.blocks)):
        s = ad.shape(i)
        blocks.append(block_flops(s.dim, s.mlp_hidden, s.num_heads, s.head_dim, s.qk_dim, tokens))
    head = sum(2 * m.in_features * m.out_features for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.split(".")[0] in ("classifier", "cls_classifier", "distillation_classifier"))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": tokens,
        "flops": embed + head + sum(b["total"] for b in blocks),
        "flops_blocks": sum(b["total"] for b in blocks),
        "per_block": blocks,
    }

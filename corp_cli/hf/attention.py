"""Q/K-narrow self-attention for Hugging Face encoders (BERT, ViT/DeiT as in transformers 5.x).

Queries and keys keep `qk_dim` dims per head, values keep `head_dim`. The softmax scale
is the ORIGINAL head_dim^-1/2: the compensated logits reconstruct the dense ones, so
they must not be re-normalised for the smaller width. The forwards take and return what
the transformers modules they replace take and return (BertAttention calls its `self`
submodule; ViTLayer/DeiTLayer call `attention`), so the surrounding layers run unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from corp_cli.compact import sdpa_mixed_width


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    # transformers hands over either a boolean (True = attend) or an additive float mask,
    # broadcastable to (B, H, N, N); scaled_dot_product_attention takes both as they are.
    # The timm path's mixed-width call keeps the fused CPU kernel despite narrow q/k.
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return sdpa_mixed_width(q, k, v, attn_mask=mask, is_causal=False, scale=scale)


class _NarrowQKV(nn.Module):
    """Shared part: q/k projections to H*qk_dim, v to H*head_dim, and the attention itself."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_dim: int, scale: float, bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qk_dim = qk_dim
        self.scale = scale

    def _heads(self, x: Tensor, width: int) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, width).transpose(1, 2)

    def _mix(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        b, n = q.shape[0], q.shape[1]
        out = _attend(self._heads(q, self.qk_dim), self._heads(k, self.qk_dim), self._heads(v, self.head_dim), mask, self.scale)
        return out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)


class NarrowBertSelfAttention(_NarrowQKV):
    """Replaces BertSelfAttention (`layer.attention.self`); parameter names match it."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_dim: int, scale: float, bias: bool = True) -> None:
        super().__init__(dim, num_heads, head_dim, qk_dim, scale, bias)
        self.query = nn.Linear(dim, num_heads * qk_dim, bias=bias)
        self.key = nn.Linear(dim, num_heads * qk_dim, bias=bias)
        self.value = nn.Linear(dim, num_heads * head_dim, bias=bias)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **_: Any) -> tuple[Tensor, None]:
        x = hidden_states
        return self._mix(self.query(x), self.key(x), self.value(x), attention_mask), None


class NarrowViTAttention(_NarrowQKV):
    """Replaces ViTAttention / DeiTAttention (`layer.attention`, with its output projection)."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, qk_dim: int, scale: float, bias: bool = True, out_bias: bool = True,
    ) -> None:
        super().__init__(dim, num_heads, head_dim, qk_dim, scale, bias)
        self.q_proj = nn.Linear(dim, num_heads * qk_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_heads * qk_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=out_bias)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **_: Any) -> tuple[Tensor, None]:
        x = hidden_states
        return self.o_proj(self._mix(self.q_proj(x), self.k_proj(x), self.v_proj(x), attention_mask)), None

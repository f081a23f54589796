"""The narrow attention of a pruned decoder (Llama / Qwen2 / Mistral layout): GQA, rotary pairs, kept heads.

A stock `LlamaAttention` ties every width to the config: num_attention_heads query heads of
head_dim, num_key_value_heads key/value heads of the same head_dim, query head h reading
kv head h // (Hq / Hkv), and rotary frequencies fixed by head_dim. Pruning breaks each of
these, so the pruned block gets this module instead (a real module with its own forward,
not a patched one):

- `num_heads` query heads and `kv_heads` key/value heads; `kv_index[h]` is the kv head
  query head h reads (groups may differ in size once query heads inside a group are gone).
- `qk_dim` Q/K dims per head. Under rotary embeddings only whole frequency pairs are kept:
  `rope_dims[g]` (qk_dim,) are the dense dims kept by kv head g and by every query head of
  its group, in the half-split order [first halves of the kept pairs | their second
  halves], so `rotate_half` of the narrow vector is the dense rotation restricted to the
  kept pairs, and the model's cos/sin (B, N, head_dim) are read at those dims.
- `v_dim` value dims per kv head; o_proj reads num_heads * v_dim.
- The softmax scale is the DENSE head_dim^-1/2: the compensated logits reconstruct the
  dense ones and must not be re-normalised for the smaller width.

The index tensors are non-persistent buffers: the architecture record carries them (so a
checkpoint whose widths fit the stock config keeps exactly the stock state-dict keys).
The attention itself is the model's configured kernel (sdpa / eager / ...), called the
way LlamaAttention calls it, and the KV cache stores the narrow keys and values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_dims_of_pairs(pairs: Tensor, head_dim: int) -> Tensor:
    """Kept frequency pairs (..., P) of the half-split layout -> their dims (..., 2P): [pairs | pairs + d/2]."""
    return torch.cat([pairs, pairs + head_dim // 2], dim=-1)


def is_regular(kv_index: Tensor, kv_heads: int) -> bool:
    """Whether query heads map to kv heads as the stock layout maps them: equal groups, in order."""
    nh = int(kv_index.numel())
    if nh % kv_heads:
        return False
    stock = torch.arange(kv_heads, device=kv_index.device).repeat_interleave(nh // kv_heads)
    return bool((kv_index == stock).all())


class DecoderAttention(nn.Module):
    """Grouped-query rotary attention with per-block widths (see the module docstring)."""

    def __init__(
        self, config: Any, layer_idx: int, *, hidden_size: int, num_heads: int, kv_heads: int, head_dim: int,
        qk_dim: int, v_dim: int, kv_index: Tensor, rope_dims: Tensor | None, qkv_bias: bool, o_bias: bool,
        scaling: float,
    ) -> None:
        super().__init__()
        if kv_index.shape != (num_heads,) or (rope_dims is not None and rope_dims.shape != (kv_heads, qk_dim)):
            raise ValueError("kv_index / rope_dims do not fit the head counts and widths")
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.kv_heads = kv_heads
        self.head_dim = head_dim  # the dense width (statistics and records are shaped by it)
        self.qk_dim = qk_dim
        self.v_dim = v_dim
        self.scaling = scaling
        self.is_causal = True
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        self.sliding_window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.q_proj = nn.Linear(hidden_size, num_heads * qk_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, kv_heads * qk_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, kv_heads * v_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * v_dim, hidden_size, bias=o_bias)
        self.register_buffer("kv_index", kv_index.to(torch.int64).clone(), persistent=False)
        self.register_buffer("rope_dims", None if rope_dims is None else rope_dims.to(torch.int64).clone(),
                             persistent=False)
        # equal, contiguous groups: the kernel's own GQA repeat (query head h reads kv head h // groups) applies;
        # otherwise keys/values are gathered per query head and the kernel sees plain multi-head attention
        self.regular = is_regular(self.kv_index, kv_heads)
        self.num_key_value_groups = num_heads // kv_heads if self.regular else 1

    def _rotate(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """q (B, Hq, N, dq), k (B, Hkv, N, dq); cos/sin (B, N, head_dim) of the dense head."""
        if self.rope_dims is None:  # every pair kept
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
        ck = cos[..., self.rope_dims].permute(0, 2, 1, 3)  # (B, Hkv, N, dq)
        sk = sin[..., self.rope_dims].permute(0, 2, 1, 3)
        cq, sq = ck[:, self.kv_index], sk[:, self.kv_index]
        return q * cq + rotate_half(q) * sq, k * ck + rotate_half(k) * sk

    def forward(
        self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None, cache: Any = None, past_key_values: Any = None, **kwargs: Any,
    ) -> tuple[Tensor, None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        cache = cache if cache is not None else past_key_values
        b, n, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, self.num_heads, self.qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, n, self.kv_heads, self.qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, self.kv_heads, self.v_dim).transpose(1, 2)
        assert position_embeddings is not None, "the decoder passes its rotary cos/sin to every layer"
        cos, sin = position_embeddings
        q, k = self._rotate(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        if not self.regular:
            k, v = k[:, self.kv_index], v[:, self.kv_index]
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        kw = dict(kwargs)
        if self.sliding_window is not None:
            kw.setdefault("sliding_window", self.sliding_window)
        out, _ = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                           scaling=self.scaling, **kw)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.v_dim).contiguous()), None

"""What corp needs to know about a model family: its blocks, their MLP and attention tensors.

Each family gets one adapter; everything else in corp talks to blocks through it.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.layers import Mlp
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor, nn

from corp_cli.errors import UnsupportedModelError

SUPPORTED = (
    "timm VisionTransformer models whose blocks use Mlp (fc1 -> act -> fc2) and fused-qkv Attention, "
    "e.g. deit_tiny/small/base_patch16_224, vit_small/base_patch16_224, deit3_small_patch16_224, "
    "deit_base_distilled_patch16_224, vit_small_patch14_dinov2"
)


@dataclass(frozen=True)
class BlockShape:
    dim: int
    mlp_hidden: int
    num_heads: int
    head_dim: int
    qk_dim: int  # kept Q/K dims per head (== head_dim when unpruned)

    def to_dict(self) -> dict[str, int]:
        return {"dim": self.dim, "mlp_hidden": self.mlp_hidden, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "qk_dim": self.qk_dim}


class TimmViTAdapter:
    """timm VisionTransformer (DeiT, ViT, DeiT-III, DINOv2, distilled DeiT)."""

    family = "timm-vit"

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, VisionTransformer):
            raise UnsupportedModelError(f"{type(model).__name__} is not supported; corp prunes {SUPPORTED}")
        self.model = model
        for i, blk in enumerate(model.blocks):
            mlp = getattr(blk, "mlp", None)
            if not isinstance(mlp, Mlp) or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
                raise UnsupportedModelError(
                    f"block {i} has a {type(mlp).__name__} MLP (gated or normalised hidden units are not supported); "
                    f"corp prunes {SUPPORTED}"
                )
            attn = getattr(blk, "attn", None)
            from corp_cli.compact import QKNormPrunedAttention, QKPrunedAttention  # local: compact imports this module

            if not isinstance(attn, (Attention, QKPrunedAttention, QKNormPrunedAttention)):
                raise UnsupportedModelError(f"block {i} has a {type(attn).__name__} attention; corp prunes {SUPPORTED}")

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def shape(self, i: int) -> BlockShape:
        blk = self.model.blocks[i]
        attn = blk.attn
        qk = attn.qk_dim if hasattr(attn, "qk_dim") else attn.head_dim
        return BlockShape(
            dim=blk.mlp.fc1.in_features,
            mlp_hidden=blk.mlp.fc1.out_features,
            num_heads=attn.num_heads,
            head_dim=attn.head_dim,
            qk_dim=qk,
        )

    # --- MLP
    def mlp_linears(self, i: int) -> tuple[nn.Linear, nn.Linear]:
        mlp = self.model.blocks[i].mlp
        return mlp.fc1, mlp.fc2

    def mlp_hidden_site(self, i: int) -> nn.Module:
        """The module whose input is the hidden activation h (a forward pre-hook reads it)."""
        return self.model.blocks[i].mlp.fc2

    def set_mlp_linears(self, i: int, fc1: nn.Linear, fc2: nn.Linear) -> None:
        mlp = self.model.blocks[i].mlp
        mlp.fc1 = fc1
        mlp.fc2 = fc2

    # --- attention
    def qk_sites(self, i: int) -> tuple[nn.Module, nn.Module]:
        """Modules whose outputs are the per-head queries and keys (B, H, N, d) used in the logits."""
        attn = self.model.blocks[i].attn
        return attn.q_norm, attn.k_norm

    def check_attn_prunable(self, i: int) -> None:
        attn = self.model.blocks[i].attn
        if not isinstance(attn, Attention):
            raise UnsupportedModelError(f"block {i}: attention is already Q/K-pruned; prune the dense model instead")
        # q_norm/k_norm are fine: the pruned attention keeps them and selects dims after them
        # (compact.QKNormPrunedAttention). A norm over the attention output is not per-head
        # Q/K work and is simply not something the pruned modules reproduce.
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise UnsupportedModelError(
                f"block {i}: attention has a norm layer over its output (scale_norm), which Q/K-pruned attention "
                "does not support (prune --target mlp instead)"
            )
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"block {i}: gated attention is not supported for Q/K pruning")

    def qk_weights(self, i: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """W_Q, b_Q, W_K, b_K as (H*d, dim) row blocks of the fused qkv projection."""
        attn = self.model.blocks[i].attn
        w = attn.qkv.weight
        b = attn.qkv.bias
        n = attn.num_heads * attn.head_dim
        return w[:n], (b[:n] if b is not None else None), w[n : 2 * n], (b[n : 2 * n] if b is not None else None)

    def softmax_scale(self, i: int) -> float:
        attn = self.model.blocks[i].attn
        return float(attn.scale)


def adapter_for(model: nn.Module) -> TimmViTAdapter:
    from corp_cli.hf import is_hf_module  # local: corp_cli.hf.adapter imports this module

    if is_hf_module(model):
        from corp_cli.hf.adapter import hf_adapter_for

        return hf_adapter_for(model)  # type: ignore[return-value]  (same interface)
    return TimmViTAdapter(model)

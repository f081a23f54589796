"""Adapters for Hugging Face encoders: the same per-family interface as adapters.TimmViTAdapter.

BERT layer i: fc1 = intermediate.dense, act, fc2 = output.dense (then residual + LayerNorm,
which does not touch the hidden units); q/k = attention.self.query/key.
ViT/DeiT layer i (transformers 5.x): fc1/fc2 = mlp.fc1/fc2; q/k = attention.q_proj/k_proj.
The hidden activation h is the input of fc2, read with a forward pre-hook.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from corp_cli.adapters import BlockShape
from corp_cli.errors import UnsupportedModelError
from corp_cli.hf.attention import NarrowBertSelfAttention, NarrowViTAttention

# Elementwise activations: CORP only needs h to be per-unit, so any of these is fine;
# gated or mixing activations would break the one-unit = one-column correspondence.
ELEMENTWISE_ACTS = frozenset({
    "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python", "gelu_accurate", "gelu_10",
    "quick_gelu", "relu", "silu", "swish",
})


class _HFAdapter:
    family = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        act = getattr(self.config, "hidden_act", None)
        if not isinstance(act, str) or act not in ELEMENTWISE_ACTS:
            raise UnsupportedModelError(
                f"{type(model).__name__}: hidden_act {act!r} is not a supported elementwise activation "
                f"(one of {', '.join(sorted(ELEMENTWISE_ACTS))})"
            )
        try:  # a layout from another transformers major version fails here, not mid-run
            self.mlp_linears(0)
            self._qk(0)
        except (AttributeError, IndexError, TypeError):
            import transformers

            raise UnsupportedModelError(
                f"{type(model).__name__}: its layers do not have the layout corp expects (transformers "
                f"{transformers.__version__} is installed; corp supports the transformers 5.x layout)"
            ) from None

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    # attention module whose q/k/v Linears we read and which a narrow module replaces
    def _attn(self, i: int) -> nn.Module:
        raise NotImplementedError

    def _qk(self, i: int) -> tuple[nn.Linear, nn.Linear]:
        raise NotImplementedError

    def shape(self, i: int) -> BlockShape:
        fc1, _ = self.mlp_linears(i)
        attn = self._attn(i)
        heads = int(self.config.num_attention_heads)
        head_dim = int(getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size"))
        q, _ = self._qk(i)
        return BlockShape(dim=fc1.in_features, mlp_hidden=fc1.out_features, num_heads=heads,
                          head_dim=head_dim, qk_dim=q.out_features // heads)

    # --- attention
    def qk_sites(self, i: int) -> tuple[nn.Module, nn.Module]:
        """The q and k projections; their outputs are (B, N, H*d) and go through qk_heads."""
        return self._qk(i)

    def qk_heads(self, i: int, out: Tensor, token_mask: Tensor | None) -> Tensor:
        """(B, N, H*d) projection output -> (B, H, N, d); padding tokens are dropped first.

        With a mask, the real tokens of all sequences become one sequence (1, H, T, d): the
        statistics are per-token sums, so which sequence a token came from does not matter.
        """
        heads = int(self.config.num_attention_heads)
        if token_mask is not None:
            out = out[token_mask].unsqueeze(0)
        b, n, w = out.shape
        return out.reshape(b, n, heads, w // heads).transpose(1, 2)

    def check_attn_prunable(self, i: int) -> None:
        if isinstance(self._attn(i), (NarrowBertSelfAttention, NarrowViTAttention)):
            raise UnsupportedModelError(f"block {i}: attention is already Q/K-pruned; prune the dense model instead")

    def qk_weights(self, i: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        q, k = self._qk(i)
        return q.weight, q.bias, k.weight, k.bias

    def softmax_scale(self, i: int) -> float:
        attn = self._attn(i)
        return float(getattr(attn, "scale", None) or getattr(attn, "scaling"))

    def forward_trunk(self, batch: Any) -> Any:
        """Run the encoder only (the classifier head is not pruned): dict inputs or pixel tensors."""
        base = self.model.base_model
        if isinstance(batch, dict):
            return base(**batch)
        return base(pixel_values=batch)


class HFBertAdapter(_HFAdapter):
    family = "hf-bert"

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.base_model.encoder.layer

    def _attn(self, i: int) -> nn.Module:
        return self.layers[i].attention.self

    def _qk(self, i: int) -> tuple[nn.Linear, nn.Linear]:
        a = self._attn(i)
        return a.query, a.key

    def mlp_linears(self, i: int) -> tuple[nn.Linear, nn.Linear]:
        layer = self.layers[i]
        return layer.intermediate.dense, layer.output.dense

    def mlp_hidden_site(self, i: int) -> nn.Module:
        return self.layers[i].output.dense

    def set_mlp_linears(self, i: int, fc1: nn.Linear, fc2: nn.Linear) -> None:
        layer = self.layers[i]
        layer.intermediate.dense = fc1
        layer.output.dense = fc2

    def narrow_attention(self, i: int, qk_dim: int) -> nn.Module:
        """An empty narrow module of the right widths, installed in block i (weights copied by the caller)."""
        a = self._attn(i)
        s = self.shape(i)
        new = NarrowBertSelfAttention(s.dim, s.num_heads, s.head_dim, qk_dim, self.softmax_scale(i),
                                      bias=a.query.bias is not None)
        new.to(device=a.query.weight.device, dtype=a.query.weight.dtype)
        self.layers[i].attention.self = new
        return new


class HFViTAdapter(_HFAdapter):
    family = "hf-vit"

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.base_model.layers

    def _attn(self, i: int) -> nn.Module:
        return self.layers[i].attention

    def _qk(self, i: int) -> tuple[nn.Linear, nn.Linear]:
        a = self._attn(i)
        return a.q_proj, a.k_proj

    def mlp_linears(self, i: int) -> tuple[nn.Linear, nn.Linear]:
        mlp = self.layers[i].mlp
        return mlp.fc1, mlp.fc2

    def mlp_hidden_site(self, i: int) -> nn.Module:
        return self.layers[i].mlp.fc2

    def set_mlp_linears(self, i: int, fc1: nn.Linear, fc2: nn.Linear) -> None:
        mlp = self.layers[i].mlp
        mlp.fc1 = fc1
        mlp.fc2 = fc2

    def narrow_attention(self, i: int, qk_dim: int) -> nn.Module:
        a = self._attn(i)
        s = self.shape(i)
        new = NarrowViTAttention(s.dim, s.num_heads, s.head_dim, qk_dim, self.softmax_scale(i),
                                 bias=a.q_proj.bias is not None, out_bias=a.o_proj.bias is not None)
        new.to(device=a.q_proj.weight.device, dtype=a.q_proj.weight.dtype)
        self.layers[i].attention = new
        return new


def hf_adapter_for(model: nn.Module) -> HFBertAdapter | HFViTAdapter:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt == "bert":
        return HFBertAdapter(model)
    if mt in ("vit", "deit"):
        return HFViTAdapter(model)
    raise UnsupportedModelError(
        f"{type(model).__name__} (model_type {mt!r}) is not supported; corp prunes Hugging Face bert, vit and deit encoders"
    )

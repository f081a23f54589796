"""timm VisionTransformer: DeiT, ViT, DeiT-III (LayerScale), distilled DeiT, DINOv2, and q/k-norm ViTs.

Block i: mlp.fc1 -> act -> mlp.fc2 (the hidden units h are fc2's input); attention is one
fused qkv projection, per-head q_norm/k_norm (Identity unless qk_norm=True), SDPA, proj.
Q/K pruning rebuilds the attention as QKPrunedAttention (narrow q/k rows of the fused
projection) or, with q/k norms, QKNormPrunedAttention (full projection and norms, then
per-head maps to the kept dims).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor, nn

from corp_cli import engine
from corp_cli.attention import sdpa_mixed_width
from corp_cli.errors import ArtifactError, UnsupportedModelError
from corp_cli.family import AttentionCut, BlockShape, Hook, Loaded, MlpWeights
from corp_cli.families.timm_base import TimmFamily, kwargs_from_record, qk_norm_hooks

SUPPORTED = (
    "timm VisionTransformer models whose blocks use Mlp (fc1 -> act -> fc2) and fused-qkv Attention, "
    "e.g. deit_tiny/small/base_patch16_224, vit_small/base_patch16_224, deit3_small_patch16_224, "
    "deit_base_distilled_patch16_224, vit_small_patch14_dinov2"
)


class QKPrunedAttention(nn.Module):
    """Self-attention whose queries/keys keep `qk_dim` dims per head and values `v_dim`, over `num_heads` heads.

    The fused projection emits [q (H*qk_dim) | k (H*qk_dim) | v (H*v_dim)]; the output
    projection reads H*v_dim. The softmax scale is the ORIGINAL head_dim^-1/2: the
    compensated logits reconstruct the dense ones, so they must not be re-normalised for
    the smaller width. `head_dim` is the dense per-head width; `base_heads` the dense head
    count (both describe the model the record rebuilds from, not this module's work).
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, qk_dim: int, *,
        scale: float, qkv_bias: bool = True, proj_bias: bool = True, dim_out: int | None = None,
        v_dim: int | None = None, base_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.base_heads = base_heads or num_heads
        self.head_dim = head_dim
        self.qk_dim = qk_dim
        self.v_dim = v_dim or head_dim
        self.scale = scale
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + self.v_dim), bias=qkv_bias)
        self.proj = nn.Linear(num_heads * self.v_dim, dim_out or dim, bias=proj_bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([h * dq, h * dq, h * dv], dim=-1)
        q = q.reshape(b, n, h, dq).transpose(1, 2)
        k = k.reshape(b, n, h, dq).transpose(1, 2)
        v = v.reshape(b, n, h, dv).transpose(1, 2)
        out = sdpa_mixed_width(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, h * dv))


class QKNormPrunedAttention(nn.Module):
    """Pruned attention for bases with per-head q/k norms (timm `qk_norm=True`).

    The norms see all head_dim dims (their mean/variance need every one), so the q and k
    projections stay full width per kept head and the norms are kept as they were; with
    Q/K pruning (`maps`), each head then maps its normalised q and k to `qk_dim` dims with
    (qk_dim x head_dim) matrices that select the kept dims and carry the folded (I + M)
    compensation: only the logit and softmax work shrinks, not the projection. Values keep
    `v_dim` dims per head and whole heads may be gone (`num_heads` of `base_heads`); the
    norms do not touch values. The softmax scale is the ORIGINAL head_dim^-1/2.
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, qk_dim: int, q_norm: nn.Module, k_norm: nn.Module, *,
        scale: float, qkv_bias: bool = True, proj_bias: bool = True, dim_out: int | None = None,
        v_dim: int | None = None, base_heads: int | None = None, maps: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.base_heads = base_heads or num_heads
        self.head_dim = head_dim
        self.qk_dim = qk_dim if maps else head_dim
        self.v_dim = v_dim or head_dim
        self.scale = scale
        self.qkv = nn.Linear(dim, num_heads * (2 * head_dim + self.v_dim), bias=qkv_bias)
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.q_out: nn.Parameter | None = None
        self.k_out: nn.Parameter | None = None
        if maps:
            self.q_out = nn.Parameter(torch.zeros(num_heads, qk_dim, head_dim))
            self.k_out = nn.Parameter(torch.zeros(num_heads, qk_dim, head_dim))
        self.proj = nn.Linear(num_heads * self.v_dim, dim_out or dim, bias=proj_bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        h, d, dv = self.num_heads, self.head_dim, self.v_dim
        q, k, v = self.qkv(x).split([h * d, h * d, h * dv], dim=-1)
        q = self.q_norm(q.reshape(b, n, h, d).transpose(1, 2))
        k = self.k_norm(k.reshape(b, n, h, d).transpose(1, 2))
        v = v.reshape(b, n, h, dv).transpose(1, 2)
        if self.q_out is not None and self.k_out is not None:
            q = torch.einsum("bhnd,hsd->bhns", q, self.q_out)
            k = torch.einsum("bhnd,hsd->bhns", k, self.k_out)
        out = sdpa_mixed_width(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, h * dv))


def has_qk_norm(attn: nn.Module) -> bool:
    """Whether the attention normalises q/k per head (timm qk_norm), which changes how it is pruned."""
    return any(not isinstance(getattr(attn, part, nn.Identity()), nn.Identity) for part in ("q_norm", "k_norm"))


def narrow_attention(attn: nn.Module, qk_dim: int, *, v_dim: int | None = None, num_heads: int | None = None,
                     maps: bool = True) -> QKPrunedAttention | QKNormPrunedAttention:
    """An empty narrow module with `attn`'s other widths, dtype and device (`attn` dense, or built from it)."""
    w = attn.qkv.weight
    common = dict(scale=float(attn.scale), qkv_bias=attn.qkv.bias is not None,
                  proj_bias=attn.proj.bias is not None, dim_out=attn.proj.out_features,
                  v_dim=v_dim, base_heads=getattr(attn, "base_heads", attn.num_heads))
    heads = num_heads or attn.num_heads
    if has_qk_norm(attn):
        new: nn.Module = QKNormPrunedAttention(
            attn.qkv.in_features, heads, attn.head_dim, qk_dim,
            copy.deepcopy(attn.q_norm), copy.deepcopy(attn.k_norm), maps=maps, **common,  # type: ignore[arg-type]
        )
    else:
        new = QKPrunedAttention(attn.qkv.in_features, heads, attn.head_dim, qk_dim, **common)  # type: ignore[arg-type]
    return new.to(device=w.device, dtype=w.dtype)  # type: ignore[return-value]


def narrow_linear(lin: nn.Linear, *, rows: Tensor | None = None, in_features: int | None = None) -> nn.Linear:
    """A fresh Linear like `lin`: only its output `rows` (weights copied), or a new input width (empty)."""
    kw = {"device": lin.weight.device, "dtype": lin.weight.dtype}
    if rows is None:
        return nn.Linear(in_features or lin.in_features, lin.out_features, bias=lin.bias is not None, **kw)
    new = nn.Linear(lin.in_features, int(rows.numel()), bias=lin.bias is not None, **kw)
    with torch.no_grad():
        new.weight.copy_(lin.weight[rows])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[rows])
    return new


class TimmViTFamily(TimmFamily):
    name = "timm-vit"
    modules = ("vision_transformer", "deit")
    option_reasons = {}
    examples = ("deit_base_patch16_224", "vit_base_patch16_224", "deit3_small_patch16_224", "vit_small_patch14_dinov2")
    summary = "timm VisionTransformer (DeiT, ViT, DeiT-III, distilled DeiT, DINOv2)"

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def validate(self, model: nn.Module) -> None:
        if not isinstance(model, VisionTransformer):
            raise UnsupportedModelError(f"{type(model).__name__} is not supported; corp prunes {SUPPORTED}")
        for i, blk in enumerate(model.blocks):
            mlp = getattr(blk, "mlp", None)
            if not isinstance(mlp, Mlp) or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
                raise UnsupportedModelError(
                    f"block {i} has a {type(mlp).__name__} MLP (gated or normalised hidden units are not supported "
                    f"in this family); corp prunes {SUPPORTED}"
                )
            if not isinstance(blk.attn, (Attention, QKPrunedAttention, QKNormPrunedAttention)):
                raise UnsupportedModelError(f"block {i} has a {type(blk.attn).__name__} attention; corp prunes {SUPPORTED}")

    # ---- blocks

    def num_blocks(self, model: nn.Module) -> int:
        return len(model.blocks)

    def shape(self, model: nn.Module, i: int) -> BlockShape:
        blk = model.blocks[i]
        attn = blk.attn
        return BlockShape(dim=blk.mlp.fc1.in_features, mlp_hidden=blk.mlp.fc1.out_features,
                          num_heads=attn.num_heads, head_dim=attn.head_dim,
                          qk_dim=getattr(attn, "qk_dim", attn.head_dim), v_dim=getattr(attn, "v_dim", attn.head_dim))

    def mlp_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor], None]) -> list[Hook]:
        return [model.blocks[i].mlp.fc2.register_forward_pre_hook(lambda _m, args: emit(args[0]))]

    def mlp_weights(self, model: nn.Module, i: int) -> MlpWeights:
        mlp = model.blocks[i].mlp
        return MlpWeights([mlp.fc1.weight.detach()], mlp.fc2.weight.detach(), _bias(mlp.fc2))

    def narrow_mlp(self, model: nn.Module, i: int, keep: Tensor, out_weight: Tensor, out_bias: Tensor | None) -> None:
        mlp = model.blocks[i].mlp
        fc2 = narrow_linear(mlp.fc2, in_features=int(keep.numel()))
        with torch.no_grad():
            fc2.weight.copy_(out_weight)
            if out_bias is not None:
                fc2.bias.copy_(out_bias)
        mlp.fc1 = narrow_linear(mlp.fc1, rows=keep.to(mlp.fc1.weight.device))
        mlp.fc2 = fc2

    def qk_refusal(self, model: nn.Module, i: int) -> str | None:
        attn = model.blocks[i].attn
        if not isinstance(attn, Attention):
            return f"block {i}: attention is already Q/K-pruned; prune the dense model instead"
        # A norm over the attention output is not per-head Q/K work and is not something the
        # pruned modules reproduce.
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            return (f"block {i}: attention has a norm layer over its output (scale_norm), which Q/K-pruned "
                    "attention does not support (prune --target mlp instead)")
        return None

    def qk_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor, Tensor], None]) -> list[Hook]:
        # q_norm / k_norm are Identity without qk_norm: either way their outputs are the q and k
        # that enter the logits, already (B, H, N, d)
        return qk_norm_hooks(model.blocks[i].attn, emit)

    def qk_weights(self, model: nn.Module, i: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        attn = model.blocks[i].attn
        w, b = attn.qkv.weight.detach(), _bias(attn.qkv)
        n = attn.num_heads * attn.head_dim
        return w[:n], (b[:n] if b is not None else None), w[n:2 * n], (b[n:2 * n] if b is not None else None)

    def softmax_scale(self, model: nn.Module, i: int) -> float:
        return float(model.blocks[i].attn.scale)

    def narrow_qk(self, model: nn.Module, i: int, keep: Tensor, m: Tensor, *, balanced: bool) -> None:
        blk = model.blocks[i]
        attn = blk.attn
        if has_qk_norm(attn):
            blk.attn = _qk_norm_pruned(attn, keep, m, balanced)
            return
        wq, bq, wk, bk = self.qk_weights(model, i)
        wqn, bqn, wkn, bkn = engine.fold_qk(wq, bq, wk, bk, keep, m, balanced=balanced)
        hd = attn.num_heads * attn.head_dim
        new = narrow_attention(attn, keep.shape[1])
        with torch.no_grad():
            new.qkv.weight.copy_(torch.cat([wqn, wkn, attn.qkv.weight[2 * hd:]], 0))
            if attn.qkv.bias is not None:
                new.qkv.bias.copy_(torch.cat([bqn, bkn, attn.qkv.bias[2 * hd:]], 0))
            new.proj.load_state_dict(attn.proj.state_dict())
        blk.attn = new

    # V/O dims and whole heads

    def vo_refusal(self, model: nn.Module, i: int) -> str | None:
        attn = model.blocks[i].attn
        if not isinstance(attn, Attention):
            return f"block {i}: attention is already pruned; prune the dense model instead"
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            return (f"block {i}: attention normalises its output before the projection (scale_norm), so removing "
                    "value dims would change that norm, which a correction folded into the projection cannot undo "
                    "(prune --target mlp instead)")
        if attn.proj.bias is None:
            return f"block {i}: the attention output projection has no bias to hold the compensation's constant term"
        return None

    def vo_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor], Tensor | None]) -> list[Hook]:
        # proj's input is o, the heads' outputs concatenated (the output norm is the identity: vo_refusal)
        return [model.blocks[i].attn.proj.register_forward_pre_hook(lambda _m, args: emit(args[0]))]

    def vo_weights(self, model: nn.Module, i: int) -> MlpWeights:
        attn = model.blocks[i].attn
        n = attn.num_heads * attn.head_dim
        return MlpWeights([attn.qkv.weight.detach()[2 * n:]], attn.proj.weight.detach(), _bias(attn.proj))

    def install_attention(self, model: nn.Module, i: int, cut: AttentionCut) -> None:
        blk = model.blocks[i]
        attn = blk.attn
        d = attn.head_dim
        heads = cut.heads.to(attn.qkv.weight.device)
        rows = engine.head_dims(heads, d)
        wq, bq, wk, bk = self.qk_weights(model, i)
        wv = attn.qkv.weight.detach()[2 * attn.num_heads * d:]
        bv = attn.qkv.bias.detach()[2 * attn.num_heads * d:] if attn.qkv.bias is not None else None
        v_rows = engine.vo_kept_dims(heads, cut.v_keep, d)
        dv = int(cut.v_keep.shape[1]) if cut.v_keep is not None else d
        ds = int(cut.qk_keep.shape[1]) if cut.qk_keep is not None else d
        wq, wk = wq[rows], wk[rows]
        bq, bk = (bq[rows] if bq is not None else None), (bk[rows] if bk is not None else None)
        normed = has_qk_norm(attn)
        if cut.qk_keep is not None and not normed:
            assert cut.qk_m is not None
            wq, bq, wk, bk = engine.fold_qk(wq, bq, wk, bk, cut.qk_keep, cut.qk_m, balanced=cut.balanced)
        new = narrow_attention(attn, ds, v_dim=dv, num_heads=int(heads.numel()), maps=cut.qk_keep is not None)
        with torch.no_grad():
            new.qkv.weight.copy_(torch.cat([wq, wk, wv[v_rows]], 0))
            if attn.qkv.bias is not None:
                new.qkv.bias.copy_(torch.cat([bq, bk, bv[v_rows]], 0))  # type: ignore[list-item]
            new.proj.weight.copy_(cut.out_weight)
            if cut.out_bias is not None:
                new.proj.bias.copy_(cut.out_bias)
            if normed and cut.qk_keep is not None:
                assert isinstance(new, QKNormPrunedAttention) and cut.qk_m is not None
                q_out, k_out = _qk_maps(cut.qk_keep, cut.qk_m, d, cut.balanced)
                new.q_out.copy_(q_out)  # type: ignore[union-attr]
                new.k_out.copy_(k_out)  # type: ignore[union-attr]
        blk.attn = new

    def layout_flops(self, model: nn.Module, i: int, shape: BlockShape, tokens: int) -> dict[str, int] | None:
        """q/k-norm attention, once Q/K-pruned: full-width q/k projections, then per-head (qk x d) maps."""
        attn = model.blocks[i].attn
        mapped = (isinstance(attn, QKNormPrunedAttention) and attn.q_out is not None) or (
            has_qk_norm(attn) and shape.qk_dim < shape.head_dim)
        if not mapped:
            return None
        from corp_cli.flops import block_flops

        return block_flops(shape.dim, shape.mlp_hidden, shape.num_heads, shape.head_dim, shape.qk_dim, tokens,
                           v_dim=shape.v_dim, qk_mapped=True)

    # ---- the checkpoint

    def infer_kwargs(self, model: nn.Module) -> dict[str, Any]:
        found = super().infer_kwargs(model)
        attn = model.blocks[0].attn if len(model.blocks) else None
        found["qk_norm"] = attn is not None and has_qk_norm(attn)
        return found

    def architecture(self, loaded: Loaded) -> dict[str, Any]:
        return {"family": self.name, "base_model": loaded.identity.name, "model_kwargs": dict(loaded.model_kwargs),
                "blocks": self.block_specs(loaded.model)}

    def block_specs(self, model: nn.Module) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        for i, blk in enumerate(model.blocks):
            s = self.shape(model, i)
            spec: dict[str, Any] = {"mlp_hidden": s.mlp_hidden, "qk_dim": s.qk_dim}
            if isinstance(blk.attn, QKNormPrunedAttention):
                # only written when true, so checkpoints without q/k norms are unchanged; it is
                # needed because this layout exists even when no dim was pruned (qk_dim == head_dim)
                spec["qk_norm"] = True
                if blk.attn.q_out is None:
                    spec["qk_maps"] = False  # V/O or heads pruned, Q/K not: no per-head maps
            # V/O widths and head counts only where pruned, so other records stay as they were
            if s.v_dim != s.head_dim:
                spec["v_dim"] = s.v_dim
            if s.num_heads != getattr(blk.attn, "base_heads", s.num_heads):
                spec["num_heads"] = s.num_heads
            blocks.append(spec)
        return blocks

    def narrow_block_for(self, model: nn.Module, i: int, spec: dict[str, Any], arch: dict[str, Any]) -> None:
        shape = self.shape(model, i)
        blk = model.blocks[i]
        if int(spec["mlp_hidden"]) != shape.mlp_hidden:
            width = int(spec["mlp_hidden"])
            blk.mlp.fc1 = nn.Linear(blk.mlp.fc1.in_features, width, bias=blk.mlp.fc1.bias is not None)
            blk.mlp.fc2 = narrow_linear(blk.mlp.fc2, in_features=width)
        qk, v = int(spec["qk_dim"]), int(spec.get("v_dim", shape.head_dim))
        heads = int(spec.get("num_heads", shape.num_heads))
        if not (0 < heads <= shape.num_heads and 0 < v <= shape.head_dim and 0 < qk <= shape.head_dim):
            raise ArtifactError(f"block {i} records widths (heads {heads}, qk {qk}, v {v}) outside {arch['base_model']}'s")
        if spec.get("qk_norm"):
            if not has_qk_norm(blk.attn):
                raise ArtifactError(f"block {i} is recorded with q/k norms but {arch['base_model']} has none")
            blk.attn = narrow_attention(blk.attn, qk, v_dim=v, num_heads=heads, maps=bool(spec.get("qk_maps", True)))
        elif (qk, v, heads) != (shape.qk_dim, shape.head_dim, shape.num_heads):
            if has_qk_norm(blk.attn):
                raise ArtifactError(f"block {i} of {arch['base_model']} has q/k norms but its record does not say so")
            blk.attn = narrow_attention(blk.attn, qk, v_dim=v, num_heads=heads)

    def checkpoint_meta(self, arch: dict[str, Any]) -> dict[str, Any]:
        stock = stock_timm_kwargs(self, arch)
        return {"stock_timm": {"model_name": arch["base_model"], "kwargs": stock}} if stock is not None else {}

    def stock_loader(self, arch: dict[str, Any]) -> Any:
        stock = stock_timm_kwargs(self, arch)
        if stock is None:
            return None
        return lambda: timm.create_model(arch["base_model"], pretrained=False, **kwargs_from_record(stock))


def stock_timm_kwargs(fam: TimmViTFamily, arch: dict[str, Any]) -> dict[str, Any] | None:
    """timm.create_model kwargs that build this architecture with stock timm classes, if any.

    Possible when only the MLP was pruned and every block kept the same width: then it is
    a ViT with a different mlp_ratio.
    """
    widths = {int(b["mlp_hidden"]) for b in arch["blocks"]}
    if len(widths) != 1:
        return None
    with torch.device("meta"):  # shapes only: no weights allocated or initialised
        probe = timm.create_model(arch["base_model"], pretrained=False, **kwargs_from_record(arch["model_kwargs"]))
    if any(int(b["qk_dim"]) != fam.shape(probe, i).head_dim or b.get("qk_norm") or "v_dim" in b or "num_heads" in b
           for i, b in enumerate(arch["blocks"])):
        return None
    dim = fam.shape(probe, 0).dim
    (hidden,) = widths
    ratio = hidden / dim
    if int(dim * ratio) != hidden:  # timm computes int(dim * mlp_ratio)
        return None
    return {**arch["model_kwargs"], "mlp_ratio": ratio}


def _qk_maps(keep: Tensor, m: Tensor, d: int, balanced: bool) -> tuple[Tensor, Tensor]:
    """The per-head (ds x d) maps of normalised q/k: fold_qk applied to the identity.

    Exactly the rows fold_qk would fold into W_Q/W_K, but acting on the normalised q/k instead of on x.
    """
    nh, ds = keep.shape
    eye = torch.eye(nh * d, dtype=engine.ACC_DTYPE, device=keep.device)
    sq, _, sk, _ = engine.fold_qk(eye, None, eye, None, keep, m, balanced=balanced)
    heads = torch.arange(nh, device=keep.device)
    # (H*ds, H*d) is block diagonal over heads; keep each head's own (ds, d) block
    return sq.reshape(nh, ds, nh, d)[heads, :, heads, :], sk.reshape(nh, ds, nh, d)[heads, :, heads, :]


def _qk_norm_pruned(attn: nn.Module, keep: Tensor, m: Tensor, balanced: bool) -> nn.Module:
    """Pruned attention for a base with q/k norms: full projection and norms, then per-head maps."""
    ds = keep.shape[1]
    q_out, k_out = _qk_maps(keep, m, attn.head_dim, balanced)
    new = narrow_attention(attn, ds)
    with torch.no_grad():
        new.qkv.load_state_dict(attn.qkv.state_dict())
        new.q_norm.load_state_dict(attn.q_norm.state_dict())
        new.k_norm.load_state_dict(attn.k_norm.state_dict())
        new.q_out.copy_(q_out)
        new.k_out.copy_(k_out)
        new.proj.load_state_dict(attn.proj.state_dict())
    return new


def _bias(lin: nn.Linear) -> Tensor | None:
    return lin.bias.detach() if lin.bias is not None else None

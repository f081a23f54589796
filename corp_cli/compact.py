"""The compacted model: narrower modules, its self-describing checkpoint, and `load_pruned`.

A pruned model is rebuilt, never patched: the base timm architecture is created, each
pruned block gets freshly constructed narrower modules, and the saved weights are loaded
into them strictly. The checkpoint's metadata carries everything needed for that.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corp_cli import __version__
from corp_cli.artifacts import FORMAT_VERSION, read_safetensors, save_safetensors_atomic
from corp_cli.errors import ArtifactError

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
# Zero-pad narrow q/k to the value width on CPU (see sdpa_mixed_width); a switch so the
# FLOP test can count the unpadded computation the analytical count describes.
PAD_NARROW_QK_ON_CPU = True


def sdpa_mixed_width(
    q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None, is_causal: bool, scale: float
) -> Tensor:
    """SDPA with q/k narrower than v, at fused-kernel speed on CPU.

    PyTorch's fused CPU attention kernel needs equal q/k/v head dims; with narrower q/k it
    falls back to an unfused path about 2x slower than the dense attention (measured:
    4.3 ms vs 2.2 ms for 8x3x197 heads). Zero-padding q and k to v's width adds exactly
    0 to every logit and keeps the fused kernel, so on CPU the Q/K saving is the smaller
    projection while the logits run at dense cost.
    """
    dq, dv = q.shape[-1], v.shape[-1]
    if PAD_NARROW_QK_ON_CPU and q.device.type == "cpu" and dq < dv:
        q = F.pad(q, (0, dv - dq))
        k = F.pad(k, (0, dv - dq))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


class QKPrunedAttention(nn.Module):
    """Self-attention whose queries/keys keep `qk_dim` dims per head while values keep `head_dim`.

    The fused projection emits [q (H*qk_dim) | k (H*qk_dim) | v (H*head_dim)]. The softmax
    scale is the ORIGINAL head_dim^-1/2: the compensated logits reconstruct the dense
    ones, so they must not be re-normalised for the smaller width.
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, qk_dim: int, *,
        scale: float, qkv_bias: bool = True, proj_bias: bool = True, dim_out: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qk_dim = qk_dim
        self.scale = scale
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + head_dim), bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim_out or dim, bias=proj_bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        h, dq, dv = self.num_heads, self.qk_dim, self.head_dim
        q, k, v = self.qkv(x).split([h * dq, h * dq, h * dv], dim=-1)
        q = q.reshape(b, n, h, dq).transpose(1, 2)
        k = k.reshape(b, n, h, dq).transpose(1, 2)
        v = v.reshape(b, n, h, dv).transpose(1, 2)
        out = sdpa_mixed_width(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, h * dv))


def narrow_mlp_linears(fc1: nn.Linear, fc2: nn.Linear, hidden: int) -> tuple[nn.Linear, nn.Linear]:
    """Fresh fc1/fc2 with `hidden` units, same dtype/device/bias layout as the originals."""
    kw = {"device": fc1.weight.device, "dtype": fc1.weight.dtype}
    new1 = nn.Linear(fc1.in_features, hidden, bias=fc1.bias is not None, **kw)
    new2 = nn.Linear(hidden, fc2.out_features, bias=fc2.bias is not None, **kw)
    return new1, new2


class QKNormPrunedAttention(nn.Module):
    """Q/K-pruned attention for bases with per-head q/k norms (timm `qk_norm=True`).

    The norms see all head_dim dims (their mean/variance need every one), so the fused
    projection stays full width and the norms are kept as they were; each head then maps
    its normalised q and k to `qk_dim` dims with (qk_dim x head_dim) matrices that select
    the kept dims and carry the folded (I + M) compensation. Only the logit and softmax
    work shrinks, not the projection. The softmax scale is the ORIGINAL head_dim^-1/2.
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, qk_dim: int, q_norm: nn.Module, k_norm: nn.Module, *,
        scale: float, qkv_bias: bool = True, proj_bias: bool = True, dim_out: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qk_dim = qk_dim
        self.scale = scale
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.q_out = nn.Parameter(torch.zeros(num_heads, qk_dim, head_dim))
        self.k_out = nn.Parameter(torch.zeros(num_heads, qk_dim, head_dim))
        self.proj = nn.Linear(num_heads * head_dim, dim_out or dim, bias=proj_bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        q = torch.einsum("bhnd,hsd->bhns", self.q_norm(q), self.q_out)
        k = torch.einsum("bhnd,hsd->bhns", self.k_norm(k), self.k_out)
        out = sdpa_mixed_width(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, h * d))


def has_qk_norm(attn: nn.Module) -> bool:
    """Whether the attention normalises q/k per head (timm qk_norm), which changes how it is pruned."""
    return any(not isinstance(getattr(attn, part, nn.Identity()), nn.Identity) for part in ("q_norm", "k_norm"))


def narrow_attention(attn: nn.Module, qk_dim: int) -> QKPrunedAttention | QKNormPrunedAttention:
    w = attn.qkv.weight
    if has_qk_norm(attn):
        normed = QKNormPrunedAttention(
            attn.qkv.in_features, attn.num_heads, attn.head_dim, qk_dim,
            copy.deepcopy(attn.q_norm), copy.deepcopy(attn.k_norm),
            scale=float(attn.scale), qkv_bias=attn.qkv.bias is not None,
            proj_bias=attn.proj.bias is not None, dim_out=attn.proj.out_features,
        )
        return normed.to(device=w.device, dtype=w.dtype)
    new = QKPrunedAttention(
        attn.qkv.in_features, attn.num_heads, attn.head_dim, qk_dim,
        scale=float(attn.scale), qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None, dim_out=attn.proj.out_features,
    )
    return new.to(device=w.device, dtype=w.dtype)


def architecture(model: nn.Module, base: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Self-description of a (possibly pruned) model: enough to rebuild it with no other file."""
    from corp_cli.adapters import adapter_for
    from corp_cli.hf import is_hf_module

    if is_hf_module(model):  # Hugging Face encoders describe themselves with their config
        from corp_cli.hf.compact import hf_architecture

        return hf_architecture(model, base, model_kwargs)
    ad = adapter_for(model)
    blocks: list[dict[str, Any]] = []
    for i, blk in enumerate(ad.blocks):
        spec: dict[str, Any] = {"mlp_hidden": ad.shape(i).mlp_hidden, "qk_dim": ad.shape(i).qk_dim}
        if isinstance(blk.attn, QKNormPrunedAttention):
            # only written when true, so checkpoints without q/k norms are unchanged; it is
            # needed because this layout exists even when no dim was pruned (qk_dim == head_dim)
            spec["qk_norm"] = True
        blocks.append(spec)
    return {
        "family": ad.family,
        "base_model": base,
        "model_kwargs": model_kwargs,
        "blocks": blocks,
    }


def apply_architecture(model: nn.Module, arch: dict[str, Any]) -> nn.Module:
    """Replace each block's modules with empty ones of the recorded widths (weights loaded after)."""
    from corp_cli.adapters import adapter_for

    ad = adapter_for(model)
    blocks = arch["blocks"]
    if len(blocks) != len(ad.blocks):
        raise ArtifactError(f"architecture lists {len(blocks)} blocks but {arch['base_model']} has {len(ad.blocks)}")
    for i, spec in enumerate(blocks):
        shape = ad.shape(i)
        if int(spec["mlp_hidden"]) != shape.mlp_hidden:
            fc1, fc2 = ad.mlp_linears(i)
            ad.set_mlp_linears(i, *narrow_mlp_linears(fc1, fc2, int(spec["mlp_hidden"])))
        blk = ad.blocks[i]
        if spec.get("qk_norm"):
            if not has_qk_norm(blk.attn):
                raise ArtifactError(f"block {i} is recorded with q/k norms but {arch['base_model']} has none")
            blk.attn = narrow_attention(blk.attn, int(spec["qk_dim"]))
        elif int(spec["qk_dim"]) != shape.qk_dim:
            blk.attn = narrow_attention(blk.attn, int(spec["qk_dim"]))
    return model


def stock_timm_kwargs(arch: dict[str, Any]) -> dict[str, Any] | None:
    """timm.create_model kwargs that build this architecture with stock timm classes, if any.

    Possible when only the MLP was pruned and every block kept the same width: then it is
    a ViT with a different mlp_ratio.
    """
    widths = {int(b["mlp_hidden"]) for b in arch["blocks"]}
    if len(widths) != 1:
        return None
    with torch.device("meta"):  # shapes only: no weights allocated or initialised
        probe = timm.create_model(arch["base_model"], pretrained=False, **arch["model_kwargs"])
    from corp_cli.adapters import adapter_for

    ad = adapter_for(probe)
    if any(int(b["qk_dim"]) != ad.shape(i).head_dim or b.get("qk_norm") for i, b in enumerate(arch["blocks"])):
        return None
    dim = ad.shape(0).dim
    (hidden,) = widths
    ratio = hidden / dim
    if int(dim * ratio) != hidden:  # timm computes int(dim * mlp_ratio)
        return None
    return {**arch["model_kwargs"], "mlp_ratio": ratio}


def save_pruned(path: Path, model: nn.Module, arch: dict[str, Any], extra_meta: dict[str, Any]) -> None:
    if str(arch.get("family", "")).startswith("hf-"):  # no stock-timm form; tokenizer files go beside it
        from corp_cli.hf.compact import save_hf_pruned

        return save_hf_pruned(path, model, arch, extra_meta)
    meta = {
        "kind": "model",
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "architecture": arch,
        **extra_meta,
    }
    stock = stock_timm_kwargs(arch)
    if stock is not None:
        meta["stock_timm"] = {"model_name": arch["base_model"], "kwargs": stock}
    save_safetensors_atomic(path, model.state_dict(), meta)


def read_pruned(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    return read_safetensors(p, kind="model")


def load_pruned(
    path: str | Path, *, device: str | torch.device = "cpu", stock_timm: bool = False
) -> nn.Module:
    """Rebuild a pruned model from a corp output directory (or its model.safetensors), in eval mode.

    Needs only the checkpoint: the base timm architecture is created without pretrained
    weights, narrowed to the recorded widths, and the saved weights are loaded strictly.
    stock_timm=True returns a plain timm class instead, when the pruning allows it
    (MLP-only, same width in every block); otherwise it raises ArtifactError.
    """
    state, meta = read_pruned(path)
    arch = meta["architecture"]
    if str(arch.get("family", "")).startswith("hf-"):  # rebuilt by transformers from the recorded config
        if stock_timm:
            raise ArtifactError(f"{path}: a Hugging Face model has no stock timm form; load it with load_pruned(path)")
        from corp_cli.hf.compact import load_hf_pruned

        return load_hf_pruned(path, state, meta, device)
    if stock_timm:
        stock = meta.get("stock_timm")
        if stock is None:
            raise ArtifactError(
                f"{path}: this pruned model is not expressible as a stock timm model "
                "(per-block widths differ or Q/K dims were pruned); load it with load_pruned(path)"
            )
        model = timm.create_model(stock["model_name"], pretrained=False, **stock["kwargs"])
    else:
        model = timm.create_model(arch["base_model"], pretrained=False, **arch["model_kwargs"])
        apply_architecture(model, arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: weights do not match the recorded architecture ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()

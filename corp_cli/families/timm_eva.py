"""timm Eva: EVA-02 (gated SwiGLU MLPs, rotary attention), and other models timm builds with the Eva class.

Block i's MLP is one of
- GluMlp (eva02_tiny/small): one fused fc1 whose first half is the gate and second half
  the value, h = silu(gate) * value, then fc2;
- SwiGLU (split fc1_g / fc1_x; eva02_base/large add a LayerNorm over h before fc2);
- Mlp (fc1 -> act -> fc2).
The hidden units h are fc2's input: CORP's compensation is unchanged for a gated MLP (h_P
is predicted from h_S and the correction folds into fc2); a unit's gate and value rows are
removed together.

Attention (fused qkv, q/v biases, no k bias, rotary embeddings on the patch tokens; the
prefix/class tokens are not rotated): Q/K dims are pruned as whole rotary pairs (timm's Eva
rope is interleaved, pairs (2j, 2j+1); rotate_half models pair (j, j + d/2)), each kept pair of
each head corrected by every dim of the head mixed into its kept query rows (engine "rotary Q/K pairs",
fitted at every relative position of the patch grid, the class token's unrotated terms among
them); value/output dims and whole heads as the timm ViT family prunes them (the ridge on o,
folded into proj). The narrow module, EvaPrunedAttention, rotates each kept q/k dim with the
sin/cos of the dense dim it was (a persistent index buffer), so one model may keep different
pairs in every head and block.

Refused, in one line each, because the result would be silently wrong:
- a norm over the hidden units (scale_mlp): removing units changes its mean and variance,
  which an affine correction folded into fc2 cannot undo;
- attention with a norm over its output (scale_norm), per-head q/k norms, a gate, separate
  q/k/v projections or per-depth ("mixed") rope: no narrow form here yet;
- Q/K pruning without rotary embeddings: Eva's attention then has no Q/K-narrow form in corp.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, SwiGLU
from timm.layers.pos_embed_sincos import apply_rot_embed
from timm.models.eva import Eva, EvaAttention
from torch import Tensor, nn

from corp_cli import engine
from corp_cli.attention import sdpa_mixed_width
from corp_cli.errors import ArtifactError, UnsupportedModelError
from corp_cli.family import AttentionCut, BlockShape, Hook, Loaded, MlpWeights
from corp_cli.families.timm_base import TimmFamily, kwargs_from_record, qk_norm_hooks

_MLPS = (Mlp, GluMlp, SwiGLU)


def _linear(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None, device=like.weight.device,
                     dtype=like.weight.dtype)


def _rows(lin: nn.Linear, rows: Tensor) -> nn.Linear:
    new = _linear(lin, lin.in_features, int(rows.numel()))
    with torch.no_grad():
        new.weight.copy_(lin.weight[rows])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[rows])
    return new


class EvaPrunedAttention(nn.Module):
    """Eva attention with `num_heads` of `base_heads` heads, `qk_dim` Q/K dims and `v_dim` value dims per head.

    qkv emits [q (H*qk_dim) | k (H*qk_dim) | v (H*v_dim)]; q and v have biases where the base
    has them, k none (as timm's Eva). `rope_dims` (H, qk_dim) says which dense dim each kept q/k
    dim was: its sin/cos are that dim's, and whole pairs are kept in the dense order, so the
    narrow head keeps the dense rotary layout (interleaved or half-split). The first
    `num_prefix_tokens` tokens are not rotated. The softmax scale is the dense head_dim^-1/2.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_dim: int, v_dim: int, *, base_heads: int,
                 scale: float, num_prefix_tokens: int, qkv_bias: bool, proj_bias: bool, rotate_half: bool,
                 dim_out: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.base_heads, self.head_dim = num_heads, base_heads, head_dim
        self.qk_dim, self.v_dim = qk_dim, v_dim
        self.scale = scale
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=False)
        self.q_bias = nn.Parameter(torch.zeros(num_heads * qk_dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(num_heads * v_dim)) if qkv_bias else None
        self.register_buffer("rope_dims", torch.arange(qk_dim).repeat(num_heads, 1))
        self.proj = nn.Linear(num_heads * v_dim, dim_out or dim, bias=proj_bias)

    def forward(self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        bias = None
        if self.q_bias is not None and self.v_bias is not None:
            bias = torch.cat([self.q_bias, self.q_bias.new_zeros(h * dq), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).split([h * dq, h * dq, h * dv], dim=-1)
        q = q.reshape(b, n, h, dq).transpose(1, 2)
        k = k.reshape(b, n, h, dq).transpose(1, 2)
        v = v.reshape(b, n, h, dv).transpose(1, 2)
        if rope is not None:
            npt = self.num_prefix_tokens
            sin, cos = rope.chunk(2, -1)  # (patches, head_dim) each
            sin, cos = sin[:, self.rope_dims].transpose(0, 1), cos[:, self.rope_dims].transpose(0, 1)  # (H, patches, qk)
            q = torch.cat([q[:, :, :npt], apply_rot_embed(q[:, :, npt:], sin, cos, half=self.rotate_half)], 2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed(k[:, :, npt:], sin, cos, half=self.rotate_half)], 2).type_as(v)
        out = sdpa_mixed_width(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, h * dv))


def _attention_refusal(model: nn.Module, i: int) -> str | None:
    """Why block i's Eva attention has no narrow form in corp (V/O dims, heads and Q/K pairs alike), or None."""
    attn = model.blocks[i].attn
    if isinstance(attn, EvaPrunedAttention):
        return f"block {i}: attention is already pruned; prune the dense model instead"
    if not isinstance(attn, EvaAttention):
        return f"block {i} has a {type(attn).__name__} attention, which corp does not narrow"
    why = None
    if attn.qkv is None:
        why = "separate q/k/v projections"
    elif not isinstance(attn.norm, nn.Identity):
        why = "a norm over the attention output (scale_norm), which removing value dims would change"
    elif not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        why = "per-head q/k norms"
    elif attn.gate is not None:
        why = "a gated output"
    elif getattr(model, "rope_mixed", False):
        why = "per-depth (mixed) rotary embeddings"
    elif attn.proj.bias is None:
        why = "no output projection bias to hold the compensation's constant term"
    if why is None:
        return None
    return f"block {i}: its attention has {why}; corp has no narrow form for it (prune --target mlp instead)"


class TimmEvaFamily(TimmFamily):
    name = "timm-eva"
    modules = ("eva",)
    option_reasons = {}
    examples = ("eva02_tiny_patch14_224", "eva02_small_patch14_224")
    summary = "timm Eva (EVA-02: gated MLPs, rotary attention); MLP, rotary Q/K pairs, V/O dims and heads"

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, Eva)

    def validate(self, model: nn.Module) -> None:
        from corp_cli.errors import UnsupportedModelError

        if not isinstance(model, Eva):
            raise UnsupportedModelError(f"{type(model).__name__} is not a timm Eva model")
        for i, blk in enumerate(model.blocks):
            if not isinstance(blk.mlp, _MLPS):
                raise UnsupportedModelError(f"block {i} has a {type(blk.mlp).__name__} MLP; corp prunes Eva blocks "
                                            "with Mlp, GluMlp or SwiGLU")
            if isinstance(blk.mlp, GluMlp) and (blk.mlp.chunk_dim != -1 or not isinstance(blk.mlp.fc1, nn.Linear)):
                raise UnsupportedModelError(f"block {i}: a convolutional GluMlp is not supported")

    # ---- blocks

    def num_blocks(self, model: nn.Module) -> int:
        return len(model.blocks)

    def _width(self, mlp: nn.Module) -> int:
        return int(mlp.fc2.in_features)

    def shape(self, model: nn.Module, i: int) -> BlockShape:
        blk = model.blocks[i]
        attn = blk.attn
        return BlockShape(dim=int(model.embed_dim), mlp_hidden=self._width(blk.mlp), num_heads=int(attn.num_heads),
                          head_dim=int(attn.head_dim), qk_dim=int(getattr(attn, "qk_dim", attn.head_dim)),
                          v_dim=int(getattr(attn, "v_dim", attn.head_dim)))

    def mlp_refusal(self, model: nn.Module, i: int) -> str | None:
        norm = getattr(model.blocks[i].mlp, "norm", nn.Identity())
        if not isinstance(norm, nn.Identity):
            return (f"block {i}: its MLP normalises the hidden units ({type(norm).__name__} before fc2, timm scale_mlp), "
                    "so removing units changes that norm's mean and variance, which a correction folded into fc2 "
                    "cannot undo; corp refuses rather than prune it wrong (eva02_tiny/small have no such norm)")
        return None

    def mlp_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor], None]) -> list[Hook]:
        # fc2's input is h = act(gate) * value (dropout is the identity in eval mode; a hidden
        # norm, where there is one, makes mlp_refusal refuse before any pruning)
        return [model.blocks[i].mlp.fc2.register_forward_pre_hook(lambda _m, args: emit(args[0]))]

    def sublayer_modules(self, model: nn.Module, i: int, part: str) -> tuple[nn.Module, nn.Module, bool]:
        # EvaBlock is pre-norm: x + gamma_1 * attn(norm1(x)) enters norm2; x + gamma_2 * mlp(norm2(x)) is the output
        blk = model.blocks[i]
        if not hasattr(blk, "gamma_2"):
            raise UnsupportedModelError(f"block {i}: --sequential needs a pre-norm EvaBlock ({type(blk).__name__} is not one)")
        return (blk.mlp.fc2, blk, False) if part == "mlp" else (blk.attn.proj, blk.norm2, True)

    def sublayer_scale(self, model: nn.Module, i: int, part: str) -> Tensor | None:
        gamma = getattr(model.blocks[i], "gamma_2" if part == "mlp" else "gamma_1", None)
        return gamma.detach() if isinstance(gamma, Tensor) else None

    def mlp_weights(self, model: nn.Module, i: int) -> MlpWeights:
        mlp = model.blocks[i].mlp
        fc2 = mlp.fc2
        bias = fc2.bias.detach() if fc2.bias is not None else None
        if isinstance(mlp, GluMlp):
            w = mlp.fc1.weight.detach()
            d = self._width(mlp)
            gate, value = (w[d:], w[:d]) if mlp.gate_last else (w[:d], w[d:])
            return MlpWeights([gate, value], fc2.weight.detach(), bias)
        if isinstance(mlp, SwiGLU):
            return MlpWeights([mlp.fc1_g.weight.detach(), mlp.fc1_x.weight.detach()], fc2.weight.detach(), bias)
        return MlpWeights([mlp.fc1.weight.detach()], fc2.weight.detach(), bias)

    def narrow_mlp(self, model: nn.Module, i: int, keep: Tensor, out_weight: Tensor, out_bias: Tensor | None) -> None:
        mlp = model.blocks[i].mlp
        keep = keep.to(mlp.fc2.weight.device)
        fc2 = _linear(mlp.fc2, int(keep.numel()), mlp.fc2.out_features)
        with torch.no_grad():
            fc2.weight.copy_(out_weight)
            if out_bias is not None:
                fc2.bias.copy_(out_bias)
        if isinstance(mlp, GluMlp):
            # both halves of the fused projection lose the same units: [gate | value] stays paired
            mlp.fc1 = _rows(mlp.fc1, torch.cat([keep, keep + self._width(mlp)]))
        elif isinstance(mlp, SwiGLU):
            mlp.fc1_g = _rows(mlp.fc1_g, keep)
            mlp.fc1_x = _rows(mlp.fc1_x, keep)
        else:
            mlp.fc1 = _rows(mlp.fc1, keep)
        mlp.fc2 = fc2

    def qk_refusal(self, model: nn.Module, i: int) -> str | None:
        why = _attention_refusal(model, i)
        if why is not None:
            return why
        if getattr(model, "rope", None) is None:
            return ("Eva attention without rotary embeddings has no Q/K-narrow form in corp yet; "
                    "MLP pruning is available (--target mlp)")
        return None

    def rotary_pairs(self, model: nn.Module, i: int) -> Tensor | None:
        if getattr(model, "rope", None) is None:
            return None
        d = int(model.blocks[i].attn.head_dim)
        if getattr(model.blocks[i].attn, "rotate_half", False):  # timm rope_rotate_half: dim j turns with j + d/2
            return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], 1)
        return torch.stack([torch.arange(0, d, 2), torch.arange(1, d, 2)], 1)  # timm rot(): (2j, 2j+1)

    def rotary_offsets(self, model: nn.Module, i: int) -> tuple[Tensor, Tensor] | None:
        """Every (query token, key token) pair of one image: its key-minus-query angle per pair, deduplicated.

        The angles come from the model's own rope embedding (patch tokens) and 0 for the prefix
        tokens, which are not rotated: the class token's logits are offsets like the others.
        """
        pairs = self.rotary_pairs(model, i)
        if pairs is None:
            return None
        sin, cos = model.rope.get_embed().chunk(2, -1)
        theta = torch.atan2(sin[:, pairs[:, 0]].double(), cos[:, pairs[:, 0]].double())  # (patches, P)
        npt = int(model.blocks[i].attn.num_prefix_tokens)
        theta = torch.cat([theta.new_zeros(npt, theta.shape[1]), theta])
        diff = (theta[None, :, :] - theta[:, None, :]).reshape(-1, theta.shape[1])  # key - query
        diff = torch.atan2(diff.sin(), diff.cos())  # the same rotation, in (-pi, pi]
        key = torch.round(diff * 1e5)  # the rope embedding is float32: equal offsets agree to ~1e-6
        uniq, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
        angles = torch.zeros(uniq.shape[0], diff.shape[1], dtype=torch.float64).index_copy_(0, inverse, diff)
        return angles, counts.double()

    def qk_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor, Tensor], Any]) -> list[Hook]:
        # q_norm / k_norm are Identity (a q/k norm is refused): their outputs are q and k BEFORE the
        # rotation, as rotary_offsets' positional fit wants them, (B, H, N, d), prefix tokens included
        return qk_norm_hooks(model.blocks[i].attn, emit)

    def qk_weights(self, model: nn.Module, i: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        attn = model.blocks[i].attn
        n = attn.num_heads * attn.head_dim
        w = attn.qkv.weight.detach()
        bq = attn.q_bias.detach() if attn.q_bias is not None else None
        return w[:n], bq, w[n:2 * n], None

    def softmax_scale(self, model: nn.Module, i: int) -> float:
        return float(model.blocks[i].attn.scale)

    def narrow_qk(self, model: nn.Module, i: int, keep: Tensor, m: Tensor, *, balanced: bool) -> None:
        attn = model.blocks[i].attn
        proj = attn.proj
        self.install_attention(model, i, AttentionCut(
            heads=torch.arange(attn.num_heads, device=keep.device), qk_keep=keep, qk_m=m, v_keep=None,
            out_weight=proj.weight.detach(), out_bias=proj.bias.detach() if proj.bias is not None else None,
            balanced=balanced))

    def vo_refusal(self, model: nn.Module, i: int) -> str | None:
        return _attention_refusal(model, i)

    def vo_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor], Tensor | None]) -> list[Hook]:
        # proj's input is o, the heads' outputs concatenated (no output norm or gate: _attention_refusal)
        return [model.blocks[i].attn.proj.register_forward_pre_hook(lambda _m, args: emit(args[0]))]

    def vo_weights(self, model: nn.Module, i: int) -> MlpWeights:
        attn = model.blocks[i].attn
        n = attn.num_heads * attn.head_dim
        proj = attn.proj
        return MlpWeights([attn.qkv.weight.detach()[2 * n:]], proj.weight.detach(),
                          proj.bias.detach() if proj.bias is not None else None)

    def install_attention(self, model: nn.Module, i: int, cut: AttentionCut) -> None:
        """Narrow block i's attention to `cut`; the Q/K correction goes into the query rows only (it must act
        before the rotation, and commutes with it: engine "rotary Q/K pairs")."""
        blk = model.blocks[i]
        attn = blk.attn
        d, nh = int(attn.head_dim), int(attn.num_heads)
        dev = attn.qkv.weight.device
        heads = cut.heads.to(dev)
        hk = int(heads.numel())
        qk_keep = cut.qk_keep.to(dev) if cut.qk_keep is not None else torch.arange(d, device=dev).repeat(hk, 1)
        ds = int(qk_keep.shape[1])
        dv = int(cut.v_keep.shape[1]) if cut.v_keep is not None else d
        wq, bq, wk, _ = self.qk_weights(model, i)
        rows = (heads[:, None] * d + qk_keep).reshape(-1)
        if cut.qk_m is not None:  # every dim of the query head mixed into its kept rows (engine.fold_rotary_mix)
            wq, bq = engine.fold_rotary_mix(wq, bq, heads, qk_keep, cut.qk_m)
        else:
            wq, bq = wq[rows], (bq[rows] if bq is not None else None)
        wk = wk[rows]
        v_rows = engine.vo_kept_dims(heads, cut.v_keep.to(dev) if cut.v_keep is not None else None, d)
        wv = attn.qkv.weight.detach()[2 * nh * d:][v_rows]
        new = self._narrow_module(attn, hk, ds, dv)
        with torch.no_grad():
            new.qkv.weight.copy_(torch.cat([wq, wk, wv], 0))
            if new.q_bias is not None and new.v_bias is not None:
                assert bq is not None and attn.v_bias is not None
                new.q_bias.copy_(bq)
                new.v_bias.copy_(attn.v_bias.detach()[v_rows])
            new.rope_dims.copy_(qk_keep)
            new.proj.weight.copy_(cut.out_weight)
            if cut.out_bias is not None:
                new.proj.bias.copy_(cut.out_bias)
        blk.attn = new

    def _narrow_module(self, attn: nn.Module, heads: int, qk_dim: int, v_dim: int) -> EvaPrunedAttention:
        w = attn.qkv.weight
        new = EvaPrunedAttention(
            attn.qkv.in_features, heads, int(attn.head_dim), qk_dim, v_dim, base_heads=getattr(attn, "base_heads", attn.num_heads),
            scale=float(attn.scale), num_prefix_tokens=int(attn.num_prefix_tokens), qkv_bias=attn.q_bias is not None,
            proj_bias=attn.proj.bias is not None, rotate_half=bool(getattr(attn, "rotate_half", False)),
            dim_out=attn.proj.out_features)
        return new.to(device=w.device, dtype=w.dtype)

    # ---- the checkpoint

    def block_specs(self, model: nn.Module) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        for i, blk in enumerate(model.blocks):
            s = self.shape(model, i)
            spec: dict[str, Any] = {"mlp_hidden": s.mlp_hidden, "qk_dim": s.qk_dim}
            if isinstance(blk.attn, EvaPrunedAttention):  # only where pruned: MLP-only records stay as they were
                spec["v_dim"] = s.v_dim
                spec["num_heads"] = s.num_heads
            blocks.append(spec)
        return blocks

    def architecture(self, loaded: Loaded) -> dict[str, Any]:
        return {"family": self.name, "base_model": loaded.identity.name, "model_kwargs": dict(loaded.model_kwargs),
                "blocks": self.block_specs(loaded.model)}

    def narrow_block_for(self, model: nn.Module, i: int, spec: dict[str, Any], arch: dict[str, Any]) -> None:
        attn = model.blocks[i].attn
        if "num_heads" in spec or int(spec["qk_dim"]) != int(attn.head_dim):
            d, nh = int(attn.head_dim), int(attn.num_heads)
            heads, qk, v = int(spec.get("num_heads", nh)), int(spec["qk_dim"]), int(spec.get("v_dim", d))
            if not (0 < heads <= nh and 0 < v <= d and 0 < qk <= d) or (qk % 2 and self.rotary_pairs(model, i) is not None):
                raise ArtifactError(f"block {i} records widths (heads {heads}, qk {qk}, v {v}) outside {arch['base_model']}'s")
            model.blocks[i].attn = self._narrow_module(attn, heads, qk, v)
        mlp = model.blocks[i].mlp
        width = int(spec["mlp_hidden"])
        if width == self._width(mlp):
            return
        if isinstance(mlp, GluMlp):
            mlp.fc1 = _linear(mlp.fc1, mlp.fc1.in_features, 2 * width)
        elif isinstance(mlp, SwiGLU):
            mlp.fc1_g = _linear(mlp.fc1_g, mlp.fc1_g.in_features, width)
            mlp.fc1_x = _linear(mlp.fc1_x, mlp.fc1_x.in_features, width)
        else:
            mlp.fc1 = _linear(mlp.fc1, mlp.fc1.in_features, width)
        mlp.fc2 = _linear(mlp.fc2, width, mlp.fc2.out_features)

    def checkpoint_meta(self, arch: dict[str, Any]) -> dict[str, Any]:
        stock = self._stock_kwargs(arch)
        return {"stock_timm": {"model_name": arch["base_model"], "kwargs": stock}} if stock is not None else {}

    def stock_loader(self, arch: dict[str, Any]) -> Any:
        stock = self._stock_kwargs(arch)
        if stock is None:
            return None
        return lambda: timm.create_model(arch["base_model"], pretrained=False, **kwargs_from_record(stock))

    def _stock_kwargs(self, arch: dict[str, Any]) -> dict[str, Any] | None:
        """Every block the same MLP width: then it is the same Eva with another mlp_ratio (timm: int(dim * ratio))."""
        widths = {int(b["mlp_hidden"]) for b in arch["blocks"]}
        if len(widths) != 1 or any("num_heads" in b for b in arch["blocks"]):
            return None  # pruned attention has no stock timm form
        with torch.device("meta"):
            probe = timm.create_model(arch["base_model"], pretrained=False, **kwargs_from_record(arch["model_kwargs"]))
        (hidden,) = widths
        stock = {**arch["model_kwargs"], "mlp_ratio": hidden / int(probe.embed_dim)}
        with torch.device("meta"):  # timm computes int(dim * ratio) and may align it: check what it builds
            built = timm.create_model(arch["base_model"], pretrained=False, **kwargs_from_record(stock))
        return stock if all(self._width(b.mlp) == hidden for b in built.blocks) else None

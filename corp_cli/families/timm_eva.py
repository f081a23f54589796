"""timm Eva: EVA-02 (gated SwiGLU MLPs, rotary attention), and other models timm builds with the Eva class.

Block i's MLP is one of
- GluMlp (eva02_tiny/small): one fused fc1 whose first half is the gate and second half
  the value, h = silu(gate) * value, then fc2;
- SwiGLU (split fc1_g / fc1_x; eva02_base/large add a LayerNorm over h before fc2);
- Mlp (fc1 -> act -> fc2).
The hidden units h are fc2's input: CORP's compensation is unchanged for a gated MLP (h_P
is predicted from h_S and the correction folds into fc2); a unit's gate and value rows are
removed together.

Refused, in one line each, because the result would be silently wrong:
- a norm over the hidden units (scale_mlp): removing units changes its mean and variance,
  which an affine correction folded into fc2 cannot undo;
- Q/K pruning under rotary position embeddings: the logit correction mixes dims that rotate
  at different frequencies, and no static weight can hold it (the method notes, docs/method.md,
  say which pruning would commute with the rotation). Without rotary embeddings, Eva's
  attention (separate q/v biases, an optional output norm) has no Q/K-narrow form here yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from timm.models.eva import Eva
from torch import Tensor, nn

from corp_cli.errors import UnsupportedModelError
from corp_cli.family import BlockShape, Hook, Loaded, MlpWeights
from corp_cli.families.timm_base import TimmFamily, kwargs_from_record

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


class TimmEvaFamily(TimmFamily):
    name = "timm-eva"
    modules = ("eva",)
    option_reasons = {}
    examples = ("eva02_tiny_patch14_224", "eva02_small_patch14_224")
    summary = "timm Eva (EVA-02: gated MLPs, rotary attention); MLP pruning"

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
                          head_dim=int(attn.head_dim), qk_dim=int(attn.head_dim))

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
        # EvaBlock is pre-norm: x + gamma_2 * mlp(norm2(x)) is the block output (only the MLP is pruned here)
        blk = model.blocks[i]
        if part != "mlp" or not hasattr(blk, "gamma_2"):
            raise UnsupportedModelError(f"block {i}: --sequential prunes only the MLP of pre-norm EVA blocks")
        return blk.mlp.fc2, blk, False

    def sublayer_scale(self, model: nn.Module, i: int, part: str) -> Tensor | None:
        gamma = getattr(model.blocks[i], "gamma_2", None)
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
        if getattr(model, "rope", None) is not None:
            return (f"{model.pretrained_cfg.get('architecture', type(model).__name__)} uses rotary position embeddings, "
                    "and a Q/K logit correction would mix dims that rotate at different frequencies, which no static "
                    "weight can hold; corp refuses Q/K pruning here: MLP pruning is available (--target mlp)")
        return ("Eva attention without rotary embeddings has no Q/K-narrow form in corp yet; "
                "MLP pruning is available (--target mlp)")

    # ---- the checkpoint

    def block_specs(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"mlp_hidden": self._width(blk.mlp), "qk_dim": int(blk.attn.head_dim)} for blk in model.blocks]

    def architecture(self, loaded: Loaded) -> dict[str, Any]:
        return {"family": self.name, "base_model": loaded.identity.name, "model_kwargs": dict(loaded.model_kwargs),
                "blocks": self.block_specs(loaded.model)}

    def narrow_block_for(self, model: nn.Module, i: int, spec: dict[str, Any], arch: dict[str, Any]) -> None:
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
        if len(widths) != 1:
            return None
        with torch.device("meta"):
            probe = timm.create_model(arch["base_model"], pretrained=False, **kwargs_from_record(arch["model_kwargs"]))
        (hidden,) = widths
        stock = {**arch["model_kwargs"], "mlp_ratio": hidden / int(probe.embed_dim)}
        with torch.device("meta"):  # timm computes int(dim * ratio) and may align it: check what it builds
            built = timm.create_model(arch["base_model"], pretrained=False, **kwargs_from_record(stock))
        return stock if all(self._width(b.mlp) == hidden for b in built.blocks) else None

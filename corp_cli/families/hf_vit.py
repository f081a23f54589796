"""Hugging Face ViT and DeiT image models (transformers 5.x layout).

Layer i: mlp.fc1 -> act -> mlp.fc2; attention.q_proj/k_proj/v_proj/o_proj. Images are
preprocessed as the folder's preprocessor_config.json says (resize, no crop); the pooled
feature is the final CLS state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from corp_cli.family import Batch, Loaded
from corp_cli.families.hf_common import HFFamily, NarrowQKV, classifier_flops
from corp_cli.preprocess import Preprocessing


class NarrowViTAttention(NarrowQKV):
    """Replaces ViTAttention / DeiTAttention (`layer.attention`, with its output projection)."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, qk_dim: int, scale: float, bias: bool = True, out_bias: bool = True,
        v_dim: int | None = None,
    ) -> None:
        super().__init__(num_heads, head_dim, qk_dim, scale, v_dim)
        self.q_proj = nn.Linear(dim, num_heads * qk_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_heads * qk_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_heads * self.v_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.v_dim, dim, bias=out_bias)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **_: Any) -> tuple[Tensor, None]:
        x = hidden_states
        return self.o_proj(self.mix(self.q_proj(x), self.k_proj(x), self.v_proj(x), attention_mask)), None


def image_preprocessing(folder: Path | None, config: Any) -> Preprocessing:
    """corp's Preprocessing for an HF ViT: the image processor's resize (no crop) and normalisation."""
    size = int(getattr(config, "image_size", 224))
    mean, std, resample = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 2
    source = "hf-default"
    cfg_path = folder / "preprocessor_config.json" if folder is not None else None
    if cfg_path is not None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        mean = tuple(float(x) for x in cfg.get("image_mean", mean))
        std = tuple(float(x) for x in cfg.get("image_std", std))
        sz = cfg.get("size", {})
        size = int(sz.get("height", size)) if isinstance(sz, dict) else int(sz)
        resample = int(cfg.get("resample", resample))
        source = str(cfg_path)
    interp = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}.get(resample, "bilinear")
    # ViTImageProcessor resizes straight to (size, size): that is timm's "squash" crop mode
    return Preprocessing(input_size=(3, size, size), interpolation=interp, mean=mean, std=std,
                         crop_pct=1.0, crop_mode="squash", source=source)


class HFViTFamily(HFFamily):
    name = "hf-vit"
    modality = "image"
    model_types = ("vit", "deit")
    classes = ("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification")
    examples = ("hf-model:google/vit-base-patch16-224", "hf-model:facebook/deit-small-patch16-224")
    summary = "Hugging Face ViT / DeiT image models"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.layers

    def attn_module(self, model: nn.Module, i: int) -> nn.Module:
        return self.layers(model)[i].attention

    def set_attn_module(self, model: nn.Module, i: int, new: nn.Module) -> None:
        self.layers(model)[i].attention = new

    def qk_pair(self, model: nn.Module, i: int) -> tuple[nn.Linear, nn.Linear]:
        a = self.attn_module(model, i)
        return a.q_proj, a.k_proj

    def mlp_pair(self, model: nn.Module, i: int) -> tuple[nn.Linear, nn.Linear]:
        mlp = self.layers(model)[i].mlp
        return mlp.fc1, mlp.fc2

    def set_mlp_pair(self, model: nn.Module, i: int, fc1: nn.Linear, fc2: nn.Linear) -> None:
        mlp = self.layers(model)[i].mlp
        mlp.fc1 = fc1
        mlp.fc2 = fc2

    def sublayer_modules(self, model: nn.Module, i: int, part: str) -> tuple[nn.Module, nn.Module, bool]:
        # pre-norm: attention + input enters layernorm_after; mlp + that is the layer output
        layer = self.layers(model)[i]
        return (layer.mlp.fc2, layer, False) if part == "mlp" else (self.out_proj(model, i), layer.layernorm_after, True)

    def v_proj(self, model: nn.Module, i: int) -> nn.Linear:
        return self.attn_module(model, i).v_proj

    def out_proj(self, model: nn.Module, i: int) -> nn.Linear:
        return self.attn_module(model, i).o_proj

    def narrow_attention(self, model: nn.Module, i: int, qk_dim: int, *, v_dim: int | None = None,
                         num_heads: int | None = None) -> nn.Module:
        a = self.attn_module(model, i)
        s = self.shape(model, i)
        new = NarrowViTAttention(s.dim, num_heads or s.num_heads, s.head_dim, qk_dim, self.softmax_scale(model, i),
                                 bias=a.q_proj.bias is not None, out_bias=a.o_proj.bias is not None, v_dim=v_dim)
        new.to(device=a.q_proj.weight.device, dtype=a.q_proj.weight.dtype)
        self.set_attn_module(model, i, new)
        return new

    def copy_untouched(self, old: nn.Module, new: nn.Module) -> None:
        new.v_proj.load_state_dict(old.v_proj.state_dict())
        new.o_proj.load_state_dict(old.o_proj.state_dict())

    def preprocessing(self, folder: Path | None, config: Any) -> Preprocessing:
        return image_preprocessing(folder, config)

    def pool(self, loaded: Loaded, hidden: Tensor, batch: Batch) -> Tensor:
        return hidden[:, 0]

    def forward_trunk(self, model: nn.Module, batch: Batch) -> Any:
        return model.base_model(pixel_values=batch["pixel_values"])

    def _patches(self, model: nn.Module) -> int:
        cfg = model.config
        return (int(cfg.image_size) // int(cfg.patch_size)) ** 2

    def tokens_per_item(self, model: nn.Module) -> int:
        prefix = 2 if model.config.model_type == "deit" else 1  # DeiT adds a distillation token
        return self._patches(model) + prefix

    def outer_flops(self, model: nn.Module, tokens: int) -> int:
        cfg = model.config
        embed = 2 * self._patches(model) * int(cfg.hidden_size) * int(cfg.num_channels) * int(cfg.patch_size) ** 2
        return embed + classifier_flops(model)

    def item_bytes(self, model: nn.Module) -> int:
        c, h, w = self._input_shape(model)
        return 4 * c * h * w

    def _input_shape(self, model: nn.Module) -> tuple[int, int, int]:
        cfg = model.config
        size = getattr(cfg, "image_size", 224)
        h, w = (int(s) for s in size) if isinstance(size, (list, tuple)) else (int(size), int(size))
        return int(getattr(cfg, "num_channels", 3)), h, w

    def example_batch(self, loaded: Loaded, batch_size: int, *, dtype: torch.dtype, device: torch.device) -> Batch:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, *loaded.preprocessing.input_size, generator=gen)
        return {"pixel_values": x.to(device=device, dtype=dtype)}

    def export_spec(self, loaded: Loaded, meta: dict[str, Any], folder: Path) -> Any:
        from corp_cli.export_spec import image_spec

        classifier = self.has_classifier(loaded.model)
        wrapper = ImageEncoderExport(loaded.model, classifier).eval()
        return image_spec(wrapper, self._input_shape(loaded.model), "pixel_values",
                          "logits" if classifier else "embedding",
                          "classifier logits" if classifier else "final [CLS] token state")


class ImageEncoderExport(nn.Module):
    """pixel_values -> logits for a classifier, else the final CLS state."""

    def __init__(self, model: nn.Module, classifier: bool) -> None:
        super().__init__()
        self.model = model
        self.classifier = classifier

    def forward(self, pixel_values: Tensor) -> Tensor:
        if self.classifier:
            return self.model(pixel_values=pixel_values).logits
        return self.model.base_model(pixel_values=pixel_values).last_hidden_state[:, 0]

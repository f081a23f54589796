"""The compacted HF encoder: its self-description, its checkpoint (plus tokenizer files), and reloading.

The checkpoint's architecture record carries the full `config.to_dict()` and the model
class, so a pruned model is rebuilt with `transformers` from the checkpoint alone: no
download and no original folder. Per-block MLP widths and Q/K dims are recorded like the
timm family's; blocks are narrowed, then the saved weights are loaded strictly.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corp_cli import __version__
from corp_cli.artifacts import FORMAT_VERSION, save_safetensors_atomic
from corp_cli.errors import ArtifactError
from corp_cli.hf.models import SOURCE_ATTR, SUPPORTED_CLASSES, TOKENIZER_FILES, check_config, transformers_module

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


def _tokenizer_files(model: nn.Module) -> list[Path]:
    src = getattr(model, SOURCE_ATTR, None)
    if src is None:
        return []
    return [Path(src) / n for n in TOKENIZER_FILES if (Path(src) / n).is_file()] + [
        p for p in (Path(src) / "1_Pooling" / "config.json",) if p.is_file()
    ]


def hf_architecture(model: nn.Module, base: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    from corp_cli.adapters import adapter_for

    ad = adapter_for(model)
    blocks = [{"mlp_hidden": ad.shape(i).mlp_hidden, "qk_dim": ad.shape(i).qk_dim} for i in range(len(ad.blocks))]
    config = model.config.to_dict()
    # the attention kernel choice is a runtime setting of this process, not part of the model
    config.pop("_attn_implementation_internal", None)
    files = _tokenizer_files(model)
    return {
        "family": ad.family,
        "base_model": base,
        "model_kwargs": model_kwargs,
        "blocks": blocks,
        # where the dense model was read from: evaluate's default reference (a hub id or a local folder)
        "source": base if base.startswith("hf-model:") else getattr(model, SOURCE_ATTR, None),
        "hf_class": type(model).__name__,
        "hf_config": config,
        # small and needed to embed text with the pruned model: copied beside the weights
        "tokenizer": TOKENIZER_DIR if any(f.name == "tokenizer_config.json" for f in files) else None,
    }


def save_hf_pruned(path: Path, model: nn.Module, arch: dict[str, Any], extra_meta: dict[str, Any]) -> None:
    meta = {"kind": "model", "format_version": FORMAT_VERSION, "tool_version": __version__, "architecture": arch, **extra_meta}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_safetensors_atomic(path, state, meta)
    if arch.get("tokenizer"):
        root = Path(path).parent / arch["tokenizer"]
        src = Path(getattr(model, SOURCE_ATTR))
        for f in _tokenizer_files(model):
            dest = root / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)


def build_hf(arch: dict[str, Any]) -> nn.Module:
    """The (narrowed) model described by `arch`, with uninitialised-but-allocated weights."""
    transformers = transformers_module()
    cfg_dict = dict(arch["hf_config"])
    model_type = cfg_dict.pop("model_type", None)
    cls_name = arch.get("hf_class")
    if cls_name not in SUPPORTED_CLASSES or not hasattr(transformers, cls_name):
        raise ArtifactError(f"recorded model class {cls_name!r} is not one corp builds ({', '.join(SUPPORTED_CLASSES)})")
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"recorded Hugging Face config could not be rebuilt ({str(e).splitlines()[0][:160]})") from None
    check_config(config, "pruned checkpoint")
    from transformers.initialization import no_init_weights

    # the weights are loaded right after, so random initialisation would be wasted time
    with no_init_weights():
        model = getattr(transformers, cls_name)(config)
    apply_hf_architecture(model, arch)
    return model


def apply_hf_architecture(model: nn.Module, arch: dict[str, Any]) -> nn.Module:
    from corp_cli.adapters import adapter_for
    from corp_cli.compact import narrow_mlp_linears

    ad = adapter_for(model)
    blocks = arch["blocks"]
    if len(blocks) != len(ad.blocks):
        raise ArtifactError(f"architecture lists {len(blocks)} blocks but the recorded config has {len(ad.blocks)}")
    for i, spec in enumerate(blocks):
        shape = ad.shape(i)
        if int(spec["mlp_hidden"]) != shape.mlp_hidden:
            fc1, fc2 = ad.mlp_linears(i)
            ad.set_mlp_linears(i, *narrow_mlp_linears(fc1, fc2, int(spec["mlp_hidden"])))
        if int(spec["qk_dim"]) != shape.qk_dim:
            ad.narrow_attention(i, int(spec["qk_dim"]))
    return model


def load_hf_pruned(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any], device: str | torch.device) -> nn.Module:
    model = build_hf(meta["architecture"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: weights do not match the recorded architecture ({str(e).splitlines()[0]})") from None
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    tok = meta["architecture"].get("tokenizer")
    if tok and (folder / tok).is_dir():
        # where text commands find the tokenizer (and pooling config) of this pruned model
        setattr(model, SOURCE_ATTR, str(folder / tok))
    return model.to(device).eval()


def pruned_tokenizer_dir(path: str | Path) -> Path | None:
    """The tokenizer folder saved beside a pruned text model, if any."""
    from corp_cli.compact import read_pruned

    _, meta = read_pruned(path)
    tok = meta["architecture"].get("tokenizer")
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    return folder / tok if tok and (folder / tok).is_dir() else None

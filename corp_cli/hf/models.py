"""Loading dense Hugging Face encoders from a local folder or the hub (cache), with identity and preprocessing.

A folder must hold config.json and safetensors weights. The model class is the one the
config names (`architectures[0]`) when it is a supported encoder class, else AutoModel;
both BERT and HF ViT/DeiT are built by `transformers` itself, so pretrained weights load
exactly as the library loads them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corp_cli.artifacts import sha256_file
from corp_cli.errors import InputError, UnsupportedModelError
from corp_cli.hf import HUB_PREFIX
from corp_cli.hub import offline_from_env
from corp_cli.models import LoadedModel, ModelIdentity

log = logging.getLogger(__name__)

TEXT_TYPES = ("bert",)
IMAGE_TYPES = ("vit", "deit")
SUPPORTED_TYPES = TEXT_TYPES + IMAGE_TYPES
# Classes a config may name that corp knows how to walk; anything else falls back to AutoModel.
SUPPORTED_CLASSES = (
    "BertModel", "BertForSequenceClassification",
    "ViTModel", "ViTForImageClassification",
    "DeiTModel", "DeiTForImageClassification",
)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
    "sentence_bert_config.json", "modules.json",
)
DEFAULT_MAX_LENGTH = 128
# Attribute stashed on a loaded model: the folder it came from (tokenizer files are copied from it).
SOURCE_ATTR = "_corp_source_dir"


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError(
            "Hugging Face models need the optional `transformers` dependency: pip install 'corp-cli[hf]'"
        ) from None
    # its load reports and progress bars would clutter corp's own output (stdout is for results)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@dataclass(frozen=True)
class TextPreprocessing:
    """How text becomes model inputs and how token states become one embedding."""

    tokenizer: str  # where the tokenizer was read from (provenance only)
    max_length: int
    pooling: str  # "mean" over real tokens, or "cls"
    normalize: bool

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "text", "tokenizer": self.tokenizer, "max_length": self.max_length,
                "pooling": self.pooling, "normalize": self.normalize}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TextPreprocessing:
        return TextPreprocessing(str(d["tokenizer"]), int(d["max_length"]), str(d["pooling"]), bool(d["normalize"]))


def resolve_dir(spec: str | Path) -> Path:
    """The local folder of `spec`: itself, or the hub snapshot of `hf-model:ID` (cache honoured)."""
    text = str(spec)
    if not text.startswith(HUB_PREFIX):
        p = Path(text).expanduser()
        if not (p / "config.json").is_file():
            raise InputError(f"{spec}: not a Hugging Face model folder (no config.json)")
        return p.resolve()
    repo = text[len(HUB_PREFIX):]
    if not repo:
        raise InputError("hf-model: needs a hub id, e.g. hf-model:sentence-transformers/all-MiniLM-L6-v2")
    from huggingface_hub import snapshot_download

    from corp_cli.hub import offline_requested

    try:
        with offline_from_env():
            path = snapshot_download(
                repo, allow_patterns=["*.json", "*.safetensors", "vocab.txt", "*.model", "1_Pooling/*"],
                local_files_only=offline_requested(),
            )
    except Exception as e:  # noqa: BLE001 - hub and cache failures come in many types
        raise InputError(
            f"could not fetch {repo!r} from the Hugging Face hub or cache ({type(e).__name__}); "
            "offline? pass a local model folder (config.json + model.safetensors) instead"
        ) from None
    return Path(path)


def _weights_file(folder: Path) -> Path:
    single = folder / "model.safetensors"
    if single.is_file():
        return single
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return index
    raise InputError(f"{folder}: no model.safetensors (corp reads Hugging Face weights from safetensors only)")


def _weights_digest(folder: Path) -> str:
    w = _weights_file(folder)
    if w.name.endswith(".index.json"):
        shards = sorted(set(json.loads(w.read_text())["weight_map"].values()))
        import hashlib

        h = hashlib.sha256()
        for s in shards:
            h.update(sha256_file(folder / s).encode())
        return f"sha256:{h.hexdigest()}"
    return f"sha256:{sha256_file(w)}"


def model_class(transformers: Any, config: Any) -> Any:
    names = list(getattr(config, "architectures", None) or [])
    for n in names:
        if n in SUPPORTED_CLASSES and hasattr(transformers, n):
            return getattr(transformers, n)
    return transformers.AutoModel


def check_config(config: Any, where: str) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{where}: model_type {mt!r} is not supported; corp prunes Hugging Face "
            f"{', '.join(SUPPORTED_TYPES)} encoders (Linear -> GELU -> Linear MLP, separate q/k/v projections)"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(f"{where}: decoder / cross-attention BERT is not supported; only encoders")


def _display_name(spec: str, folder: Path) -> str:
    if spec.startswith(HUB_PREFIX):
        return spec
    # The last two path parts: a bare "model" or snapshot hash says too little on its own.
    return "/".join(folder.parts[-2:])


def load_hf_dense(spec: str | Path, *, device: torch.device | str = "cpu") -> LoadedModel:
    """The dense HF model in eval mode, with an identity that statistics and masks must match."""
    transformers = transformers_module()
    folder = resolve_dir(spec)
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{folder}/config.json could not be read by transformers ({str(e).splitlines()[0][:160]})") from None
    check_config(config, str(spec))
    digest = _weights_digest(folder)
    cls = model_class(transformers, config)
    try:
        model = cls.from_pretrained(str(folder), config=config, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{spec}: transformers could not load the weights ({str(e).splitlines()[0][:160]})") from None
    setattr(model, SOURCE_ATTR, str(folder))
    num_classes = int(config.num_labels) if "For" in type(model).__name__ else 0
    ident = ModelIdentity(_display_name(str(spec), folder), digest, num_classes)
    model.to(device).eval()
    return LoadedModel(model, ident, folder, {})


def is_text_model(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in TEXT_TYPES


def text_preprocessing(folder: Path, max_length: int = DEFAULT_MAX_LENGTH) -> TextPreprocessing:
    """Pooling as the sentence-transformers folder declares it (mean + L2-normalise), else mean pooling."""
    pooling, normalize = "mean", False
    pool_cfg = folder / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text())
        pooling = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
    modules = folder / "modules.json"
    if modules.is_file():
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in json.loads(modules.read_text()))
    return TextPreprocessing(tokenizer=str(folder), max_length=max_length, pooling=pooling, normalize=normalize)


def load_tokenizer(folder: str | Path) -> Any:
    transformers = transformers_module()
    try:
        with offline_from_env():
            return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{folder}: no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None


def image_preprocessing(folder: Path | None, config: Any) -> Any:
    """corp's Preprocessing for an HF ViT: the image processor's resize (no crop) and normalisation."""
    from corp_cli.preprocess import Preprocessing

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


def load_hf_model_and_preprocessing(spec: str, device: torch.device | str) -> tuple[LoadedModel, Any]:
    loaded = load_hf_dense(spec, device=device)
    folder = Path(getattr(loaded.model, SOURCE_ATTR))
    if is_text_model(loaded.model):
        return loaded, text_preprocessing(folder)
    return loaded, image_preprocessing(folder, loaded.model.config)


def check_config_file(folder: Path) -> None:
    """model_type from config.json, checked without importing transformers (fast refusal)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}/config.json cannot be read as JSON ({type(e).__name__})") from None
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    if mt not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{folder}: model_type {mt!r} is not supported; corp prunes Hugging Face {', '.join(SUPPORTED_TYPES)} encoders"
        )
    _weights_file(folder)


def model_type_of(folder: Path) -> str | None:
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("model_type") if isinstance(cfg, dict) else None

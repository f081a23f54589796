"""What the Hugging Face `transformers` families share: folders and hub ids, loading, rebuild, export.

A folder must hold config.json and safetensors weights. The model class is the one the
config names (`architectures[0]`) when it is a supported class, else the family's base
class; models are built by `transformers` itself, so pretrained weights load exactly as
the library loads them. `transformers` is imported on first use only.

A pruned checkpoint's architecture record carries the full `config.to_dict()` and the
model class, so it is rebuilt with `transformers` from the checkpoint alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from corp_cli import engine
from corp_cli.artifacts import sha256_file
from corp_cli.checkpoints import state_dict_digest
from corp_cli.errors import ArtifactError, InputError, UnsupportedModelError
from corp_cli.family import (
    AttentionCut, Batch, BlockShape, Hook, Loaded, MlpWeights, ModelFamily, ModelIdentity, ModelOptions, Outputs,
)
from corp_cli.hub import offline_from_env, offline_requested, transformers_module

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-model:"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
    "sentence_bert_config.json", "modules.json",
)
DEFAULT_MAX_LENGTH = 128
# Elementwise activations: CORP only needs h to be per-unit, so any of these is fine;
# gated or mixing activations would break the one-unit = one-column correspondence.
ELEMENTWISE_ACTS = frozenset({
    "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python", "gelu_accurate", "gelu_10",
    "quick_gelu", "relu", "silu", "swish",
})
_NOT_HF = "its weights, classifier and preprocessing come from its own folder (config.json, model.safetensors, tokenizer / preprocessor_config.json)"


# --------------------------------------------------------------------------- folders


def is_hf_spec(spec: str) -> bool:
    if spec.startswith(HUB_PREFIX):
        return True
    p = Path(spec).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


@functools.lru_cache(maxsize=64)
def config_dict(spec: str) -> dict[str, Any] | None:
    """config.json of an HF folder or hub id (only that file is fetched), or None if `spec` is neither."""
    if spec.startswith(HUB_PREFIX):
        repo = spec[len(HUB_PREFIX):]
        if not repo:
            raise InputError("hf-model: needs a hub id, e.g. hf-model:sentence-transformers/all-MiniLM-L6-v2")
        from huggingface_hub import hf_hub_download

        try:
            with offline_from_env():
                path = Path(hf_hub_download(repo, "config.json", local_files_only=offline_requested()))
        except Exception as e:  # noqa: BLE001 - hub and cache failures come in many types
            raise InputError(
                f"could not fetch {repo!r} from the Hugging Face hub or cache ({type(e).__name__}); "
                "offline? pass a local model folder (config.json + model.safetensors) instead"
            ) from None
    else:
        folder = Path(spec).expanduser()
        if not (folder.is_dir() and (folder / "config.json").is_file()):
            return None
        path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} cannot be read as JSON ({type(e).__name__})") from None
    return cfg if isinstance(cfg, dict) else {}


def resolve_dir(spec: str) -> Path:
    """The local folder of `spec`: itself, or the hub snapshot of `hf-model:ID` (cache honoured)."""
    if not spec.startswith(HUB_PREFIX):
        p = Path(spec).expanduser()
        if not (p / "config.json").is_file():
            raise InputError(f"{spec}: not a Hugging Face model folder (no config.json)")
        return p.resolve()
    repo = spec[len(HUB_PREFIX):]
    from huggingface_hub import snapshot_download

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


def weights_file(folder: Path) -> Path:
    single = folder / "model.safetensors"
    if single.is_file():
        return single
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return index
    raise InputError(f"{folder}: no model.safetensors (corp reads Hugging Face weights from safetensors only)")


def weights_digest(folder: Path) -> str:
    w = weights_file(folder)
    if w.name.endswith(".index.json"):
        shards = sorted(set(json.loads(w.read_text())["weight_map"].values()))
        h = hashlib.sha256()
        for s in shards:
            h.update(sha256_file(folder / s).encode())
        return f"sha256:{h.hexdigest()}"
    return f"sha256:{sha256_file(w)}"


def display_name(spec: str, folder: Path) -> str:
    if spec.startswith(HUB_PREFIX):
        return spec
    # The last two path parts: a bare "model" or snapshot hash says too little on its own.
    return "/".join(folder.parts[-2:])


def is_transformers_model(model: object) -> bool:
    """A transformers PreTrainedModel (checked by class ancestry, without importing transformers)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def tokenizer_files(folder: Path | None) -> list[Path]:
    if folder is None:
        return []
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()] + [
        p for p in (folder / "1_Pooling" / "config.json",) if p.is_file()
    ]


# --------------------------------------------------------------------------- the family base


class HFFamily(ModelFamily):
    """A transformers encoder family; subclasses name the model types and walk the layer layout."""

    options = frozenset()
    option_reasons = {name: _NOT_HF for name in ("checkpoint", "num_classes", "pretrained_cfg", "preprocessing")} | {
        "model_args": "Hugging Face folders take their options from config.json"}
    model_types: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()  # model classes a config may name that corp knows how to walk
    base_class = "AutoModel"

    # ---- specs and loading

    def claim(self, spec: str) -> bool:
        if not is_hf_spec(spec):
            return False
        cfg = config_dict(spec)
        return cfg is not None and cfg.get("model_type") in self.model_types

    def near_miss(self, spec: str) -> tuple[str, str] | None:
        if not is_hf_spec(spec):
            return None
        mt = (config_dict(spec) or {}).get("model_type")
        return f"model_type {mt!r}", f"{self.name} prunes {', '.join(self.model_types)}"

    def check(self, spec: str, options: ModelOptions) -> None:
        cfg = config_dict(spec) or {}
        self.check_config(cfg, spec)
        if not spec.startswith(HUB_PREFIX):
            weights_file(Path(spec).expanduser())

    def check_config(self, cfg: dict[str, Any], where: str) -> None:
        if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
            raise UnsupportedModelError(f"{where}: decoder / cross-attention {cfg.get('model_type')} is not supported; only encoders")
        act = cfg.get("hidden_act", "gelu")
        if not isinstance(act, str) or act not in ELEMENTWISE_ACTS:
            raise UnsupportedModelError(
                f"{where}: hidden_act {act!r} is not a supported elementwise activation "
                f"(one of {', '.join(sorted(ELEMENTWISE_ACTS))})"
            )

    def model_class(self, transformers: Any, config: Any) -> Any:
        for n in list(getattr(config, "architectures", None) or []):
            if n in self.classes and hasattr(transformers, n):
                return getattr(transformers, n)
        return getattr(transformers, self.base_class)

    def load(self, spec: str, options: ModelOptions, device: torch.device) -> Loaded:
        transformers = transformers_module()
        folder = resolve_dir(spec)
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{folder}/config.json could not be read by transformers ({str(e).splitlines()[0][:160]})") from None
        self.check_config(config.to_dict(), spec)
        digest = weights_digest(folder)
        cls = self.model_class(transformers, config)
        try:
            model = cls.from_pretrained(str(folder), config=config, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{spec}: transformers could not load the weights ({str(e).splitlines()[0][:160]})") from None
        self.validate(model)
        identity = ModelIdentity(display_name(spec, folder), digest, self.num_classes(model))
        model.to(device).eval()
        return Loaded(model=model, family=self, identity=identity, preprocessing=self.preprocessing(folder, model.config),
                      model_kwargs={"num_classes": identity.num_classes}, source_dir=folder,
                      classes=self.class_names(model))

    def preprocessing(self, folder: Path | None, config: Any) -> Any:
        raise NotImplementedError

    def meta_model(self, spec: str, options: ModelOptions) -> nn.Module | None:
        """Built from config.json on the meta device (a hub id would need its files first: loaded for real)."""
        if spec.startswith(HUB_PREFIX):
            return None
        transformers = transformers_module()
        config = transformers.AutoConfig.from_pretrained(str(resolve_dir(spec)))
        with torch.device("meta"):
            return self.model_class(transformers, config)(config)

    def validate(self, model: nn.Module) -> None:
        try:  # a layout from another transformers major version fails here, not mid-run
            self.mlp_pair(model, 0)
            self.qk_pair(model, 0)
        except (AttributeError, IndexError, TypeError):
            import transformers

            raise UnsupportedModelError(
                f"{type(model).__name__}: its layers do not have the layout corp expects (transformers "
                f"{transformers.__version__} is installed; corp supports the transformers 5.x layout)"
            ) from None

    def num_classes(self, model: nn.Module) -> int:
        return int(model.config.num_labels) if self.has_classifier(model) else 0

    def class_names(self, model: nn.Module) -> list[str] | None:
        if not self.has_classifier(model):
            return None
        labels = getattr(model.config, "id2label", None) or {}
        return [str(labels[i]) for i in sorted(labels)] if labels else None

    def has_classifier(self, model: nn.Module) -> bool:
        return "For" in type(model).__name__ and hasattr(model, "classifier")

    def owns(self, model: nn.Module) -> bool:
        return is_transformers_model(model) and getattr(model.config, "model_type", None) in self.model_types

    def adopt(self, model: nn.Module, model_kwargs: dict[str, Any] | None = None) -> Loaded:
        if model_kwargs:
            raise InputError("Hugging Face models carry their options in model.config; model_kwargs does not apply")
        self.check_config(model.config.to_dict(), type(model).__name__)
        self.validate(model)
        src = getattr(model.config, "_name_or_path", "") or ""
        folder = Path(src) if src and Path(src).is_dir() else None
        identity = ModelIdentity(src or type(model).__name__, f"in-memory:{state_dict_digest(model)}", self.num_classes(model))
        return Loaded(model=model, family=self, identity=identity, preprocessing=self.preprocessing(folder, model.config),
                      model_kwargs={"num_classes": identity.num_classes}, source_dir=folder,
                      classes=self.class_names(model))

    # ---- layer layout (subclasses)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def attn_module(self, model: nn.Module, i: int) -> nn.Module:
        """The attention module a narrow one replaces."""
        raise NotImplementedError

    def set_attn_module(self, model: nn.Module, i: int, new: nn.Module) -> None:
        raise NotImplementedError

    def qk_pair(self, model: nn.Module, i: int) -> tuple[nn.Linear, nn.Linear]:
        raise NotImplementedError

    def mlp_pair(self, model: nn.Module, i: int) -> tuple[nn.Linear, nn.Linear]:
        raise NotImplementedError

    def set_mlp_pair(self, model: nn.Module, i: int, fc1: nn.Linear, fc2: nn.Linear) -> None:
        raise NotImplementedError

    def set_mlp_width(self, model: nn.Module, i: int, width: int) -> None:
        """Install empty MLP modules of `width` hidden units in block i (a rebuild; the weights follow)."""
        fc1, fc2 = self.mlp_pair(model, i)
        self.set_mlp_pair(model, i, nn.Linear(fc1.in_features, width, bias=fc1.bias is not None),
                          nn.Linear(width, fc2.out_features, bias=fc2.bias is not None))

    def v_proj(self, model: nn.Module, i: int) -> nn.Linear:
        """The value projection (H*d rows)."""
        raise NotImplementedError

    def out_proj(self, model: nn.Module, i: int) -> nn.Linear:
        """The attention output projection, whose input is o (the heads' outputs, concatenated)."""
        raise NotImplementedError

    def narrow_attention(self, model: nn.Module, i: int, qk_dim: int, *, v_dim: int | None = None,
                         num_heads: int | None = None) -> nn.Module:
        """Empty narrow modules of block i's widths (Q/K dims, and value dims / heads when given), installed in place.

        The output projection is replaced too when its input width changes.
        """
        raise NotImplementedError

    def copy_untouched(self, old: nn.Module, new: nn.Module) -> None:
        """Copy the parts Q/K pruning leaves as they were (value and output projections)."""
        raise NotImplementedError

    # ---- blocks

    def num_blocks(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def shape(self, model: nn.Module, i: int) -> BlockShape:
        fc1, _ = self.mlp_pair(model, i)
        attn = self.attn_module(model, i)
        heads = int(getattr(attn, "num_heads", None) or model.config.num_attention_heads)
        head_dim = int(getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size"))
        q, _ = self.qk_pair(model, i)
        return BlockShape(dim=fc1.in_features, mlp_hidden=fc1.out_features, num_heads=heads,
                          head_dim=head_dim, qk_dim=q.out_features // heads, v_dim=int(getattr(attn, "v_dim", head_dim)))

    def block_module(self, model: nn.Module, i: int) -> nn.Module:
        return self.layers(model)[i]

    def forward_trunk(self, model: nn.Module, batch: Batch) -> Any:
        return model.base_model(**batch)  # the classifier head is not pruned: run the encoder only

    def mlp_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor], None]) -> list[Hook]:
        _, fc2 = self.mlp_pair(model, i)
        return [fc2.register_forward_pre_hook(lambda _m, args: emit(args[0]))]

    def mlp_weights(self, model: nn.Module, i: int) -> MlpWeights:
        fc1, fc2 = self.mlp_pair(model, i)
        return MlpWeights([fc1.weight.detach()], fc2.weight.detach(), _bias(fc2))

    def narrow_mlp(self, model: nn.Module, i: int, keep: Tensor, out_weight: Tensor, out_bias: Tensor | None) -> None:
        fc1, fc2 = self.mlp_pair(model, i)
        kw = {"device": fc1.weight.device, "dtype": fc1.weight.dtype}
        new1 = nn.Linear(fc1.in_features, int(keep.numel()), bias=fc1.bias is not None, **kw)
        new2 = nn.Linear(int(keep.numel()), fc2.out_features, bias=fc2.bias is not None, **kw)
        keep = keep.to(fc1.weight.device)
        with torch.no_grad():
            new1.weight.copy_(fc1.weight[keep])
            if fc1.bias is not None:
                new1.bias.copy_(fc1.bias[keep])
            new2.weight.copy_(out_weight)
            if out_bias is not None:
                new2.bias.copy_(out_bias)
        self.set_mlp_pair(model, i, new1, new2)

    def qk_refusal(self, model: nn.Module, i: int) -> str | None:
        if getattr(self.attn_module(model, i), "qk_dim", None) is not None:
            return f"block {i}: attention is already Q/K-pruned; prune the dense model instead"
        return None

    def qk_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor, Tensor], None]) -> list[Hook]:
        """The q and k projections' outputs (B, N, H*d), reshaped to (B, H, N, d) (fewer key heads under GQA)."""
        q_lin, k_lin = self.qk_pair(model, i)
        d = self.shape(model, i).head_dim
        pending: list[Tensor] = []

        def split(out: Tensor) -> Tensor:
            b, n, w = out.shape
            return out.reshape(b, n, w // d, d).transpose(1, 2)

        def on_q(_m: nn.Module, _a: Any, out: Tensor) -> None:
            pending.append(split(out))

        def on_k(_m: nn.Module, _a: Any, out: Tensor) -> Tensor | None:
            q = pending.pop()
            replaced = emit(q, split(out))
            if replaced is None:
                return None
            q.copy_(replaced[0])  # a view of the q projection's output: replaced where it lies
            b, n, w = out.shape
            return replaced[1].transpose(1, 2).reshape(b, n, w)

        return [q_lin.register_forward_hook(on_q), k_lin.register_forward_hook(on_k)]

    def qk_weights(self, model: nn.Module, i: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        q, k = self.qk_pair(model, i)
        return q.weight.detach(), _bias(q), k.weight.detach(), _bias(k)

    def softmax_scale(self, model: nn.Module, i: int) -> float:
        attn = self.attn_module(model, i)
        return float(getattr(attn, "scale", None) or getattr(attn, "scaling"))

    def narrow_qk(self, model: nn.Module, i: int, keep: Tensor, m: Tensor, *, balanced: bool) -> None:
        wq, bq, wk, bk = self.qk_weights(model, i)
        wqn, bqn, wkn, bkn = engine.fold_qk(wq, bq, wk, bk, keep, m, balanced=balanced)
        old = self.attn_module(model, i)
        new = self.narrow_attention(model, i, keep.shape[1])
        q_new, k_new = self.qk_pair(model, i)
        with torch.no_grad():
            q_new.weight.copy_(wqn)
            k_new.weight.copy_(wkn)
            if bqn is not None:
                q_new.bias.copy_(bqn)
                k_new.bias.copy_(bkn)
            self.copy_untouched(old, new)

    # V/O dims and whole heads

    def vo_refusal(self, model: nn.Module, i: int) -> str | None:
        if getattr(self.attn_module(model, i), "qk_dim", None) is not None:
            return f"block {i}: attention is already pruned; prune the dense model instead"
        if self.out_proj(model, i).bias is None:
            return f"block {i}: the attention output projection has no bias to hold the compensation's constant term"
        return None

    def vo_hook(self, model: nn.Module, i: int, emit: Callable[[Tensor], Tensor | None]) -> list[Hook]:
        return [self.out_proj(model, i).register_forward_pre_hook(lambda _m, args: emit(args[0]))]

    def vo_weights(self, model: nn.Module, i: int) -> MlpWeights:
        v, o = self.v_proj(model, i), self.out_proj(model, i)
        return MlpWeights([v.weight.detach()], o.weight.detach(), _bias(o))

    def install_attention(self, model: nn.Module, i: int, cut: AttentionCut) -> None:
        d = self.shape(model, i).head_dim
        wq, bq, wk, bk = self.qk_weights(model, i)
        v_old = self.v_proj(model, i)
        heads = cut.heads.to(wq.device)
        rows = engine.head_dims(heads, d)
        wq, wk = wq[rows], wk[rows]
        bq, bk = (bq[rows] if bq is not None else None), (bk[rows] if bk is not None else None)
        if cut.qk_keep is not None:
            assert cut.qk_m is not None
            wq, bq, wk, bk = engine.fold_qk(wq, bq, wk, bk, cut.qk_keep, cut.qk_m, balanced=cut.balanced)
        v_rows = engine.vo_kept_dims(heads, cut.v_keep, d)
        wv, bv = v_old.weight.detach()[v_rows], (v_old.bias.detach()[v_rows] if v_old.bias is not None else None)
        self.narrow_attention(model, i, int(cut.qk_keep.shape[1]) if cut.qk_keep is not None else d,
                              v_dim=int(cut.v_keep.shape[1]) if cut.v_keep is not None else d, num_heads=int(heads.numel()))
        q_new, k_new = self.qk_pair(model, i)
        v_new, o_new = self.v_proj(model, i), self.out_proj(model, i)
        with torch.no_grad():
            for lin, w, b in ((q_new, wq, bq), (k_new, wk, bk), (v_new, wv, bv), (o_new, cut.out_weight, cut.out_bias)):
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)

    # ---- the checkpoint

    def architecture(self, loaded: Loaded) -> dict[str, Any]:
        model = loaded.model
        blocks = [self._block_spec(model, i) for i in range(self.num_blocks(model))]
        config = model.config.to_dict()
        # the attention kernel choice is a runtime setting of this process, not part of the model
        config.pop("_attn_implementation_internal", None)
        base = loaded.identity.name
        files = tokenizer_files(loaded.source_dir)
        return {
            "family": self.name,
            "base_model": base,
            "model_kwargs": dict(loaded.model_kwargs),
            "blocks": blocks,
            # where the dense model was read from: evaluate's default reference (a hub id or a local folder)
            "source": base if base.startswith(HUB_PREFIX) else (str(loaded.source_dir) if loaded.source_dir else None),
            "hf_class": type(model).__name__,
            "hf_config": config,
            # small and needed to embed text with the pruned model: copied beside the weights
            "tokenizer": TOKENIZER_DIR if any(f.name == "tokenizer_config.json" for f in files) else None,
        }

    def _block_spec(self, model: nn.Module, i: int) -> dict[str, Any]:
        s = self.shape(model, i)
        spec: dict[str, Any] = {"mlp_hidden": s.mlp_hidden, "qk_dim": s.qk_dim}
        # V/O widths and head counts only where pruned, so other records stay as they were
        if s.v_dim != s.head_dim:
            spec["v_dim"] = s.v_dim
        if s.num_heads != int(model.config.num_attention_heads):
            spec["num_heads"] = s.num_heads
        return spec

    def write_extras(self, loaded: Loaded, arch: dict[str, Any], folder: Path) -> None:
        if not arch.get("tokenizer") or loaded.source_dir is None:
            return
        root = folder / arch["tokenizer"]
        for f in tokenizer_files(loaded.source_dir):
            dest = root / f.relative_to(loaded.source_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)

    def build(self, arch: dict[str, Any]) -> nn.Module:
        transformers = transformers_module()
        cfg_dict = dict(arch["hf_config"])
        model_type = cfg_dict.pop("model_type", None)
        cls_name = arch.get("hf_class")
        if cls_name not in self.classes or not hasattr(transformers, cls_name):
            raise ArtifactError(f"recorded model class {cls_name!r} is not one corp builds ({', '.join(self.classes)})")
        try:
            config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"recorded Hugging Face config could not be rebuilt ({str(e).splitlines()[0][:160]})") from None
        if config.model_type not in self.model_types:
            raise ArtifactError(f"recorded config has model_type {config.model_type!r}, not one of {self.model_types}")
        self.check_config(config.to_dict(), "pruned checkpoint")
        from transformers.initialization import no_init_weights

        # the weights are loaded right after, so random initialisation would be wasted time
        with no_init_weights():
            model = getattr(transformers, cls_name)(config)
        blocks = arch["blocks"]
        if len(blocks) != self.num_blocks(model):
            raise ArtifactError(f"architecture lists {len(blocks)} blocks but the recorded config has {self.num_blocks(model)}")
        for i, spec in enumerate(blocks):
            shape = self.shape(model, i)
            if int(spec["mlp_hidden"]) != shape.mlp_hidden:
                self.set_mlp_width(model, i, int(spec["mlp_hidden"]))
            qk, v = int(spec["qk_dim"]), int(spec.get("v_dim", shape.head_dim))
            heads = int(spec.get("num_heads", shape.num_heads))
            if not (0 < heads <= shape.num_heads and 0 < v <= shape.head_dim and 0 < qk <= shape.head_dim):
                raise ArtifactError(f"block {i} records widths (heads {heads}, qk {qk}, v {v}) outside the recorded config's")
            if (qk, v, heads) != (shape.qk_dim, shape.head_dim, shape.num_heads):
                self.narrow_attention(model, i, qk, v_dim=v, num_heads=heads)
        return model

    def reloaded(self, model: nn.Module, meta: dict[str, Any], folder: Path) -> Loaded:
        loaded = super().reloaded(model, meta, folder)
        tok = meta["architecture"].get("tokenizer")
        tok_dir = folder / tok if tok and (folder / tok).is_dir() else None
        if loaded.modality == "text":
            from dataclasses import replace

            loaded.preprocessing = replace(loaded.preprocessing, tokenizer_dir=tok_dir)
        loaded.source_dir = tok_dir
        loaded.classes = loaded.classes or self.class_names(model)
        return loaded

    # ---- outputs

    def outputs(self, loaded: Loaded, batch: Batch) -> Outputs:
        model = loaded.model
        captured: list[Tensor] = []
        if self.has_classifier(model):
            # one pass: the head's logits, and the encoder's final states caught on the way
            handle = model.base_model.register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
            try:
                logits = model(**batch).logits
            finally:
                handle.remove()
            hidden = captured[0]
        else:
            logits = None
            hidden = model.base_model(**batch).last_hidden_state
        return Outputs(logits=logits, features=self.pool(loaded, hidden, batch))

    def pool(self, loaded: Loaded, hidden: Tensor, batch: Batch) -> Tensor:
        raise NotImplementedError


def _bias(lin: nn.Linear) -> Tensor | None:
    return lin.bias.detach() if lin.bias is not None else None


def linear_rows(lin: nn.Linear, rows: Tensor) -> nn.Linear:
    """A new Linear holding the given output rows of `lin` (weights and bias), on its device and dtype."""
    new = nn.Linear(lin.in_features, int(rows.numel()), bias=lin.bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    rows = rows.to(lin.weight.device)
    with torch.no_grad():
        new.weight.copy_(lin.weight[rows])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[rows])
    return new


# --------------------------------------------------------------------------- Q/K-narrow attention


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """transformers hands over a boolean (True = attend) or additive float mask, broadcastable to (B, H, N, N)."""
    from corp_cli.attention import sdpa_mixed_width

    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return sdpa_mixed_width(q, k, v, attn_mask=mask, is_causal=False, scale=scale)


class NarrowQKV(nn.Module):
    """Queries and keys keep `qk_dim` dims per head, values `v_dim`, over `num_heads` heads; the softmax scale is the ORIGINAL one.

    The compensated logits reconstruct the dense ones, so they must not be re-normalised
    for the smaller width. `head_dim` is the dense per-head width. Subclasses name the
    projections as the modules they replace do.
    """

    def __init__(self, num_heads: int, head_dim: int, qk_dim: int, scale: float, v_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qk_dim = qk_dim
        self.v_dim = v_dim or head_dim
        self.scale = scale

    def _heads(self, x: Tensor, width: int) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, width).transpose(1, 2)

    def mix(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        b, n = q.shape[0], q.shape[1]
        out = attend(self._heads(q, self.qk_dim), self._heads(k, self.qk_dim), self._heads(v, self.v_dim), mask, self.scale)
        return out.transpose(1, 2).reshape(b, n, self.num_heads * self.v_dim)


# --------------------------------------------------------------------------- counting and inputs


def classifier_flops(model: nn.Module) -> int:
    return sum(2 * m.in_features * m.out_features for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.split(".")[0] in ("classifier", "cls_classifier", "distillation_classifier"))

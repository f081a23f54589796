"""What every timm image family shares: names, loading, preprocessing, rebuild, FLOPs of the stem, export.

A timm family subclasses TimmFamily and says which timm modules its models come from,
how its blocks are laid out, and how narrower blocks are installed.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from corp_cli.artifacts import sha256_file
from corp_cli.checkpoints import first_line, load_strict, read_checkpoint, state_dict_digest
from corp_cli.errors import ArtifactError, InputError, UnsupportedModelError
from corp_cli.family import Batch, Loaded, ModelFamily, ModelIdentity, ModelOptions, Outputs
from corp_cli.hub import offline_from_env, offline_requested
from corp_cli.preprocess import resolve_preprocessing

log = logging.getLogger(__name__)



def qk_norm_hooks(attn: nn.Module, emit: Any) -> list[Any]:
    """Hooks on attn.q_norm / attn.k_norm (Identity unless q/k norms) calling emit(q, k) with their outputs, (B, H, N, d).

    When emit returns (q', k'), q' is copied where q lies (it is already computed) and k' replaces k.
    """
    pending: list[Tensor] = []

    def on_q(_m: nn.Module, _a: Any, out: Tensor) -> None:
        pending.append(out)

    def on_k(_m: nn.Module, _a: Any, out: Tensor) -> Tensor | None:
        q = pending.pop()
        replaced = emit(q, out)
        if replaced is None:
            return None
        q.copy_(replaced[0])
        return replaced[1]

    return [attn.q_norm.register_forward_hook(on_q), attn.k_norm.register_forward_hook(on_k)]


class TimmFamily(ModelFamily):
    modality = "image"
    options = frozenset({"checkpoint", "num_classes", "pretrained_cfg", "preprocessing", "model_args"})
    # timm modules whose models this family prunes (timm.models.is_model_in_modules)
    modules: tuple[str, ...] = ()

    # ---- names

    def claim(self, spec: str) -> bool:
        arch = spec.split(".", 1)[0]
        if "/" in arch or arch.startswith((".", "~")):
            return False
        return bool(timm.is_model(arch)) and bool(timm.models.is_model_in_modules(arch, list(self.modules)))

    def near_miss(self, spec: str) -> tuple[str, str] | None:
        arch = spec.split(".", 1)[0]
        if "/" in arch or not timm.is_model(arch):
            return None
        from timm.models._registry import _model_to_module

        module = _model_to_module.get(arch, "?")
        return f"timm's {arch} (timm.models.{module})", f"{self.name} prunes timm.models.{{{','.join(self.modules)}}} models"

    def _names(self) -> list[str]:
        return _names_in(self.modules)

    def candidates(self, spec: str) -> list[str]:
        """The rule for short names: the prefix's patch-16 224-px model, else its only 224-px model, else all of them."""
        if "/" in spec or "." in spec:
            return []
        prefix = re.escape(spec)
        plain = [n for n in self._names() if re.fullmatch(rf"{prefix}_(?:.*_)?patch\d+_224", n)]
        direct = [n for n in plain if re.fullmatch(rf"{prefix}_patch\d+_224", n)]
        if f"{spec}_patch16_224" in direct:
            return [f"{spec}_patch16_224"]
        return direct if len(direct) == 1 else plain

    def close_matches(self, spec: str) -> list[str]:
        return difflib.get_close_matches(spec.split(".", 1)[0], self._names(), n=3, cutoff=0.6)

    # ---- loading

    def check(self, spec: str, options: ModelOptions) -> None:
        if options.num_classes is not None and options.num_classes < 0:
            raise InputError(f"--num-classes must be >= 0, got {options.num_classes}")
        arch = spec.split(".", 1)[0]
        self.check_model_args(arch, options.model_args, "--model-arg")
        with torch.device("meta"):  # shapes only: refuse unsupported layouts before any weight is read
            probe = self._create(arch, pretrained=False, **self._kwargs(options))
        self.validate(probe)
        size = options.preprocessing.get("input_size")
        if size is not None:
            self._check_input_size(probe, tuple(size), "--input-size")

    def validate(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError when `model` has a layout this family cannot prune."""

    def meta_model(self, spec: str, options: ModelOptions) -> nn.Module | None:
        """Built on the meta device with the options a load would use (a checkpoint's header is read, not its tensors)."""
        arch = spec.split(".", 1)[0]
        kwargs = self._kwargs(options)
        if options.checkpoint is not None:
            header = _safetensors_header(options.checkpoint)
            if header is None:
                return None  # a .pth file: its head size is only known after reading it
            meta, shapes = header
            kwargs = self._kwargs(options, _recorded_kwargs(meta, options.checkpoint))
            if "num_classes" not in kwargs:
                head = shapes.get("head.weight")
                if "num_classes" in meta:
                    kwargs["num_classes"] = int(meta["num_classes"])
                elif head is not None:
                    kwargs["num_classes"] = int(head[0])
                elif not any(k.startswith("head.") for k in shapes):
                    kwargs["num_classes"] = 0
        with torch.device("meta"):
            return self._create(arch, pretrained=False, **kwargs)

    def item_bytes(self, model: nn.Module) -> int:
        c, h, w = self.input_shape(model)
        return 4 * c * h * w

    def check_model_args(self, arch: str, args: Any, where: str) -> None:
        """Constructor options must be ones the model's class takes; the error lists those it does."""
        if not args:
            return
        accepted = _constructor_options(arch)
        unknown = sorted(set(args) - accepted)
        if unknown:
            raise InputError(f"{where} {', '.join(unknown)}: timm's {arch} takes no such option; it takes "
                             f"{', '.join(sorted(accepted))}")

    def _kwargs(self, options: ModelOptions, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
        """Constructor options: a checkpoint's recorded model_kwargs < --model-arg < --num-classes."""
        kwargs = {**(recorded or {}), **kwargs_from_record(dict(options.model_args))}
        if options.num_classes is not None:
            if "num_classes" in options.model_args:
                raise InputError("give --num-classes or --model-arg num_classes=N, not both")
            kwargs["num_classes"] = options.num_classes
        return kwargs

    def _check_input_size(self, model: nn.Module, size: tuple[int, ...], source: str) -> None:
        """A fixed-size model refuses other inputs: say which size it is built for and how to change that."""
        if getattr(model, "dynamic_img_size", False):
            return
        h, w = (int(s) for s in model.patch_embed.img_size)
        if tuple(size[-2:]) != (h, w):
            raise InputError(
                f"{source} gives {size[-2]}x{size[-1]} px but {_arch_name(model, strict=False)} is built for {h}x{w}; "
                f"build it for that size with --model-arg img_size={size[-2]} (or drop {source})"
            )

    def _create(self, arch: str, **kwargs: Any) -> nn.Module:
        try:
            return timm.create_model(arch, **kwargs)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"timm could not build {arch!r} with {kwargs}: {first_line(e)}") from None

    def load(self, spec: str, options: ModelOptions, device: torch.device) -> Loaded:
        """num_classes precedence: explicit > checkpoint metadata > the checkpoint's head shape > timm's default."""
        arch = spec.split(".", 1)[0]
        kwargs = self._kwargs(options)
        meta: dict[str, str] = {}
        if options.checkpoint is not None:
            sd, meta = read_checkpoint(options.checkpoint)
            recorded = _recorded_kwargs(meta, options.checkpoint)
            self.check_model_args(arch, recorded, f"checkpoint {options.checkpoint} metadata model_kwargs:")
            kwargs = self._kwargs(options, recorded)
            if "num_classes" not in kwargs and "num_classes" in meta:
                try:
                    kwargs["num_classes"] = int(meta["num_classes"])
                except ValueError:
                    raise InputError(f"checkpoint {options.checkpoint}: metadata num_classes={meta['num_classes']!r} "
                                     "is not an integer") from None
            if "num_classes" not in kwargs and (n := self._head_classes(sd)) is not None:
                kwargs["num_classes"] = n
            model = self._create(arch, pretrained=False, **kwargs)
            sd = _resampled_pos_embed(model, sd, options.checkpoint)
            load_strict(model, sd, options.checkpoint, "check the model name, --num-classes and --model-arg")
            identity = ModelIdentity(arch, f"sha256:{sha256_file(options.checkpoint)}", _num_classes(model),
                                     _args(kwargs))
        else:
            try:
                with offline_from_env():
                    model = timm.create_model(spec, pretrained=True, **kwargs)
            except Exception as e:  # noqa: BLE001 - hub/cache failures come in many types
                why = ("offline: HF_HUB_OFFLINE is set and they are not in the local Hugging Face cache;"
                       if offline_requested() else "offline?")
                raise InputError(
                    f"could not load pretrained weights for {spec!r} ({first_line(e, 120)}); {why} "
                    "pass --checkpoint FILE (.safetensors or .pth) or put the weights in the Hugging Face cache"
                ) from None
            tag = getattr(model, "pretrained_cfg", {}).get("tag") or "default"
            identity = ModelIdentity(arch, f"timm-pretrained:{arch}.{tag}", _num_classes(model), _args(kwargs))
        self.validate(model)
        prep = resolve_preprocessing(model, checkpoint_meta=meta, pretrained_cfg_path=options.pretrained_cfg,
                                     overrides=options.preprocessing)
        prep = self._follow_img_size(model, prep, explicit=options.preprocessing.get("input_size") is not None)
        from corp_cli.labels import parse_classes

        model.to(device).eval()
        return Loaded(model=model, family=self, identity=identity, preprocessing=prep, checkpoint_meta=meta,
                      classes=parse_classes(meta.get("classes")),
                      model_kwargs={"num_classes": identity.num_classes, **identity.model_args})

    def _follow_img_size(self, model: nn.Module, prep: Any, *, explicit: bool) -> Any:
        """The input size follows the size the model is built for, unless --input-size says otherwise."""
        if getattr(model, "dynamic_img_size", False):
            return prep
        h, w = (int(s) for s in model.patch_embed.img_size)
        if tuple(prep.input_size[1:]) == (h, w):
            return prep
        if explicit or "pretrained-cfg" in prep.source or "checkpoint-metadata" in prep.source:
            self._check_input_size(model, tuple(prep.input_size), f"the preprocessing ({prep.source})")
        import dataclasses

        return dataclasses.replace(prep, input_size=(prep.input_size[0], h, w), source=f"{prep.source}+model-img-size")

    def _head_classes(self, sd: dict[str, Tensor]) -> int | None:
        """The classifier size a checkpoint's head implies: its rows, or 0 for a backbone saved without one."""
        w = sd.get("head.weight")
        if w is not None and w.ndim == 2:
            return int(w.shape[0])
        return 0 if not any(k.startswith("head.") for k in sd) else None

    def adopt(self, model: nn.Module, model_kwargs: dict[str, Any] | None = None) -> Loaded:
        """An in-memory timm model: rebuilt later from its architecture name and constructor options.

        timm models do not record the options they were built with; the common ones are read
        back off the module (see infer_kwargs), or given as `model_kwargs`. Either way the
        rebuild is tried on the meta device now, so a model corp could not reload is refused here.
        """
        self.validate(model)
        arch = _arch_name(model)
        kwargs = dict(model_kwargs) if model_kwargs is not None else self._inferred_kwargs(model, arch)
        self._check_rebuild(model, arch, kwargs)
        identity = ModelIdentity(arch, f"in-memory:{state_dict_digest(model)}", _num_classes(model))
        return Loaded(model=model, family=self, identity=identity, preprocessing=resolve_preprocessing(model),
                      model_kwargs=kwargs)

    def infer_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """Constructor options read back off a built model (subclasses add their own)."""
        found: dict[str, Any] = {"num_classes": _num_classes(model), "depth": self.num_blocks(model)}
        pe = getattr(model, "patch_embed", None)
        if pe is not None and getattr(pe, "img_size", None) is not None:
            found["img_size"] = tuple(int(s) for s in pe.img_size)
        return found

    def _inferred_kwargs(self, model: nn.Module, arch: str) -> dict[str, Any]:
        with torch.device("meta"):
            default = self._create(arch, pretrained=False)
        theirs = self.infer_kwargs(default)
        # only what differs from the architecture's defaults, so records stay minimal
        return {k: v for k, v in self.infer_kwargs(model).items() if theirs.get(k) != v}

    def _check_rebuild(self, model: nn.Module, arch: str, kwargs: dict[str, Any]) -> None:
        record = {"family": self.name, "base_model": arch, "model_kwargs": kwargs, "blocks": self.block_specs(model)}
        with torch.device("meta"):
            probe = self.build(record)
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
        if own != theirs:
            diff = sorted(set(own.items()) ^ set(theirs.items()))[:2]
            raise UnsupportedModelError(
                f"timm.create_model({arch!r}, **{kwargs}) does not rebuild this model (differs at {diff}); pass the "
                "options it was built with: corp_cli.adopt(model, model_kwargs={...})"
            )

    def block_specs(self, model: nn.Module) -> list[dict[str, Any]]:
        """Per-block widths as the checkpoint records them."""
        raise NotImplementedError

    # ---- rebuild

    def build(self, arch: dict[str, Any]) -> nn.Module:
        model = self._create(arch["base_model"], pretrained=False, **kwargs_from_record(arch["model_kwargs"]))
        blocks = arch["blocks"]
        if len(blocks) != self.num_blocks(model):
            raise ArtifactError(f"architecture lists {len(blocks)} blocks but {arch['base_model']} has {self.num_blocks(model)}")
        for i, spec in enumerate(blocks):
            self.narrow_block_for(model, i, spec, arch)
        return model

    def narrow_block_for(self, model: nn.Module, i: int, spec: dict[str, Any], arch: dict[str, Any]) -> None:
        """Replace block i's modules with empty ones of the recorded widths."""
        raise NotImplementedError

    # ---- counting, outputs, export

    def tokens_per_item(self, model: nn.Module) -> int:
        return int(model.patch_embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))

    def outer_flops(self, model: nn.Module, tokens: int) -> int:
        pe = model.patch_embed.proj
        n_patches = int(model.patch_embed.num_patches)
        embed = 2 * n_patches * pe.out_channels * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1]
        head = 0
        for name in ("head", "head_dist"):
            lin = getattr(model, name, None)
            if isinstance(lin, nn.Linear):
                head += 2 * lin.in_features * lin.out_features
        return embed + head

    def has_classifier(self, model: nn.Module) -> bool:
        return _num_classes(model) > 0

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        return model(batch["pixel_values"])

    def forward_trunk(self, model: nn.Module, batch: Batch) -> Any:
        return model.forward_features(batch["pixel_values"])  # the classifier head is not pruned: skip it

    def outputs(self, loaded: Loaded, batch: Batch) -> Outputs:
        model = loaded.model
        feats = model.forward_features(batch["pixel_values"])
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats) if self.has_classifier(model) else None
        return Outputs(logits=logits, features=pooled)

    def input_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) the model accepts: timm ViTs check the patch-embed size strictly."""
        pe = model.patch_embed
        h, w = (int(s) for s in pe.img_size)
        return int(pe.proj.in_channels), h, w

    def example_batch(self, loaded: Loaded, batch_size: int, *, dtype: torch.dtype, device: torch.device) -> Batch:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, *loaded.preprocessing.input_size, generator=gen)
        return {"pixel_values": x.to(device=device, dtype=dtype)}

    def export_spec(self, loaded: Loaded, meta: dict[str, Any], folder: Path) -> Any:
        from corp_cli.export_spec import image_spec

        model = loaded.model
        if self.has_classifier(model):
            return image_spec(model, self.input_shape(model), "image", "logits", "classifier logits")
        return image_spec(_PooledFeatures(model), self.input_shape(model), "image", "features",
                          "pooled pre-logits feature (the model has no classifier)")


class _PooledFeatures(nn.Module):
    """A headless timm model's pooled feature, as its forward_head(pre_logits=True) gives it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(image), pre_logits=True)


@functools.lru_cache(maxsize=None)
def _names_in(modules: tuple[str, ...]) -> list[str]:
    return [n for n in timm.list_models() if timm.models.is_model_in_modules(n, list(modules))]


def _num_classes(model: nn.Module) -> int:
    return int(getattr(model, "num_classes", 0))


def _arch_name(model: nn.Module, strict: bool = True) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not strict:
        return str(arch or type(model).__name__)
    if not arch or not timm.is_model(arch):
        raise UnsupportedModelError(f"{type(model).__name__}: not built by timm.create_model (no pretrained_cfg "
                                    "architecture), so corp cannot rebuild it")
    return str(arch)


def kwargs_from_record(kwargs: dict[str, Any]) -> dict[str, Any]:
    # JSON turns tuples into lists; timm wants tuples for sizes
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The constructor options an identity records: everything but the head size (recorded on its own)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k != "num_classes"}


def _recorded_kwargs(meta: dict[str, str], path: Any) -> dict[str, Any]:
    raw = meta.get("model_kwargs")
    if raw is None:
        return {}
    import json

    try:
        kwargs = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"checkpoint {path}: metadata model_kwargs is not JSON") from None
    if not isinstance(kwargs, dict):
        raise InputError(f"checkpoint {path}: metadata model_kwargs must be a JSON object")
    return kwargs_from_record(kwargs)


@functools.lru_cache(maxsize=None)
def _constructor_options(arch: str) -> frozenset[str]:
    """What timm.create_model(arch, **kwargs) passes on to the model class: its constructor's parameters."""
    import inspect

    with torch.device("meta"):
        cls = type(timm.create_model(arch, pretrained=False))
    params = inspect.signature(cls.__init__).parameters.values()
    return frozenset(p.name for p in params if p.name not in ("self", "device", "dtype")
                     and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def _resampled_pos_embed(model: nn.Module, sd: dict[str, Tensor], path: Any) -> dict[str, Tensor]:
    """A checkpoint's absolute position embedding at another grid size, resampled as timm does for pretrained weights."""
    theirs, own = sd.get("pos_embed"), getattr(model, "pos_embed", None)
    if theirs is None or own is None or tuple(theirs.shape) == tuple(own.shape) or theirs.ndim != 3:
        return sd
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    n = theirs.shape[1] - prefix
    side = int(round(n ** 0.5))
    if side * side != n or theirs.shape[2] != own.shape[2]:
        return sd  # not a square grid of the same width: the strict load says what differs
    from timm.layers import resample_abs_pos_embed

    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    size = tuple(int(s) for s in model.patch_embed.img_size)
    log.warning("checkpoint %s: position embedding resampled from %dx%d to %dx%d patches (the model is built for "
                "%dx%d px; --model-arg img_size=N builds it for another size)", path, side, side, *grid, *size)
    return {**sd, "pos_embed": resample_abs_pos_embed(theirs, new_size=list(grid), old_size=[side, side],
                                                      num_prefix_tokens=prefix)}


def _safetensors_header(path: Any) -> tuple[dict[str, str], dict[str, tuple[int, ...]]] | None:
    """(metadata, tensor shapes) of a safetensors file, from its header alone; None for other formats."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > (1 << 28):
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.pop("__metadata__", None) or {}
    shapes = {k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}
    return dict(meta), shapes

"""Resolve the eval preprocessing a model expects, and build its transform with timm.

Layers, later wins field by field: timm's default for the model < the checkpoint's
safetensors metadata < a timm pretrained_cfg JSON file < explicit CLI overrides.
Normalisation constants always come from one of these layers, never from this module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from timm.models import PretrainedCfg
from torch import nn

from corp_cli.errors import InputError

log = logging.getLogger(__name__)

FIELDS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
CROP_MODES = ("center", "squash", "border")
# Deterministic PIL filters only: timm's 'random' interpolation is a training augmentation.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")

# timm pretrained_cfg keys that do not affect eval preprocessing; a cfg file may carry them.
_HARMLESS_CFG_KEYS = frozenset(f.name for f in dataclasses.fields(PretrainedCfg)) - set(FIELDS)
_CHECKPOINT_KEYS = frozenset({"resize", "crop", "interpolation", "mean", "std"})


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str
    source: str

    kind: ClassVar[str] = "image"

    def __post_init__(self) -> None:
        # Validate once here so every construction path (from_dict, resolve) is covered.
        _check_fields(dataclasses.asdict(self), where="preprocessing")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        if not isinstance(data, Mapping):
            raise InputError(f"preprocessing: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"preprocessing: unknown key(s) {unknown}")
        missing = sorted(names - set(data))
        if missing:
            raise InputError(f"preprocessing: missing key(s) {missing}")
        fields = _normalise(dict(data), where="preprocessing")
        return cls(**fields, source=str(data["source"]))

    def count(self, source: Any) -> int | None:
        """How many items batches() yields for `source` (None for a stream of unknown length)."""
        return source.num_items

    def batches(self, source: Any, batch_size: int, workers: int = 0) -> Iterator[tuple[dict[str, Any], Any]]:
        """({"pixel_values": images}, labels or None) per batch, in source order."""
        from corp_cli.data import make_batches

        for x, labels in make_batches(source, self.transform(), batch_size, workers):
            yield {"pixel_values": x}, labels

    def transform(self) -> Callable[[Any], Any]:
        from timm.data import create_transform

        return create_transform(
            input_size=self.input_size,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
            is_training=False,
        )


def resolve_preprocessing(
    model: nn.Module,
    *,
    checkpoint_meta: Mapping[str, str] | None = None,
    pretrained_cfg_path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Preprocessing:
    layers: list[tuple[str, dict[str, Any]]] = [("timm-default", _timm_default(model))]
    if checkpoint_meta and checkpoint_meta.get("preprocessing") is not None:
        layers.append(("checkpoint-metadata", _from_checkpoint_meta(checkpoint_meta["preprocessing"])))
    if pretrained_cfg_path is not None:
        layers.append((f"pretrained-cfg:{pretrained_cfg_path}", _from_pretrained_cfg(Path(pretrained_cfg_path))))
    if overrides:
        layers.append(("cli-override", _from_overrides(overrides)))

    merged: dict[str, Any] = {}
    winner: dict[str, str] = {}
    for name, fields in layers:
        for key, value in fields.items():
            merged[key] = value
            winner[key] = name
    missing = [k for k in FIELDS if k not in merged]
    if missing:
        raise InputError(f"preprocessing: could not determine {missing}")
    # Provenance lists every layer that still decides at least one field, in precedence order.
    source = "+".join(name for name, _ in layers if name in winner.values())
    result = Preprocessing(**_normalise(merged, where="preprocessing"), source=source)
    log.info("preprocessing (%s): %s", source, result.to_dict())
    return result


def _timm_default(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    # Older pretrained cfgs omit crop_mode; timm's own transform treats that as 'center'.
    cfg.setdefault("crop_mode", "center")
    return {k: cfg[k] for k in FIELDS if cfg.get(k) is not None}


def _from_checkpoint_meta(raw: Any) -> dict[str, Any]:
    where = "checkpoint metadata 'preprocessing'"
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a JSON object")
    # A checkpoint written by corp itself stores Preprocessing.to_dict(); accept that form too.
    if raw and set(raw) <= set(FIELDS) | {"source"}:
        return _normalise({k: v for k, v in raw.items() if k != "source" and v is not None}, where=where)
    unknown = sorted(set(raw) - _CHECKPOINT_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}")
    out: dict[str, Any] = {k: raw[k] for k in ("interpolation", "mean", "std") if raw.get(k) is not None}
    if raw.get("resize") is not None:
        out.update(_resize_crop(raw["resize"], raw.get("crop"), where))
    elif raw.get("crop") is not None:
        raise InputError(f"{where}: 'crop' given without 'resize'")
    return _normalise(out, where=where)


def _resize_crop(resize: Any, crop: Any, where: str) -> dict[str, Any]:
    """Translate a resize[/crop] pair into timm's input_size/crop_pct/crop_mode."""
    r = _size(resize, f"{where} key 'resize'")
    c = None if crop is None else _size(crop, f"{where} key 'crop'")
    if isinstance(r, tuple):
        # Resize to an exact (h, w) ignores aspect ratio: that is timm's 'squash' mode.
        if c is None:
            return {"input_size": (3, *r), "crop_pct": 1.0, "crop_mode": "squash"}
        ch, cw = c if isinstance(c, tuple) else (c, c)
        pct = _crop_pct((ch, cw), r, f"{where} key 'crop'")
        return {"input_size": (3, ch, cw), "crop_pct": pct, "crop_mode": "squash"}
    # An int resize scales the shorter side; without a crop a fixed-size batch needs a
    # center crop to r x r anyway, which is what crop_pct=1.0 'center' does.
    if c is None:
        return {"input_size": (3, r, r), "crop_pct": 1.0, "crop_mode": "center"}
    ch, cw = c if isinstance(c, tuple) else (c, c)
    if ch != cw:
        raise InputError(f"{where} key 'crop': a non-square crop needs 'resize' as [h, w]")
    return {"input_size": (3, ch, cw), "crop_pct": _crop_pct((ch,), (r,), f"{where} key 'crop'"), "crop_mode": "center"}


def _crop_pct(crop: tuple[int, ...], resize: tuple[int, ...], where: str) -> float:
    if any(c > s for c, s in zip(crop, resize)):
        raise InputError(f"{where}: crop {list(crop)} is larger than resize {list(resize)}")
    pct = crop[0] / resize[0]
    # timm recovers the resize size as floor(crop / crop_pct); float rounding can land one
    # pixel short, so nudge the ratio down until the round trip is exact.
    for _ in range(4):
        if all(math.floor(c / pct) == s for c, s in zip(crop, resize)):
            return pct
        pct = math.nextafter(pct, 0.0)
    raise InputError(f"{where}: crop/resize ratio differs between height and width")


def _size(value: Any, where: str) -> int | tuple[int, int]:
    if _is_pos_int(value):
        return int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_pos_int(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise InputError(f"{where}: expected a positive int or [height, width], got {value!r}")


def _input_size(value: Any) -> tuple[int, int, int]:
    # Accept timm's [C, H, W] and, for CLI convenience, a bare size or [H, W] (RGB assumed).
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_pos_int(v) for v in value):
        return (int(value[0]), int(value[1]), int(value[2]))
    size = _size(value, "input_size")
    h, w = size if isinstance(size, tuple) else (size, size)
    return (3, h, w)


def _from_pretrained_cfg(path: Path) -> dict[str, Any]:
    where = f"pretrained cfg {path}"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{where}: cannot read JSON ({e})") from None
    # A hub config.json nests the cfg under 'pretrained_cfg'; the rest is model config.
    if isinstance(data, dict) and isinstance(data.get("pretrained_cfg"), dict):
        data = data["pretrained_cfg"]
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object")
    unknown = sorted(set(data) - set(FIELDS) - _HARMLESS_CFG_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}")
    return _normalise({k: data[k] for k in FIELDS if data.get(k) is not None}, where=where)


def _from_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise InputError(f"preprocessing override: unknown key(s) {unknown}")
    return _normalise({k: v for k, v in overrides.items() if v is not None}, where="preprocessing override")


def _normalise(fields: dict[str, Any], *, where: str) -> dict[str, Any]:
    """Coerce a partial field dict to canonical types (tuples, floats); InputError naming the key."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in FIELDS:
            continue
        try:
            if key == "input_size":
                out[key] = _input_size(value)
            elif key in ("mean", "std"):
                if isinstance(value, (str, bytes)) or not all(_is_number(v) for v in value):
                    raise ValueError
                out[key] = tuple(float(v) for v in value)
            elif key == "crop_pct":
                if not _is_number(value):
                    raise ValueError
                out[key] = float(value)
            else:
                if not isinstance(value, str):
                    raise ValueError
                out[key] = value
        except (TypeError, ValueError, InputError):
            raise InputError(f"{where}: malformed value for key '{key}': {value!r}") from None
    _check_fields(out, where=where)
    return out


def _check_fields(f: Mapping[str, Any], *, where: str) -> None:
    def bad(key: str, why: str) -> InputError:
        return InputError(f"{where}: key '{key}' {why}: {f[key]!r}")

    if "interpolation" in f and f["interpolation"] not in INTERPOLATIONS:
        raise bad("interpolation", f"must be one of {list(INTERPOLATIONS)}")
    if "crop_mode" in f and f["crop_mode"] not in CROP_MODES:
        raise bad("crop_mode", f"must be one of {list(CROP_MODES)}")
    if "crop_pct" in f and not (0.0 < f["crop_pct"] <= 1.0):
        raise bad("crop_pct", "must be in (0, 1]")
    if "input_size" in f and (len(f["input_size"]) != 3 or min(f["input_size"]) < 1):
        raise bad("input_size", "must be [channels, height, width]")
    if "std" in f and any(not s > 0 for s in f["std"]):
        raise bad("std", "must be positive")
    channels = f["input_size"][0] if "input_size" in f else None
    for key in ("mean", "std"):
        if key in f and (not f[key] or any(not math.isfinite(v) for v in f[key])):
            raise bad(key, "must be finite numbers")
        if key in f and channels is not None and len(f[key]) != channels:
            raise bad(key, f"must have {channels} values")


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def preprocessing_from_dict(d: Mapping[str, Any], tokenizer_dir: Path | None = None) -> Any:
    """The preprocessing record of an artifact: text (kind 'text') or image."""
    if isinstance(d, Mapping) and d.get("kind") == "text":
        from corp_cli.text import LmTextPreprocessing, TextPreprocessing

        if d.get("unit") == LmTextPreprocessing.unit:
            return LmTextPreprocessing.from_dict(dict(d), tokenizer_dir)
        return TextPreprocessing.from_dict(dict(d), tokenizer_dir)
    return Preprocessing.from_dict(d)


def override_preprocessing(model: nn.Module, recorded: Preprocessing, options: Any) -> Preprocessing:
    """A pruned model's recorded preprocessing, with explicit --pretrained-cfg / flags winning over it."""
    fields = {k: v for k, v in recorded.to_dict().items() if k != "source"}
    return resolve_preprocessing(model, checkpoint_meta={"preprocessing": json.dumps(fields)},
                                 pretrained_cfg_path=options.pretrained_cfg, overrides=options.preprocessing)

"""Resolving and loading the dense model: timm names, local checkpoints, pretrained weights."""

from __future__ import annotations

import difflib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from torch import nn

from corp_cli.artifacts import sha256_file
from corp_cli.errors import InputError
from corp_cli.hub import offline_from_env, offline_requested

log = logging.getLogger(__name__)

_STATE_DICT_WRAPPERS = ("state_dict", "model", "model_ema", "module")


@dataclass(frozen=True)
class ModelIdentity:
    """What statistics and masks must match: the architecture, its weights, its head."""

    name: str
    checkpoint: str  # "sha256:<hex>" of a local file, or "timm-pretrained:<name>.<tag>"
    num_classes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "checkpoint": self.checkpoint, "num_classes": self.num_classes}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelIdentity:
        """From artifact metadata, which may be foreign: anything malformed is a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"model record must be an object, got {type(d).__name__}")
        name, ckpt, ncls = d.get("name"), d.get("checkpoint"), d.get("num_classes")
        if not isinstance(name, str) or not name or not isinstance(ckpt, str) or not ckpt:
            raise ValueError("model record needs non-empty 'name' and 'checkpoint' strings")
        if isinstance(ncls, bool) or not isinstance(ncls, int) or ncls < 0:
            raise ValueError(f"model record has num_classes {ncls!r}, expected an integer >= 0")
        return ModelIdentity(name=name, checkpoint=ckpt, num_classes=ncls)


@dataclass
class LoadedModel:
    model: nn.Module
    identity: ModelIdentity
    checkpoint_path: Path | None = None
    checkpoint_meta: dict[str, str] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported; use auto, cpu or cuda[:N]")
    return dev


def check_model(name: str, num_classes: int | None = None) -> str:
    """Cheap up-front check that `name` is a timm model corp can prune; returns the architecture."""
    arch = check_model_name(name)
    if num_classes is not None and num_classes < 0:
        raise InputError(f"--num-classes must be >= 0, got {num_classes}")
    _check_supported(arch, num_classes)
    return arch


def check_model_name(name: str) -> str:
    """The timm architecture name (tag stripped), or an InputError with close matches."""
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return arch
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()` for names"
    raise InputError(f"unknown timm model {name!r}{hint}")


_ZIP_MAGIC = b"PK\x03\x04"
_HOW_TO_CONVERT = (
    "convert it once, in an environment you trust, with `python -c \"import torch; from safetensors.torch import "
    "save_file; sd = torch.load('IN.pth', weights_only=False); save_file(sd.get('state_dict', sd), "
    "'OUT.safetensors')\"` and pass the .safetensors file"
)


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors starts with a little-endian u64 header length and then a JSON '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict and (safetensors) metadata from a local file; never executes code from it.

    The format is sniffed from the content, not the suffix, so a safetensors file named
    .pth (or the reverse) reads correctly or fails with a clear message.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist or is not a file")
    if _looks_like_safetensors(path) or (path.suffix == ".safetensors" and not _starts_with(path, _ZIP_MAGIC)):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        # An untrusted header can make the reader raise anything; all of it means "unreadable".
        except Exception as e:  # noqa: BLE001
            raise InputError(
                f"checkpoint {path} is not a readable safetensors file ({_first_line(e)}); is it truncated?"
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = _blocked_global(str(e))
        if blocked is None:
            raise InputError(
                f"checkpoint {path} is not a PyTorch checkpoint or is corrupt ({_first_line(e)})"
            ) from None
        raise InputError(
            f"checkpoint {path} was refused: unpickling it would run code ({blocked}), "
            f"and corp only loads weights (torch.load weights_only=True); {_HOW_TO_CONVERT}"
        ) from None
    # weights_only unpickling runs no code, so whatever else it raises is a corrupt file:
    # KeyError/IndexError from garbage opcodes, RuntimeError from a truncated zip, ...
    except Exception as e:  # noqa: BLE001
        kind = "a truncated or corrupt PyTorch zip file" if _starts_with(path, _ZIP_MAGIC) else "not a PyTorch checkpoint"
        raise InputError(f"checkpoint {path} could not be read: {kind} ({_first_line(e)})") from None
    for _ in range(3):
        if isinstance(obj, dict) and not _is_state_dict(obj):
            inner = next((obj[k] for k in _STATE_DICT_WRAPPERS if k in obj and isinstance(obj[k], dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        raise InputError(f"checkpoint {path} holds no state dict (expected a mapping of parameter names to tensors)")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    return sd, {}


def _blocked_global(message: str) -> str | None:
    """The 'GLOBAL x.y' torch's weights_only unpickler refused, if that is why it failed."""
    for line in message.splitlines():
        line = line.strip()
        if "GLOBAL" in line or "Unsupported global" in line or "not an allowed global" in line:
            return line.rstrip(".")[:200]
    if "Weights only load failed" in message:
        return "an object that is not plain tensors"
    return None


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return f"{type(e).__name__}: {line}"[:limit]


def _is_state_dict(d: dict[Any, Any]) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _infer_num_classes(sd: dict[str, torch.Tensor]) -> int | None:
    w = sd.get("head.weight")
    return int(w.shape[0]) if w is not None and w.ndim == 2 else None


def load_dense(
    name: str,
    *,
    checkpoint: Path | None = None,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """The dense timm model in eval mode, from a local checkpoint or timm's pretrained weights.

    num_classes precedence: explicit > checkpoint metadata 'num_classes' > the checkpoint's
    head shape > timm's default.
    """
    arch = check_model_name(name)
    _check_supported(arch, num_classes)
    if checkpoint is not None:
        sd, meta = read_checkpoint(checkpoint)
        if num_classes is None and "num_classes" in meta:
            try:
                num_classes = int(meta["num_classes"])
            except ValueError:
                raise InputError(f"checkpoint {checkpoint}: metadata num_classes={meta['num_classes']!r} is not an integer") from None
        if num_classes is None:
            num_classes = _infer_num_classes(sd)
        kwargs = {"num_classes": num_classes} if num_classes is not None else {}
        model = _create(arch, pretrained=False, **kwargs)
        _load_strict(model, sd, checkpoint)
        ident = ModelIdentity(arch, f"sha256:{sha256_file(checkpoint)}", _num_classes(model))
        loaded = LoadedModel(model, ident, Path(checkpoint), meta)
    else:
        kwargs = {"num_classes": num_classes} if num_classes is not None else {}
        try:
            with offline_from_env():
                model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - hub/cache failures come in many types
            why = (
                "offline: HF_HUB_OFFLINE is set and they are not in the local Hugging Face cache;"
                if offline_requested() else "offline?"
            )
            raise InputError(
                f"could not load pretrained weights for {name!r} ({_first_line(e, 120)}); {why} "
                "pass --checkpoint FILE (.safetensors or .pth) or put the weights in the Hugging Face cache"
            ) from None
        tag = getattr(model, "pretrained_cfg", {}).get("tag") or "default"
        ident = ModelIdentity(arch, f"timm-pretrained:{arch}.{tag}", _num_classes(model))
        loaded = LoadedModel(model, ident, None, {})
    loaded.model.to(device).eval()
    return loaded


def _check_supported(arch: str, num_classes: int | None) -> None:
    """Refuse unsupported architectures before any weights are read or downloaded."""
    from corp_cli.adapters import adapter_for

    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    with torch.device("meta"):
        probe = _create(arch, pretrained=False, **kwargs)
    adapter_for(probe)


def _create(arch: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(arch, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"timm could not build {arch!r} with {kwargs}: {_first_line(e)}") from None


def _num_classes(model: nn.Module) -> int:
    return int(getattr(model, "num_classes", 0))


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch for {_few(wrong)} (e.g. {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)})")
        raise InputError(f"checkpoint {path} does not fit this model: {'; '.join(parts)}; check the model name and --num-classes")
    model.load_state_dict(sd, strict=True)


def _few(keys: list[str], n: int = 4) -> str:
    head = ", ".join(keys[:n])
    return f"[{head}{', ...' if len(keys) > n else ''}] ({len(keys)})"

"""Reading model weights from local files without ever executing code from them.

Used by every family that takes `--checkpoint`: safetensors files are read as they are,
.pth files only through torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from corp_cli.errors import InputError

_STATE_DICT_WRAPPERS = ("state_dict", "model", "model_ema", "module")


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
                f"checkpoint {path} is not a readable safetensors file ({first_line(e)}); is it truncated?"
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = _blocked_global(str(e))
        if blocked is None:
            raise InputError(
                f"checkpoint {path} is not a PyTorch checkpoint or is corrupt ({first_line(e)})"
            ) from None
        raise InputError(
            f"checkpoint {path} was refused: unpickling it would run code ({blocked}), "
            f"and corp only loads weights (torch.load weights_only=True); {_HOW_TO_CONVERT}"
        ) from None
    # weights_only unpickling runs no code, so whatever else it raises is a corrupt file:
    # KeyError/IndexError from garbage opcodes, RuntimeError from a truncated zip, ...
    except Exception as e:  # noqa: BLE001
        kind = "a truncated or corrupt PyTorch zip file" if _starts_with(path, _ZIP_MAGIC) else "not a PyTorch checkpoint"
        raise InputError(f"checkpoint {path} could not be read: {kind} ({first_line(e)})") from None
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


def _is_state_dict(d: dict[Any, Any]) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def state_dict_digest(model: nn.Module) -> str:
    """sha256 over an in-memory model's parameter names, shapes, dtypes and bytes (its weights' identity)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"sha256:{h.hexdigest()}"


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, hint: str) -> None:
    """Load a state dict that must fit exactly; a mismatch is one line naming keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {few(unexpected)}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch for {few(wrong)} (e.g. {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)})")
        raise InputError(f"checkpoint {path} does not fit this model: {'; '.join(parts)}; {hint}")
    model.load_state_dict(sd, strict=True)


def few(keys: list[str], n: int = 4) -> str:
    head = ", ".join(keys[:n])
    return f"[{head}{', ...' if len(keys) > n else ''}] ({len(keys)})"


def first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return f"{type(e).__name__}: {line}"[:limit]

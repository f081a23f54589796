"""Which torch device a command runs on."""

from __future__ import annotations

from typing import Any

import torch

from corp_cli.errors import InputError


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
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


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware a measurement ran with (for reports)."""
    import platform
    import sys

    from corp_cli import __version__

    env: dict[str, Any] = {
        "corp_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    for lib in ("timm", "transformers"):
        mod = sys.modules.get(lib)
        if mod is not None:
            env[f"{lib}_version"] = getattr(mod, "__version__", "?")
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env

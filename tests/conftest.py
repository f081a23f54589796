"""Shared fixtures: small random timm models saved as local checkpoints, the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach a model hub: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IN1K_CKPT = SHARED_DATA / "deit_tiny_patch16_224.in1k.safetensors"
CIFAR_CKPT = SHARED_DATA / "deit_tiny_patch16_224.cifar10.safetensors"
IMAGENET_SAMPLE = SHARED_DATA / "imagenet-sample"
CIFAR_DIR = SHARED_DATA / "cifar10"

needs_shared_data = pytest.mark.skipif(
    not IN1K_CKPT.is_file() or not IMAGENET_SAMPLE.is_dir(),
    reason="real weights/images not present (expected ../shared/data beside the repository)",
)


def random_model(name: str = "deit_tiny_patch16_224", seed: int = 0, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised deit_tiny as a local safetensors checkpoint."""
    path = tmp_path_factory.mktemp("ckpt") / "deit_tiny_random.safetensors"
    save_file(random_model().state_dict(), str(path))
    return path


def calib_images(n: int = 8, seed: int = 0, size: int = 224) -> torch.Tensor:
    """Smooth random images: more structured than white noise, so activations are correlated."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size // 16, size // 16, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def adopt(model: torch.nn.Module):
    """The Loaded wrapper corp builds around an in-memory model (its family, identity, preprocessing)."""
    from corp_cli.api import as_loaded

    return as_loaded(model)


def save_model(folder: Path, model, **extra_meta: object) -> Path:
    """Write a (pruned) model as a corp checkpoint, with the base/preprocessing record a reload needs."""
    from corp_cli.compact import save_pruned_checkpoint

    loaded = adopt(model) if isinstance(model, torch.nn.Module) else model
    meta = {"base": loaded.identity.to_dict(), "preprocessing": loaded.preprocessing.to_dict(), **extra_meta}
    folder.mkdir(parents=True, exist_ok=True)
    save_pruned_checkpoint(folder, loaded, meta)
    return folder


def narrowed(name: str, blocks: list[dict[str, int]], family: str = "timm-vit", **kwargs: object) -> torch.nn.Module:
    """A model with the given per-block widths, built the way load_pruned builds one (weights random)."""
    from corp_cli.registry import by_name

    return by_name(family).build({"family": family, "base_model": name, "model_kwargs": kwargs, "blocks": blocks}).eval()

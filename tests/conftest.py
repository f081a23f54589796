"""Shared fixtures: small random timm models saved as local checkpoints, the shared real data."""

from __future__ import annotations

import os
import copy
import dataclasses
from pathlib import Path

# Tests never reach a model hub: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import Tensor  # noqa: E402

from corp_cli import engine  # noqa: E402

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


def masked_reference(dense, masks, stats, blocks):
    """The dense model (a Loaded) with hooks that do what the compacted weights do: predict removed units, mix kept Q/K dims."""
    fam, model = dense.family, copy.deepcopy(dense.model)
    ref = dataclasses.replace(dense, model=model)
    for i, bm in enumerate(masks):
        entry = blocks[i]
        if bm.mlp is not None:
            m = engine.mlp_moments(stats.blocks[i]["mlp"])
            keep = bm.mlp
            prune = engine.complement(keep, m.mean.shape[0])
            sol = engine.ridge_compensation(m, keep, prune, entry["mlp"]["lambda"])

            def on_h(h: Tensor, keep: Tensor = keep, prune: Tensor = prune, sol: engine.RidgeSolution = sol) -> Tensor:
                out = h.clone()
                out[..., prune] = (h[..., keep].double() @ sol.b.T + sol.c).to(h.dtype)
                return out

            fam.mlp_hook(model, i, on_h)
        if bm.attn is not None:
            st = stats.blocks[i]["attn"]
            n = int(st["count"].sum())
            d = st["q_gram"].shape[-1]
            keep = bm.attn
            prune = torch.stack([engine.complement(k, d) for k in keep])
            lam = torch.tensor(entry["attn"]["lambda_per_head"], dtype=torch.float64)
            sol = engine.qk_compensation(st["q_gram"] / n, st["k_gram"] / n, keep, prune, lam=None,
                                         scale=fam.softmax_scale(dense.model, i))
            assert torch.allclose(sol.lam, lam)
            mix = torch.eye(keep.shape[1], dtype=torch.float64) + sol.m  # (H, ds, ds)

            def on_qk(q: Tensor, k: Tensor, keep: Tensor = keep, mix: Tensor = mix) -> tuple[Tensor, Tensor]:
                q2, k2 = torch.zeros_like(q), torch.zeros_like(k)
                for h, s in enumerate(keep):  # logit = q_S^T (I + M) k_S, removed dims contribute nothing
                    q2[:, h][..., s] = (q[:, h][..., s].double() @ mix[h]).to(q.dtype)
                    k2[:, h][..., s] = k[:, h][..., s]
                return q2, k2

            fam.qk_hook(model, i, on_qk)
    return ref

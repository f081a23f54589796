"""Every supported timm ViT variant calibrates, prunes (MLP + Q/K), saves and reloads identically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from corp_cli.calibration import collect_statistics
from corp_cli.compact import load_pruned
from corp_cli.pruning import PruneOptions, apply_masks, plan_masks
from corp_cli.stats import Statistics

from .conftest import calib_images, random_model, save_model

FAMILIES = [
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "deit3_small_patch16_224",  # LayerScale
    "deit_base_distilled_patch16_224",  # two heads, two prefix tokens
    "vit_small_patch14_dinov2",  # LayerScale, patch 14, no class-token pooling quirks
]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_prunes_and_reloads(name: str, tmp_path: Path) -> None:
    size = 56  # a small input and depth keep the test fast; the blocks are the real ones
    kwargs = {"img_size": size, "num_classes": 10, "depth": 3}
    model = random_model(name, **kwargs)
    x = calib_images(4, size=size)
    stats = Statistics(blocks=collect_statistics(model, [x]).blocks, meta={})
    opts = PruneOptions(target="both", mlp_sparsity=0.5, attn_sparsity=0.5, round_to=8)
    report = apply_masks(model, stats, plan_masks(model, stats, opts), opts)
    for entry in report:
        assert entry["mlp"]["predicted_error_compensated"] <= entry["mlp"]["predicted_error_uncompensated"] * (1 + 1e-9)
        comp = torch.tensor(entry["attn"]["predicted_logit_error_compensated"])
        unc = torch.tensor(entry["attn"]["predicted_logit_error_uncompensated"])
        assert bool((comp <= unc * (1 + 1e-9) + 1e-12).all())
    save_model(tmp_path, model)
    again = load_pruned(tmp_path)
    y = calib_images(2, seed=1, size=size)
    with torch.no_grad():
        out = model(y)
        assert torch.isfinite(out).all()
        assert_close(again(y), out, rtol=0, atol=0)
    assert again.blocks[0].mlp.fc1.out_features == model.blocks[0].mlp.fc1.out_features
    assert again.blocks[0].mlp.fc1.out_features % 8 == 0

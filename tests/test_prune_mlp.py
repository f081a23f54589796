"""MLP pruning on a random deit_tiny: compensation never hurts, predictions match, compact == masked."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from corp_cli import engine
from corp_cli.calibration import collect_statistics
from corp_cli.compact import load_pruned
from corp_cli.pruning import PruneOptions, apply_masks, plan_masks
from corp_cli.stats import Statistics

from .conftest import adopt, calib_images, random_model, save_model


def _stats(model: torch.nn.Module, x: torch.Tensor, precision: torch.dtype = torch.float64) -> Statistics:
    sums = collect_statistics(model, [x[:4], x[4:]], product_dtype=precision)
    return Statistics(blocks=sums.blocks, meta={})


def _hidden_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    fam = adopt(model).family
    seen: list[list[torch.Tensor]] = [[] for _ in range(fam.num_blocks(model))]
    hooks = [h for i in range(fam.num_blocks(model))
             for h in fam.mlp_hook(model, i, lambda t, i=i: seen[i].append(t.reshape(-1, t.shape[-1])))]
    with torch.no_grad():
        model.forward_features(x[:4])
        model.forward_features(x[4:])
    for h in hooks:
        h.remove()
    return [torch.cat(s).double() for s in seen]


@pytest.mark.parametrize("ranker", ["energy", "active-energy", "magnitude", "obs"])
def test_compensation_never_hurts_and_report_predicts_measured_error(ranker: str) -> None:
    dense = random_model()
    x = calib_images(8)
    stats = _stats(dense, x)
    hidden = _hidden_inputs(dense, x)
    dense_fc2 = [(b.mlp.fc2.weight.detach().double(), b.mlp.fc2.bias.detach().double()) for b in dense.blocks]
    pruned = copy.deepcopy(dense)
    opts = PruneOptions(target="mlp", mlp_sparsity=0.5, ranker=ranker)
    masks = plan_masks(pruned, stats, opts)
    report = apply_masks(pruned, stats, masks, opts)
    for i, entry in enumerate(report):
        r = entry["mlp"]
        assert r["kept"] == 384 and r["removed"] == 384
        assert r["predicted_error_compensated"] <= r["predicted_error_uncompensated"]
        h = hidden[i]
        w2, b2 = dense_fc2[i]
        fc2 = pruned.blocks[i].mlp.fc2
        keep = masks[i].mlp
        y_dense = h @ w2.T + b2
        y_pruned = h[:, keep] @ fc2.weight.detach().double().T + fc2.bias.detach().double()
        measured = float(((y_dense - y_pruned) ** 2).sum(1).mean())
        assert_close(measured, r["predicted_error_compensated"], rtol=2e-4, atol=1e-7)
        y_drop = h[:, keep] @ w2[:, keep].T + b2
        measured_u = float(((y_dense - y_drop) ** 2).sum(1).mean())
        assert_close(measured_u, r["predicted_error_uncompensated"], rtol=2e-4, atol=1e-7)


def test_compacted_model_equals_masked_dense_model() -> None:
    dense = random_model()
    x = calib_images(8)
    stats = _stats(dense, x, torch.float32)
    opts = PruneOptions(target="mlp", mlp_sparsity=0.6, round_to=8)
    pruned = copy.deepcopy(dense)
    masks = plan_masks(pruned, stats, opts)
    apply_masks(pruned, stats, masks, opts)
    masked = copy.deepcopy(dense)
    with torch.no_grad():
        for i, blk in enumerate(masked.blocks):
            keep = masks[i].mlp
            w = torch.zeros_like(blk.mlp.fc2.weight)
            w[:, keep] = pruned.blocks[i].mlp.fc2.weight
            blk.mlp.fc2.weight.copy_(w)
            blk.mlp.fc2.bias.copy_(pruned.blocks[i].mlp.fc2.bias)
            assert pruned.blocks[i].mlp.fc1.out_features == keep.numel() == 312  # 768 - floor(460.8) = 308 -> nearest multiple of 8 (ties up)
    y = calib_images(3, seed=1)
    with torch.no_grad():
        assert_close(pruned(y), masked(y), rtol=1e-5, atol=1e-5)


def test_float32_products_match_float64_on_a_real_forward() -> None:
    model = random_model()
    x = calib_images(8)
    s32 = _stats(model, x, torch.float32)
    s64 = _stats(model, x, torch.float64)
    for b32, b64 in zip(s32.blocks, s64.blocks):
        g32, g64 = b32["mlp"]["gram"], b64["mlp"]["gram"]
        rel = float((g32 - g64).norm() / g64.norm())
        assert rel < 1e-6, rel
        q32, q64 = b32["attn"]["q_gram"], b64["attn"]["q_gram"]
        assert float((q32 - q64).norm() / q64.norm()) < 1e-6


def test_masks_are_deterministic_and_byte_identical(tmp_path: Path) -> None:
    from corp_cli.masks import save_masks
    from corp_cli.family import ModelIdentity

    ident = ModelIdentity("deit_tiny_patch16_224", "sha256:x", 1000)
    blobs = []
    for k in range(2):
        model = random_model()
        stats = _stats(model, calib_images(8), torch.float32)
        masks = plan_masks(model, stats, PruneOptions(target="both", ranker="active-energy"))
        path = tmp_path / f"m{k}.safetensors"
        save_masks(path, masks, identity=ident, shapes=[], options={}, stats_fingerprint="x")
        blobs.append(path.read_bytes())
    assert blobs[0] == blobs[1]

@pytest.mark.slow

def test_save_and_reload_in_a_fresh_process(tmp_path: Path) -> None:
    dense = random_model()
    x = calib_images(8)
    stats = _stats(dense, x, torch.float32)
    # different widths per block, and Q/K pruning, all in one checkpoint
    opts = PruneOptions(target="both", mlp_sparsity=0.5, attn_sparsity=0.25,
                        block_overrides={0: {"mlp_sparsity": 0.2}, 5: {"attn_sparsity": 0.5}})
    masks = plan_masks(dense, stats, opts)
    apply_masks(dense, stats, masks, opts)
    out = tmp_path / "pruned"
    save_model(out, dense)
    y = calib_images(2, seed=3)
    with torch.no_grad():
        expected = dense(y)
    torch.save({"x": y, "y": expected}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        "from corp_cli import load_pruned\n"
        f"m = load_pruned({str(out)!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    ok = torch.equal(m(io['x']), io['y'])\n"
        "print('widths', m.blocks[0].mlp.fc1.out_features, m.blocks[1].mlp.fc1.out_features, m.blocks[5].attn.qk_dim)\n"
        "sys.exit(0 if ok else 3)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    # block 0 keeps 768 - floor(0.2 * 768) = 615 units, rounded to the default multiple of 8 (defaults.ROUND_TO)
    assert "widths 616 384 32" in res.stdout


def test_reloaded_model_is_a_narrower_model_not_a_masked_one(tmp_path: Path) -> None:
    dense = random_model()
    stats = _stats(dense, calib_images(8), torch.float32)
    opts = PruneOptions(target="mlp", mlp_sparsity=0.5)
    apply_masks(dense, stats, plan_masks(dense, stats, opts), opts)
    save_model(tmp_path, dense)
    m = load_pruned(tmp_path)
    fc1 = m.blocks[3].mlp.fc1
    assert isinstance(fc1, torch.nn.Linear) and fc1.weight.shape == (384, 192)
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in random_model().parameters())
    assert not m.training


def test_obs_greedy_keeps_requested_count() -> None:
    dense = random_model()
    stats = _stats(dense, calib_images(8), torch.float32)
    opts = PruneOptions(target="mlp", mlp_sparsity=0.75, ranker="obs-greedy", block_overrides={1: {"mlp_sparsity": 0.5}})
    masks = plan_masks(dense, stats, opts)
    assert masks[0].mlp.numel() == 192 and masks[1].mlp.numel() == 384
    assert engine.complement(masks[0].mlp, 768).numel() == 576

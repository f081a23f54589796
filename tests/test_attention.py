"""Attention Q/K-dim pruning: the closed-form logit error is the measured one, compact == masked,
both folds agree, joint pruning round-trips through the CLI, and stock-timm loading works."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor, nn
from torch.testing import assert_close
from typer.testing import CliRunner

from corp_cli.calibration import collect_statistics
from corp_cli.cli import app
from corp_cli.compact import MODEL_FILE, architecture, load_pruned, read_pruned
from corp_cli.families.timm_vit import QKNormPrunedAttention, QKPrunedAttention
from corp_cli.errors import ArtifactError
from corp_cli.pruning import BlockMasks, PruneOptions, apply_masks, plan_masks
from corp_cli.stats import Statistics

from .conftest import adopt, calib_images, random_model, save_model

# Blocks whose logits are checked against the brute-force all-pairs error / a masked reference.
# The float64 checks use a 4-block deit_tiny: every block is alike, and float64 on CPU is slow.
DEPTH = 4
MEASURED_BLOCKS = (0, DEPTH - 1)
MASKED_BLOCKS = (0, 2)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _batches(n: int = 6, per: int = 3) -> list[Tensor]:
    x = calib_images(n).double()
    return [x[i : i + per] for i in range(0, n, per)]


def _stats(model: nn.Module, batches: list[Tensor]) -> Statistics:
    # float64 products: the measured-vs-predicted check is then limited by float64, not float32
    return Statistics(blocks=collect_statistics(model, batches, product_dtype=torch.float64).blocks, meta={})


def _capture(model: nn.Module, blocks: tuple[int, ...], batches: list[Tensor]) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """Per block, in one forward pass: dense attention inputs (B, N, dim) and the q, k of its logits (H, B*N, d)."""
    seen: dict[int, dict[str, list[Tensor]]] = {b: {"x": [], "q": [], "k": []} for b in blocks}
    hooks = []
    for b in blocks:
        attn = model.blocks[b].attn
        hooks += [
            attn.register_forward_pre_hook(lambda m, a, b=b: seen[b]["x"].append(a[0].detach())),
            attn.q_norm.register_forward_hook(lambda m, a, o, b=b: seen[b]["q"].append(o.detach())),
            attn.k_norm.register_forward_hook(lambda m, a, o, b=b: seen[b]["k"].append(o.detach())),
        ]
    with torch.no_grad():
        for x in batches:
            model.forward_features(x)
    for h in hooks:
        h.remove()

    def heads(t: list[Tensor]) -> Tensor:  # (B, H, N, d) per batch -> (H, sum B*N, d)
        return torch.cat([v.transpose(0, 1).reshape(v.shape[1], -1, v.shape[-1]) for v in t], 1)

    return {b: (torch.cat(v["x"]), heads(v["q"]), heads(v["k"])) for b, v in seen.items()}


def _pruned_qk(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The pruned queries/keys (H, N, ds) a compacted attention computes from token inputs x (B, N, dim)."""
    h, d, ds = attn.num_heads, attn.head_dim, attn.qk_dim
    with torch.no_grad():
        if isinstance(attn, QKNormPrunedAttention):
            q, k, _ = attn.qkv(x).reshape(*x.shape[:2], 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            q = torch.einsum("bhnd,hsd->bhns", attn.q_norm(q), attn.q_out)
            k = torch.einsum("bhnd,hsd->bhns", attn.k_norm(k), attn.k_out)
        else:
            q, k, _ = attn.qkv(x).split([h * ds, h * ds, h * d], dim=-1)
            q = q.reshape(*x.shape[:2], h, ds).transpose(1, 2)
            k = k.reshape(*x.shape[:2], h, ds).transpose(1, 2)
    return q.transpose(0, 1).reshape(h, -1, ds), k.transpose(0, 1).reshape(h, -1, ds)


def _all_pairs_error(q: Tensor, k: Tensor, qp: Tensor, kp: Tensor, scale: float) -> Tensor:
    """Mean over ALL (query, key) token pairs of the calibration set of the squared scaled-logit error, per head."""
    dense = q @ k.transpose(1, 2)
    pruned = qp @ kp.transpose(1, 2)
    return ((dense - pruned) * scale).square().mean(dim=(1, 2))


def _prune(model: nn.Module, stats: Statistics, **kw: object) -> tuple[nn.Module, list[BlockMasks], list[dict]]:
    m = copy.deepcopy(model)
    opts = PruneOptions(**kw)  # type: ignore[arg-type]
    masks = plan_masks(m, stats, opts)
    return m, masks, apply_masks(m, stats, masks, opts)


def _rows(keep: Tensor, d: int) -> Tensor:
    """Flat qkv row indices of each head's kept dims, (H*ds,)."""
    return (torch.arange(keep.shape[0])[:, None] * d + keep).reshape(-1)


# ---------------------------------------------------------------------------------------
# float64 deit_tiny, pruned Q/K only
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated() -> tuple[nn.Module, list[Tensor], Statistics]:
    model = random_model(depth=DEPTH).double()
    batches = _batches()
    return model, batches, _stats(model, batches)


@pytest.fixture(scope="module")
def dense_acts(calibrated: tuple[nn.Module, list[Tensor], Statistics]) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    model, batches, _ = calibrated
    return _capture(model, tuple(sorted({*MEASURED_BLOCKS, *MASKED_BLOCKS})), batches)


@pytest.fixture(scope="module")
def pruned_unbalanced(calibrated: tuple[nn.Module, list[Tensor], Statistics]) -> tuple[nn.Module, list[BlockMasks], list[dict]]:
    model, _, stats = calibrated
    return _prune(model, stats, target="attn", attn_sparsity=0.5, qk_balanced=False)


def test_compensation_never_hurts_and_predicted_error_is_the_measured_one(
    dense_acts: dict[int, tuple[Tensor, Tensor, Tensor]],
    pruned_unbalanced: tuple[nn.Module, list[BlockMasks], list[dict]],
) -> None:
    pruned, masks, report = pruned_unbalanced
    assert len(report) == DEPTH
    for entry in report:
        a = entry["attn"]
        assert a["qk_kept"] == 32 and a["qk_removed"] == 32
        comp = torch.tensor(a["predicted_logit_error_compensated"])
        unc = torch.tensor(a["predicted_logit_error_uncompensated"])
        assert bool((comp <= unc * (1 + 1e-12)).all()), (entry["block"], comp, unc)
        # M must actually do something, or `<=` above would hold trivially
        assert float(comp.sum()) < 0.9 * float(unc.sum()), (entry["block"], comp, unc)

    for b in MEASURED_BLOCKS:
        x, q, k = dense_acts[b]
        attn = pruned.blocks[b].attn
        assert isinstance(attn, QKPrunedAttention)
        qp, kp = _pruned_qk(attn, x)
        measured = _all_pairs_error(q, k, qp, kp, attn.scale)
        predicted = torch.tensor(report[b]["attn"]["predicted_logit_error_compensated"], dtype=torch.float64)
        assert_close(measured, predicted, rtol=1e-8, atol=0.0)
        # and the uncompensated number is the error of simply dropping the dims
        keep = masks[b].attn
        idx = keep[:, None, :].expand(-1, q.shape[1], -1)
        measured_u = _all_pairs_error(q, k, q.gather(2, idx), k.gather(2, idx), attn.scale)
        predicted_u = torch.tensor(report[b]["attn"]["predicted_logit_error_uncompensated"], dtype=torch.float64)
        assert_close(measured_u, predicted_u, rtol=1e-8, atol=0.0)


def test_compacted_attention_equals_masked_dense_attention(
    calibrated: tuple[nn.Module, list[Tensor], Statistics],
    dense_acts: dict[int, tuple[Tensor, Tensor, Tensor]],
    pruned_unbalanced: tuple[nn.Module, list[BlockMasks], list[dict]],
) -> None:
    dense = calibrated[0]
    pruned, masks, _ = pruned_unbalanced
    for b in MASKED_BLOCKS:
        ref = dense.blocks[b].attn
        new = pruned.blocks[b].attn
        h, d = ref.num_heads, ref.head_dim
        hd = h * d
        rows = _rows(masks[b].attn, d)
        ds = masks[b].attn.shape[1]
        wq_new, wk_new = new.qkv.weight[: h * ds], new.qkv.weight[h * ds : 2 * h * ds]
        # unbalanced fold: K rows are the dense kept rows untouched, all compensation sits in Q
        assert torch.equal(wk_new, ref.qkv.weight[hd : 2 * hd][rows])
        assert not torch.allclose(wq_new, ref.qkv.weight[:hd][rows])
        masked = copy.deepcopy(ref)
        masked.fused_attn = False  # timm's explicit softmax path: an independent reference for SDPA
        with torch.no_grad():
            w = masked.qkv.weight
            bias = masked.qkv.bias
            w[: 2 * hd] = 0
            bias[: 2 * hd] = 0
            w[rows] = wq_new
            w[hd + rows] = wk_new
            bias[rows] = new.qkv.bias[: h * ds]
            bias[hd + rows] = new.qkv.bias[h * ds : 2 * h * ds]
        x = dense_acts[b][0][:3]
        with torch.no_grad():
            y_masked = masked(x)
            y_new = new(x)
        # both use the ORIGINAL head_dim^-1/2 scale; a re-normalised scale would show up here
        assert new.scale == ref.scale == d**-0.5
        assert_close(y_new, y_masked, rtol=1e-10, atol=1e-12)
        # float32 too, as the model will usually run
        with torch.no_grad():
            assert_close(copy.deepcopy(new).float()(x.float()), copy.deepcopy(masked).float()(x.float()), rtol=1e-4, atol=1e-5)


def test_balanced_and_unbalanced_folds_give_the_same_logits(
    calibrated: tuple[nn.Module, list[Tensor], Statistics],
    dense_acts: dict[int, tuple[Tensor, Tensor, Tensor]],
    pruned_unbalanced: tuple[nn.Module, list[BlockMasks], list[dict]],
) -> None:
    dense, batches, stats = calibrated
    unbal, _, _ = pruned_unbalanced
    bal, _, _ = _prune(dense, stats, target="attn", attn_sparsity=0.5, qk_balanced=True)
    for b in MEASURED_BLOCKS:
        x = dense_acts[b][0][:3]
        ab, au = bal.blocks[b].attn, unbal.blocks[b].attn
        assert not torch.allclose(ab.qkv.weight, au.qkv.weight)  # different factorisations...
        qb, kb = _pruned_qk(ab, x)
        qu, ku = _pruned_qk(au, x)
        assert_close(qb @ kb.transpose(1, 2), qu @ ku.transpose(1, 2), rtol=1e-10, atol=1e-12)  # ...same logits
    with torch.no_grad():
        assert_close(bal(batches[0][:2]), unbal(batches[0][:2]), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------
# q/k norm layers (timm qk_norm=True)
# ---------------------------------------------------------------------------------------


class _HeadMap(nn.Module):
    """y[..., h, n, :] = A[h] @ x[..., h, n, :]: a per-head linear map after timm's q/k norm."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = a

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bhnd,hed->bhne", x, self.a)


def test_qk_norm_model_prunes_equals_masked_and_reloads(tmp_path: Path) -> None:
    kwargs = {"qk_norm": True, "depth": 2, "num_classes": 10}
    dense = random_model(**kwargs).double()
    with torch.no_grad():  # non-trivial norm affines, so "select after the norm" is really tested
        g = torch.Generator().manual_seed(3)
        for blk in dense.blocks:
            for norm in (blk.attn.q_norm, blk.attn.k_norm):
                assert isinstance(norm, nn.LayerNorm)
                norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g, dtype=torch.float64))
                norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=g, dtype=torch.float64))
    batches = _batches(6)
    stats = _stats(dense, batches)
    pruned, masks, report = _prune(dense, stats, target="both", mlp_sparsity=0.5, attn_sparsity=0.5, qk_balanced=False)
    acts = _capture(dense, (0, 1), batches)
    for b, blk in enumerate(pruned.blocks):
        attn = blk.attn
        assert isinstance(attn, QKNormPrunedAttention) and attn.qk_dim == 32
        ref = dense.blocks[b].attn
        x, q, k = acts[b]
        # the closed-form error holds with the norms in place (statistics are taken after them)
        qp, kp = _pruned_qk(attn, x)
        predicted = torch.tensor(report[b]["attn"]["predicted_logit_error_compensated"], dtype=torch.float64)
        assert_close(_all_pairs_error(q, k, qp, kp, attn.scale), predicted, rtol=1e-8, atol=0.0)
        # masked dense reference: full timm attention, norm, then a per-head map that is zero
        # on the pruned dims and carries the folded (I+M)^T on the kept ones
        h, d = ref.num_heads, ref.head_dim
        aq = torch.zeros(h, d, d, dtype=torch.float64)
        ak = torch.zeros(h, d, d, dtype=torch.float64)
        for head in range(h):
            aq[head, masks[b].attn[head]] = attn.q_out[head].detach()
            ak[head, masks[b].attn[head]] = attn.k_out[head].detach()
        eye_rows = torch.eye(d, dtype=torch.float64)[masks[b].attn]  # unbalanced: K just selects
        assert torch.equal(attn.k_out.detach(), eye_rows)
        masked = copy.deepcopy(ref)
        masked.fused_attn = False
        masked.q_norm = nn.Sequential(ref.q_norm, _HeadMap(aq))
        masked.k_norm = nn.Sequential(ref.k_norm, _HeadMap(ak))
        xb = x[:2]
        with torch.no_grad():
            assert_close(attn(xb), masked(xb), rtol=1e-10, atol=1e-12)

    model = copy.deepcopy(pruned).float()
    arch = architecture(adopt(model))
    assert all(blk.get("qk_norm") is True for blk in arch["blocks"])
    save_model(tmp_path, model)
    assert "stock_timm" not in read_pruned(tmp_path)[1]
    loaded = load_pruned(tmp_path)
    assert all(isinstance(blk.attn, QKNormPrunedAttention) for blk in loaded.blocks)
    x = batches[0].float()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_non_norm_architecture_records_no_qk_norm_field(
    pruned_unbalanced: tuple[nn.Module, list[BlockMasks], list[dict]],
) -> None:
    # checkpoints of models without q/k norms keep exactly the fields they always had
    arch = architecture(adopt(pruned_unbalanced[0]))
    assert all(set(b) == {"mlp_hidden", "qk_dim"} for b in arch["blocks"])


# ---------------------------------------------------------------------------------------
# through the CLI: joint pruning, fresh-process reload, stock timm
# ---------------------------------------------------------------------------------------


def _cli_prune(ckpt: Path, out: Path, target: str, *data: str) -> dict:
    data = data or ("--calib-data", "synthetic", "--samples", "4")
    args = ["prune", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), *data,
            "--target", target, "--sparsity", "0.5", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def joint_dir(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("joint") / "out"
    report = _cli_prune(tiny_ckpt, out, "both")
    for b in report["blocks"]:
        assert b["mlp"]["kept"] == 384 and b["attn"]["qk_kept"] == 32
    return out

@pytest.mark.slow

def test_joint_pruning_reloads_identically_in_a_fresh_process(joint_dir: Path, tmp_path: Path) -> None:
    model = load_pruned(joint_dir)
    assert all(isinstance(b.attn, QKPrunedAttention) and b.attn.qk_dim == 32 for b in model.blocks)
    assert all(b.mlp.fc1.out_features == 384 for b in model.blocks)
    x = calib_images(1, seed=5)
    with torch.no_grad():
        y = model(x)
    probe = tmp_path / "probe.safetensors"
    safetensors.torch.save_file({"x": x, "y": y}, str(probe))
    code = f"""
        import torch, corp_cli
        from safetensors.torch import load_file
        t = load_file({str(probe)!r})
        m = corp_cli.load_pruned({str(joint_dir)!r})
        assert [b.attn.qk_dim for b in m.blocks] == [32] * 12
        with torch.no_grad():
            y = m(t["x"])
        assert torch.equal(y, t["y"]), (y - t["y"]).abs().max().item()
        print("identical")
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "identical" in res.stdout


def test_stock_timm_refused_for_attention_pruned_model(joint_dir: Path) -> None:
    with pytest.raises(ArtifactError, match="stock timm"):
        load_pruned(joint_dir, stock_timm=True)


def test_mlp_only_uniform_pruning_loads_as_stock_timm(tiny_ckpt: Path, joint_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlp"
    _cli_prune(tiny_ckpt, out, "mlp", "--stats", str(joint_dir / "stats.safetensors"))  # no second calibration
    corp_model = load_pruned(out)
    stock = load_pruned(out, stock_timm=True)
    assert type(stock) is VisionTransformer
    assert all(type(b.attn) is Attention and b.mlp.fc1.out_features == 384 for b in stock.blocks)
    # the README one-liner, exactly: plain timm + plain safetensors, kwargs from the metadata
    entry = read_pruned(out)[1]["stock_timm"]
    kw = entry["kwargs"]
    assert set(kw) == {"mlp_ratio", "num_classes"} and kw["mlp_ratio"] == 2.0
    plain = timm.create_model(entry["model_name"], pretrained=False, mlp_ratio=kw["mlp_ratio"], num_classes=kw["num_classes"])
    plain.load_state_dict(safetensors.torch.load_file(str(out / MODEL_FILE)))
    plain.eval()
    x = calib_images(1, seed=7)
    with torch.no_grad():
        y = corp_model(x)
        assert torch.equal(stock(x), y)
        assert torch.equal(plain(x), y)

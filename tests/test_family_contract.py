"""The family contract, over every registered family (small random-init configs, built offline).

calibrate -> prune (MLP, and Q/K where the family allows it; and, where it allows them,
every part at once: MLP, Q/K, V/O dims and whole heads) -> compacted == masked numerically
-> save -> reload in a fresh process -> export -> reload without corp.

The masked reference is the dense model run with the removed hidden units replaced by the
affine prediction B h_S + c, the removed Q/K dims zeroed with the kept ones mixed by
(I + M), and the removed dims of the attention output o (V/O dims and whole heads) replaced
by their ridge prediction from the kept ones: the function the folded, narrower weights
must compute. It is built from the engine's own solves and the family's hooks, so it is the
same for every family.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import Tensor

from corp_cli import api
from corp_cli.calibration import as_batch
from corp_cli.compact import load_pruned_loaded
from corp_cli.family import Loaded
from corp_cli.registry import families
from corp_cli.pruning import supported_parts

from .conftest import masked_reference

transformers = pytest.importorskip("transformers")

SEQ = 12


def _images(n: int, size: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, max(2, size // 8), max(2, size // 8), generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _tokens(n: int, vocab: int, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[0, SEQ // 2:] = 0  # padding, which must not count
    return {"input_ids": ids, "attention_mask": mask}


def _timm(name: str, size: int, **kw: object) -> Callable[[Path], tuple[Loaded, list, dict]]:
    def make(_tmp: Path) -> tuple[Loaded, list, dict]:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, img_size=size, depth=2, num_classes=7, **kw).eval()
        x = _images(12, size)
        return api.adopt(model), [x[:6], x[6:]], {"pixel_values": _images(3, size, seed=9)}
    return make


def _bert(tmp: Path) -> tuple[Loaded, list, dict]:
    from corp_cli.loading import load_dense

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    folder = tmp / "bert"
    transformers.BertModel(cfg).save_pretrained(folder)
    return load_dense(folder), [_tokens(6, 200), _tokens(6, 200, seed=1)], _tokens(3, 200, seed=9)


def _hf_vit(tmp: Path) -> tuple[Loaded, list, dict]:
    from corp_cli.loading import load_dense

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4, num_labels=5)
    folder = tmp / "vit"
    transformers.ViTForImageClassification(cfg).save_pretrained(folder)
    x = _images(12, 16)
    return load_dense(folder), [x[:6], x[6:]], {"pixel_values": _images(3, 16, seed=9)}


def _decoder(tmp: Path) -> tuple[Loaded, list, dict]:
    """A Llama-layout decoder with grouped-query attention and a tied LM head (causal mask, right padding)."""
    from corp_cli.loading import load_dense

    from .conftest import tiny_decoder

    folder = tiny_decoder(tmp / "llama", "llama", tokenizer=False)
    return load_dense(folder), [_tokens(6, 512), _tokens(6, 512, seed=1)], _tokens(3, 512, seed=9)


# case id -> (family name, the dense model, calibration batches, check inputs)
CASES: dict[str, tuple[str, Callable[[Path], tuple[Loaded, list, dict]]]] = {
    "timm-vit": ("timm-vit", _timm("deit_tiny_patch16_224", 32)),
    "timm-vit-qknorm": ("timm-vit", _timm("vit_small_patch16_224", 32, qk_norm=True)),
    "timm-eva": ("timm-eva", _timm("eva02_tiny_patch14_224", 28)),
    "hf-bert": ("hf-bert", _bert),
    "hf-vit": ("hf-vit", _hf_vit),
    "hf-llama": ("hf-llama", _decoder),
}


# Families whose attention output (V/O dims, whole heads) corp prunes: checked with every part at once.
ALL_PARTS = "mlp,qk,vo,heads"
VO_CASES = ("timm-vit", "timm-vit-qknorm", "timm-eva", "hf-bert", "hf-vit", "hf-llama")
# where not every part applies (none today)
CASE_PARTS: dict[str, str] = {}


def test_every_registered_family_has_a_contract_case() -> None:
    assert {f.name for f in families()} <= {fam for fam, _ in CASES.values()}


def _params() -> list[tuple[str, str | None]]:
    return [(c, None) for c in sorted(CASES)] + [(c, CASE_PARTS.get(c, ALL_PARTS)) for c in VO_CASES]


def _outputs(loaded: Loaded, batch: dict) -> tuple[Tensor | None, Tensor]:
    with torch.inference_mode():
        out = loaded.family.outputs(loaded, batch)
    return out.logits, out.features


def test_families_refuse_what_they_cannot_prune_in_one_line(tmp_path: Path) -> None:
    """V/O and head pruning: the cases above cover every family that allows it; the rest refuse it by name."""
    for case, (family_name, make) in CASES.items():
        dense, _, _ = make(tmp_path / case)
        why = dense.family.vo_refusal(dense.model, 0)
        assert (why is None) == (case in VO_CASES), (case, why)
        if why is not None:
            assert "\n" not in why and "--target mlp" in why


@pytest.mark.slow
@pytest.mark.parametrize(("case", "target"), _params())
def test_family_contract(case: str, target: str | None, tmp_path: Path) -> None:
    family_name, make = CASES[case]
    dense, batches, check = make(tmp_path)
    dense.model.double()
    assert dense.family.name == family_name
    parts = (("mlp", "attn", "vo") if "qk" in target else ("mlp", "vo")) if target else None
    stats = api.calibrate(dense, [{k: v.double() if v.is_floating_point() else v for k, v in as_batch(b).items()}
                                  for b in batches], precision="float64", parts=parts)
    # on a copy; the default target is what the family allows
    result = api.prune(dense, stats, sparsity=0.5, **({"target": target} if target else {}))
    fam = dense.family
    check = {k: v.double() if v.is_floating_point() else v for k, v in check.items()}
    pruned_attn = any(m.attn is not None for m in result.masks)
    by_default = "attn" in supported_parts(fam, dense.model)  # rotary Q/K pairs: allowed, but asked for
    assert pruned_attn == (by_default or "qk" in (target or "")), "Q/K pruned exactly where the family allows it"
    widths = [fam.shape(dense.model, i).mlp_hidden for i in range(fam.num_blocks(dense.model))]
    assert [m.mlp.numel() for m in result.masks] == [w - w // 2 for w in widths]
    if target:
        shapes = [fam.shape(result.model, i) for i in range(2)]
        dense_shape = fam.shape(dense.model, 0)
        assert all(s.num_heads == dense_shape.num_heads - dense_shape.num_heads // 2 for s in shapes)
        half = dense_shape.head_dim - dense_shape.head_dim // 2
        assert all(s.v_dim == half and s.qk_dim == (half if "qk" in target else dense_shape.head_dim) for s in shapes)

    # compacted == masked, in float64: the narrower modules compute the masked, compensated function
    got_logits, got_feats = _outputs(result.loaded, check)
    ref_logits, ref_feats = _outputs(masked_reference(dense, result.masks, result.stats, result.blocks), check)
    torch.testing.assert_close(got_feats, ref_feats, rtol=1e-9, atol=1e-9)
    if ref_logits is not None:
        torch.testing.assert_close(got_logits, ref_logits, rtol=1e-9, atol=1e-9)
    dense_logits, dense_feats = _outputs(dense, check)
    assert float((got_feats - dense_feats).abs().max()) > 1e-6  # pruning changed the function: the check is not vacuous

    # save -> reload in a fresh process, from the checkpoint alone
    result.loaded.model.float()
    out = tmp_path / "pruned"
    api.save_pruned(result, out)
    with torch.inference_mode():
        expected = fam.forward(result.loaded.model, {k: v.float() if v.is_floating_point() else v for k, v in check.items()})
    expected_t = expected if isinstance(expected, Tensor) else (expected.logits if hasattr(expected, "logits") and
                                                                expected.logits is not None else expected[0])
    probe = tmp_path / "probe.safetensors"
    save_file({**{k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in check.items()},
               "expected": expected_t.float().contiguous()}, str(probe))
    code = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from corp_cli.compact import load_pruned_loaded\n"
        f"loaded = load_pruned_loaded({str(out)!r})\n"
        f"io = load_file({str(probe)!r})\n"
        "batch = {k: v for k, v in io.items() if k != 'expected'}\n"
        "with torch.inference_mode():\n"
        "    y = loaded.family.forward(loaded.model, batch)\n"
        "y = y if isinstance(y, torch.Tensor) else (y.logits if getattr(y, 'logits', None) is not None else y[0])\n"
        "sys.exit(0 if torch.allclose(y, io['expected'], rtol=0, atol=1e-6) else 3)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    again = load_pruned_loaded(out)
    assert again.family.name == family_name
    assert [again.family.shape(again.model, i) for i in range(2)] == [fam.shape(result.model, i) for i in range(2)]

    # export -> run with torch alone: no corp, timm or transformers in the process
    from corp_cli.export import export_model

    if target:  # ONNX too: the narrower attention must go through the exporter and onnxruntime
        pytest.importorskip("onnxruntime")
        onnx = export_model(out, "onnx", tmp_path / "model.onnx")
        assert onnx.max_abs_diff is not None and onnx.max_abs_diff < 1e-4
    exported = export_model(out, "torch-export", tmp_path / "model.pt2")
    names = [e["name"] for e in exported.inputs]
    code = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        f"io = load_file({str(probe)!r})\n"
        f"prog = torch.export.load({str(exported.path)!r}).module()\n"
        f"args = [io[n] for n in {json.dumps(['pixel_values' if n in ('image', 'pixel_values') else n for n in names])}]\n"
        "with torch.no_grad():\n"
        "    out = prog(*args)\n"
        "out = out if isinstance(out, torch.Tensor) else out[0]\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('corp_cli', 'timm', 'transformers'))\n"
        "assert not bad, bad\n"
        "print(list(out.shape))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])[0] == 3


# ---- sequential calibration: the residual stream between blocks (issue 24)


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_block_chained_is_the_trunk(case: str, tmp_path: Path) -> None:
    """stream_start then run_block over every block gives the last block's output in the model's own forward."""
    _, make = CASES[case]
    dense, batches, _ = make(tmp_path)
    fam, model = dense.family, dense.model.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in as_batch(batches[0]).items()}
    n = fam.num_blocks(model)
    seen: list[Tensor] = []
    handle = fam.block_module(model, n - 1).register_forward_hook(
        lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.inference_mode():
        fam.forward_trunk(model, batch)
        handle.remove()
        hidden, ctx = fam.stream_start(model, batch)
        for i in range(n):
            hidden = fam.run_block(model, i, hidden, ctx)
    torch.testing.assert_close(hidden, seen[0], rtol=0, atol=1e-12)
    assert float(seen[0].abs().max()) > 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_sublayer_hook_reads_the_residual_sum_y_enters(case: str, tmp_path: Path) -> None:
    """Adding delta to the projection's output y moves s by exactly gamma * delta (sublayer_scale)."""
    from corp_cli.errors import UnsupportedModelError

    _, make = CASES[case]
    dense, batches, _ = make(tmp_path)
    fam, model = dense.family, dense.model.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in as_batch(batches[0]).items()}
    checked = 0
    for part in ("mlp", "vo"):
        try:
            proj, _, _ = fam.sublayer_modules(model, 1, part)
        except UnsupportedModelError:
            assert part == "vo", f"{case}: the MLP's residual sum must be known"
            continue
        got: dict[float, tuple[Tensor, Tensor]] = {}
        for eps in (0.0, 0.25):
            delta = proj.register_forward_hook(lambda _m, _a, out, eps=eps: out + eps * torch.ones_like(out))
            hooks = fam.sublayer_hook(model, 1, part, lambda y, s, eps=eps: got.__setitem__(eps, (y.clone(), s.clone())))
            try:
                with torch.inference_mode():
                    fam.forward_trunk(model, batch)
            finally:
                for h in [delta, *hooks]:
                    h.remove()
        (y0, s0), (y1, s1) = got[0.0], got[0.25]
        gamma = fam.sublayer_scale(model, 1, part)
        torch.testing.assert_close(y1 - y0, torch.full_like(y0, 0.25), rtol=0, atol=1e-10)
        torch.testing.assert_close(s1 - s0, 0.25 * (gamma if gamma is not None else 1.0) * torch.ones_like(s0),
                                   rtol=0, atol=1e-10)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize(("case", "target"), _params())
def test_sequential_prune_on_every_family(case: str, target: str | None, tmp_path: Path) -> None:
    """prune(sequential=True) through the family's stream methods: the dense target's predicted error is the error
    measured on the stream (pre-norm blocks, where the MLP's residual sum is the block output), and the
    compacted checkpoint reloads to the same function."""
    _, make = CASES[case]
    dense, batches, check = make(tmp_path)
    dense.model.double()
    data = [{k: v.double() if v.is_floating_point() else v for k, v in as_batch(b).items()} for b in batches]
    result = api.prune(dense, sequential=True, data=data, precision="float64", sparsity=0.5,
                       **({"target": target} if target else {}))
    fam = dense.family
    for e in result.blocks:
        pred, meas = e["mlp"]["predicted_error_compensated"], e["sequential"]["measured_stream_error"]
        if case != "hf-bert" and fam.sublayer_scale(dense.model, e["block"], "mlp") is None:
            assert abs(pred - meas) <= 1e-8 * max(meas, 1e-12), (e["block"], pred, meas)
    check = {k: v.double() if v.is_floating_point() else v for k, v in check.items()}
    got_logits, got_feats = _outputs(result.loaded, check)
    _, dense_feats = _outputs(dense, check)
    assert float((got_feats - dense_feats).abs().max()) > 1e-6
    result.loaded.model.float()
    out = tmp_path / "pruned"
    api.save_pruned(result, out)
    again = load_pruned_loaded(out)
    fcheck = {k: v.float() if v.is_floating_point() else v for k, v in check.items()}
    a_logits, a_feats = _outputs(again, fcheck)
    b_logits, b_feats = _outputs(result.loaded, fcheck)
    torch.testing.assert_close(a_feats, b_feats, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequential_flops_budget_on_every_family(case: str, tmp_path: Path) -> None:
    """prune(sequential=True, flops_budget=F) with every part the family prunes: the pruned model's FLOPs lie
    below F and no farther below it than BUDGET_TOLERANCE or, where the allowed widths are too coarse for that
    (the tiny BERT), than the one-shot allocation (rotary pairs, grouped-query heads and post-norm blocks included)."""
    from corp_cli.allocation import BUDGET_TOLERANCE

    _, make = CASES[case]
    dense, batches, _ = make(tmp_path)
    dense.model.double()
    data = [{k: v.double() if v.is_floating_point() else v for k, v in as_batch(b).items()} for b in batches]
    target = CASE_PARTS.get(case, ALL_PARTS) if case in VO_CASES else None
    result = api.prune(dense, sequential=True, data=data, precision="float64", flops_budget=0.7, round_to=1,
                       **({"target": target} if target else {}))
    ratio = result.after["flops"] / result.before["flops"]
    one = api.prune(dense, api.calibrate(dense, data, precision="float64", parts=("mlp", "attn", "vo")),
                    flops_budget=0.7, round_to=1, **({"target": target} if target else {}))
    low = min((1 - BUDGET_TOLERANCE) * 0.7, one.allocation["flops_ratio"] - BUDGET_TOLERANCE * 0.7)
    assert low <= ratio <= 0.7, (ratio, one.allocation["flops_ratio"])
    assert result.allocation is not None and result.allocation["flops_ratio"] == ratio

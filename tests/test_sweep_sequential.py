"""`corp sweep --sequential`: every point re-calibrated block by block; the no-compensation arm on the same masks;
FLOPs budgets with the one-shot budget sweep's arms, each pruned sequentially; the dense ranking."""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from corp_cli import api
from corp_cli.cli import app
from corp_cli.pruning import PruneOptions, apply_masks
from corp_cli.allocation import uniform_sparsity
from corp_cli.pruning import PART_SPARSITY
from corp_cli.sweep import SEQUENTIAL_NOTE, run_sequential_budget_sweep, run_sequential_sweep

from .conftest import STORIES, STORIES260K, adopt
from .test_cli_chain import _folder as _images

runner = CliRunner()
ARGS = ("--model-arg", "img_size=32", "--model-arg", "depth=2", "--model-arg", "num_classes=5")


def _ckpt(root: Path) -> Path:
    torch.manual_seed(0)
    path = root / "dense.safetensors"
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)
    save_file(m.state_dict(), str(path))
    return path


def test_cli_sequential_sweep_two_points(tmp_path: Path) -> None:
    ckpt, imgs, out = _ckpt(tmp_path), _images(tmp_path / "imgs"), tmp_path / "sweep"
    res = runner.invoke(app, [
        "sweep", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), *ARGS, "--sequential",
        "--sequential-target", "dense", "--calib-data", str(imgs), "--calib-samples", "6", "--sparsities", "0.25,0.5",
        "--target", "both", "--data", "synthetic", "--samples", "4", "--batch-size", "4", "--workers", "0",
        "--out", str(out),
    ])
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert res.stderr.splitlines().count(SEQUENTIAL_NOTE) == 1  # said once, on one line
    rep = json.loads((out / "sweep.json").read_text())
    assert rep["sequential"]["target"] == "dense" and rep["sequential"]["recalibrated_per_point"] is True
    assert rep["sequential"]["calib_data"]["count"] == 6 and rep["stats"] is None
    assert rep["sparsities"] == [0.25, 0.5] and len(rep["points"]) == 4
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["sparsity"], r["arm"]) for r in rows] == [
        ("0.0", "dense"), ("0.25", "corp"), ("0.25", "no-compensation"), ("0.5", "corp"), ("0.5", "no-compensation"),
    ]
    by = {(r["sparsity"], r["arm"]): r for r in rows}
    for s in ("0.25", "0.5"):  # same masks, so the same FLOPs; the correction changes the outputs
        assert by[(s, "corp")]["flops_per_item"] == by[(s, "no-compensation")]["flops_per_item"]
        assert by[(s, "corp")]["kl_mean"] != by[(s, "no-compensation")]["kl_mean"]
    assert int(by[("0.5", "corp")]["flops_per_item"]) < int(by[("0.25", "corp")]["flops_per_item"])


def test_sequential_sweep_points_are_the_sequential_prune_and_its_masks_uncompensated(tmp_path: Path) -> None:
    """Each corp point is exactly api.prune(sequential=True); the other arm is those masks with no correction."""
    torch.manual_seed(0)
    dense = adopt(timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                                    num_classes=5).eval())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calib = [x[:4], x[4:]]
    probe = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen: list[tuple[bool, torch.Tensor]] = []

    class Probe:
        metric = "top1_agreement"
        progress = None

        def __call__(self, loaded, *, dense):  # type: ignore[no-untyped-def]
            with torch.inference_mode():
                seen.append((dense, loaded.model(probe)))
            return {"top1_agreement": 1.0}, 0.0

    base = PruneOptions(target="both")
    before = copy.deepcopy(dense.model.state_dict())
    _, rows = run_sequential_sweep(dense, calib, [0.5], base, Probe(), target="self")
    assert [r["arm"] for r in rows] == ["corp", "no-compensation"]
    assert all(torch.equal(v, dense.model.state_dict()[k]) for k, v in before.items())  # the dense model untouched
    opts = replace(base, mlp_sparsity=0.5, attn_sparsity=0.5, vo_sparsity=0.5, head_sparsity=0.5)
    ref = api.prune(dense, options=opts, sequential=True, sequential_target="self", data=calib)
    with torch.inference_mode():
        torch.testing.assert_close(seen[1][1], ref.loaded.model(probe), rtol=0, atol=0)
        plain = copy.deepcopy(dense.model)
        apply_masks(plain, ref.stats, ref.masks, replace(opts, compensation=False), family=dense.family)
        torch.testing.assert_close(seen[2][1], plain(probe), rtol=0, atol=0)
    assert not torch.equal(seen[1][1], seen[2][1])


class _Keep:
    """A Measure keeping every scored model's weights and its outputs on a probe batch."""

    metric = "top1_agreement"
    progress = None

    def __init__(self) -> None:
        self.probe = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        self.seen: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []

    def __call__(self, loaded, *, dense):  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            self.seen.append(({k: v.clone() for k, v in loaded.model.state_dict().items()}, loaded.model(self.probe)))
        return {"top1_agreement": 1.0}, 0.0


def _same_model(seen: tuple[dict[str, torch.Tensor], torch.Tensor], model: torch.nn.Module, probe: torch.Tensor) -> None:
    """The scored model is `model` exactly: every weight (so every kept width and unit) and the outputs."""
    state, y = seen
    ref = model.state_dict()
    assert state.keys() == ref.keys()
    bad = [(k, state[k].shape, ref[k].shape) for k in ref if state[k].shape != ref[k].shape or not torch.equal(state[k], ref[k])]
    assert not bad, bad
    with torch.inference_mode():
        assert torch.equal(y, model(probe))


def _tiny_loaded():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    dense = adopt(timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                                    num_classes=5).eval())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return dense, [x[:4], x[4:]]


def test_sequential_budget_sweep_arms_are_the_sequential_prunes_of_the_budget_and_of_the_uniform_sparsity() -> None:
    """allocated == api.prune(sequential, flops_budget); uniform == api.prune(sequential) at the uniform sparsity of
    the FLOPs the allocation reached (found from the shapes, as the one-shot budget sweep finds it); no-compensation
    == the allocated masks with no correction. The budget holds and the uniform arm gets no more FLOPs. (The self
    target keeps it fast; the CLI test below runs the default, blend.)"""
    target = "self"
    dense, calib = _tiny_loaded()
    keep = _Keep()
    base = PruneOptions(target="both")
    before = copy.deepcopy(dense.model.state_dict())
    dense_row, rows = run_sequential_budget_sweep(dense, calib, [0.6], base, keep, target=target)
    assert [r["arm"] for r in rows] == ["allocated", "no-compensation", "uniform"]
    assert all(r["flops_budget"] == 0.6 for r in rows)
    assert all(torch.equal(v, dense.model.state_dict()[k]) for k, v in before.items())  # the dense model untouched
    alloc, plain, uni = rows
    dense_flops = dense_row["flops_per_item"]
    assert alloc["flops_per_item"] / dense_flops <= 0.6 and uni["flops_per_item"] <= alloc["flops_per_item"]
    assert plain["flops_per_item"] == alloc["flops_per_item"] and alloc["sparsity"] is None
    ref = api.prune(dense, options=replace(base, flops_budget=0.6), sequential=True, sequential_target=target,
                    data=calib)
    assert ref.allocation is not None and alloc["allocation"] == ref.allocation
    assert ref.allocation["flops_ratio"] == alloc["flops_per_item"] / dense_flops
    assert len({b["mlp"]["kept"] for b in ref.allocation["blocks"]}) > 1  # the allocator moved widths between blocks
    _same_model(keep.seen[1], ref.loaded.model, keep.probe)
    s, _ = uniform_sparsity(dense.family, dense.model, base, ref.allocation["flops_ratio"])
    assert uni["sparsity"] == s and 0 < s < 1
    ref_uni = api.prune(dense, options=replace(base, **{PART_SPARSITY[p]: s for p in base.parts}), sequential=True,
                        sequential_target=target, data=calib)
    _same_model(keep.seen[3], ref_uni.loaded.model, keep.probe)
    unfit = copy.deepcopy(dense.model)
    apply_masks(unfit, ref.stats, ref.masks, replace(base, compensation=False), family=dense.family)
    _same_model(keep.seen[2], unfit, keep.probe)
    assert not torch.equal(keep.seen[1][1], keep.seen[2][1])  # the correction changed the outputs


def test_sequential_sweep_dense_ranking_is_the_sequential_prune_with_dense_ranking() -> None:
    dense, calib = _tiny_loaded()
    keep = _Keep()
    base = PruneOptions(target="both")
    _, rows = run_sequential_sweep(dense, calib, [0.5], base, keep, target="self", ranking="dense")
    assert [r["arm"] for r in rows] == ["corp", "no-compensation"]
    opts = replace(base, mlp_sparsity=0.5, attn_sparsity=0.5, vo_sparsity=0.5, head_sparsity=0.5)
    ref = api.prune(dense, options=opts, sequential=True, sequential_target="self", sequential_ranking="dense",
                    data=calib)
    _same_model(keep.seen[1], ref.loaded.model, keep.probe)
    stream = api.prune(dense, options=opts, sequential=True, sequential_target="self", data=calib)
    # the ranking mattered here: the stream's units differ from the dense statistics' in some block
    assert any(not torch.equal(a.mlp, b.mlp) or not torch.equal(a.attn, b.attn) for a, b in zip(ref.masks, stream.masks))
    unfit = copy.deepcopy(dense.model)
    apply_masks(unfit, ref.stats, ref.masks, replace(opts, compensation=False), family=dense.family)
    _same_model(keep.seen[2], unfit, keep.probe)


def test_cli_sequential_sweep_dense_ranking_takes_the_one_shot_units(tmp_path: Path) -> None:
    """The CLI chain: with --sequential-ranking dense the units are the one-shot planner's on the dense statistics,
    so the no-compensation row is the one-shot sweep's (statistics from `corp calibrate` on the same images and
    batches), and the correction the sequential fit's."""
    ckpt, imgs = _ckpt(tmp_path), _images(tmp_path / "imgs")
    load = ["deit_tiny_patch16_224", "--checkpoint", str(ckpt), *ARGS]
    common = ["--sparsities", "0.5", "--target", "both", "--data", "synthetic", "--samples", "4", "--batch-size", "4",
              "--workers", "0"]
    cal = runner.invoke(app, ["calibrate", *load, "--data", str(imgs), "--samples", "6", "--batch-size", "4",
                              "--workers", "0", "--out", str(tmp_path / "stats.safetensors")])
    assert cal.exit_code == 0, (cal.stderr, cal.exception)
    one = runner.invoke(app, ["sweep", *load, "--stats", str(tmp_path / "stats.safetensors"), *common,
                              "--out", str(tmp_path / "one"), "--json", "-"])
    seq = runner.invoke(app, ["sweep", *load, "--sequential", "--sequential-ranking", "dense", "--sequential-target",
                              "self", "--calib-data", str(imgs), "--calib-samples", "6", *common,
                              "--out", str(tmp_path / "seq"), "--json", "-"])
    assert one.exit_code == 0 and seq.exit_code == 0, (one.stderr, seq.stderr, seq.exception)
    a, b = json.loads(one.stdout), json.loads(seq.stdout)
    assert b["sequential"]["ranking"] == "dense"
    ua, ub = ({p["arm"]: p for p in r["points"]} for r in (a, b))
    fields = ("kl_mean", "feature_cosine_mean", "params", "flops_per_item")
    assert [ua["no-compensation"][f] for f in fields] == [ub["no-compensation"][f] for f in fields]
    assert ub["corp"]["kl_mean"] != ua["corp"]["kl_mean"]  # the sequential fit, not the one-shot one


@pytest.mark.slow
def test_cli_sequential_budget_sweep_is_corp_prune_sequential_flops_budget(tmp_path: Path) -> None:
    """The CLI chain: the allocated row is what `corp prune --sequential --flops-budget` writes (same calibration
    subset, batches and target): the same params, FLOPs and allocation, block by block."""
    ckpt, imgs = _ckpt(tmp_path), _images(tmp_path / "imgs")
    load = ["deit_tiny_patch16_224", "--checkpoint", str(ckpt), *ARGS]
    calib = ["--calib-data", str(imgs), "--batch-size", "4", "--workers", "0", "--sequential",
             "--sequential-target", "blend", "--target", "both"]
    res = runner.invoke(app, ["sweep", *load, *calib, "--calib-samples", "6", "--flops-budgets", "0.6",
                              "--data", "synthetic", "--samples", "4", "--out", str(tmp_path / "sweep")])
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "no comp." in res.stdout  # the third arm's column
    rep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert rep["flops_budgets"] == [0.6] and rep["sequential"]["ranking"] == "stream"
    by = {r["arm"]: r for r in rep["points"]}
    assert set(by) == {"allocated", "uniform", "no-compensation"}
    rows = list(csv.DictReader((tmp_path / "sweep" / "sweep.csv").open()))
    assert [(r["arm"], r["flops_budget"]) for r in rows] == [
        ("dense", ""), ("allocated", "0.6"), ("no-compensation", "0.6"), ("uniform", "0.6")]
    pr = runner.invoke(app, ["prune", *load, *calib, "--samples", "6", "--flops-budget", "0.6",
                             "--out", str(tmp_path / "pruned")])
    assert pr.exit_code == 0, (pr.stderr, pr.exception)
    report = json.loads((tmp_path / "pruned" / "report.json").read_text())
    a = by["allocated"]
    assert report["allocation"]["flops_ratio"] <= 0.6
    assert (report["totals"]["params_after"], report["totals"]["flops_after"]) == (a["params"], a["flops_per_item"])
    assert a["allocation"] == report["allocation"]  # every block's widths and predicted errors


def _one_line(res) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    return lines[0]


def test_sequential_sweep_refusals_in_one_line(tmp_path: Path) -> None:
    st = tmp_path / "stats.safetensors"
    st.write_bytes(b"")
    base = ["sweep", "deit_tiny_patch16_224", "--data", "synthetic", "--out", str(tmp_path / "o")]
    assert "cannot be sequential" in _one_line(runner.invoke(app, [*base, "--stats", str(st), "--sequential",
                                                                      "--calib-data", "synthetic"]))
    assert "needs --calib-data" in _one_line(runner.invoke(app, [*base, "--sequential"]))
    assert "--sequential only" in _one_line(runner.invoke(app, [*base, "--stats", str(st),
                                                               "--sequential-target", "self"]))
    assert "with a budget" in _one_line(runner.invoke(app, [*base, "--sequential", "--calib-data", "synthetic",
                                                           "--flops-budgets", "0.8", "--sequential-ranking", "dense"]))
    assert "--sequential-ranking apply with --sequential only" in _one_line(
        runner.invoke(app, [*base, "--stats", str(st), "--sequential-ranking", "dense"]))
    assert "--sequential-ranking must be one of" in _one_line(
        runner.invoke(app, [*base, "--sequential", "--calib-data", "synthetic", "--sequential-ranking", "nope"]))
    assert "--sequential-target" in _one_line(runner.invoke(app, [*base, "--sequential", "--calib-data", "synthetic",
                                                                 "--sequential-target", "nope"]))
    assert "needs --stats" in _one_line(runner.invoke(app, base))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.skipif(not STORIES260K.is_dir(), reason="needs the shared llama-stories260k")
def test_cli_sequential_sweep_on_a_language_model(tmp_path: Path) -> None:
    """Text calibration streamed per point; perplexity rows for both arms, the correction lowering it."""
    res = runner.invoke(app, [
        "sweep", str(STORIES260K), "--sequential", "--calib-data", f"text:{STORIES}@calib", "--calib-samples", "16",
        "--target", "mlp", "--sparsities", "0.3", "--data", f"text:{STORIES}@eval", "--samples", "16",
        "--out", str(tmp_path / "sweep"), "--json", "-",
    ])
    assert res.exit_code == 0, (res.stderr, res.exception)
    rep = json.loads(res.stdout)
    assert rep["metric"] == "perplexity" and rep["sequential"]["calib_data"]["count"] == 16
    ppl = {p["arm"]: p["perplexity"] for p in rep["points"]}
    assert rep["dense"]["perplexity"] < ppl["corp"] < ppl["no-compensation"]

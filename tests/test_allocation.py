"""--flops-budget: errors for every width from one factorisation, the allocation under a budget, its records."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from corp_cli import api, engine
from corp_cli.allocation import allocate, allowed_widths, uniform_sparsity
from corp_cli.cli import app
from corp_cli.errors import InputError
from corp_cli.flops import model_counts
from corp_cli.pruning import PruneOptions
from corp_cli.stats import Statistics

from .conftest import calib_images, random_model

runner = CliRunner()
MODEL = "deit_tiny_patch16_224"


def _moments(d: int = 24, n: int = 400, seed: int = 0) -> tuple[torch.Tensor, engine.Moments]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    h = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + torch.randn(d, generator=g, dtype=torch.float64)
    st = {"count": torch.tensor([n]), "sum": h.sum(0), "gram": h.T @ h}
    return torch.randn(7, d, generator=g, dtype=torch.float64), engine.mlp_moments(st)


def test_prefix_errors_are_the_solved_errors_of_every_prefix() -> None:
    w, m = _moments()
    order = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    lam = 1e-9 * float(torch.trace(m.cov))
    comp = engine.prefix_errors(w, m, order, lam)
    none = engine.prefix_errors(w, m, order, lam, compensated=False)
    assert comp.shape == (25,) and float(comp[24]) == 0.0 and float(none[24]) == 0.0
    for p in (0, 1, 5, 12, 23):
        keep, prune = torch.sort(order[:p]).values, torch.sort(order[p:]).values
        sol = engine.ridge_compensation(m, keep, prune, lam) if p else None
        b = sol.b if sol is not None else torch.zeros(24 - p, 0, dtype=torch.float64)
        # equal up to the lam B B^T term the one factorisation leaves out (lam is tiny here)
        assert float(comp[p]) == pytest.approx(engine.mlp_predicted_error(w, m, keep, prune, b), rel=1e-4, abs=1e-9)
        assert float(none[p]) == pytest.approx(engine.mlp_predicted_error(w, m, keep, prune, None), rel=1e-9)
    assert bool((comp[:-1] <= none[:-1] + 1e-9).all())  # compensation never hurts, at every width


def test_allocate_budget_finds_the_optimum_of_convex_problems() -> None:
    """Convex decreasing errors at equal step costs: the brute-force optimum (Lagrangian + greedy fill are exact)."""
    g = torch.Generator().manual_seed(0)
    menus = []
    for _ in range(3):
        steps = torch.sort(torch.rand(6, generator=g, dtype=torch.float64), descending=True).values
        err = torch.cat([steps.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])  # convex, decreasing
        menus.append(engine.Menu(err, torch.arange(7, dtype=torch.float64)))
    groups = [[engine.Alternative(0.0, 0.0, [m])] for m in menus]
    for budget in (0.0, 3.0, 7.5, 11.0, 18.0):
        picks = engine.allocate_budget(groups, budget)
        ks = [p[1][0] for p in picks]
        assert sum(ks) <= budget
        best = min(sum(float(m.err[k]) for m, k in zip(menus, c))
                   for c in itertools.product(range(7), repeat=3) if sum(c) <= budget)
        assert sum(float(m.err[k]) for m, k in zip(menus, ks)) == pytest.approx(best)
    with pytest.raises(ValueError, match="budget"):
        engine.allocate_budget(groups, -1.0)


def test_allocate_budget_chooses_among_alternatives() -> None:
    """Alternatives (head counts) carry a fixed cost and their own menus; the cheaper one wins when it must."""
    cheap = engine.Alternative(5.0, 0.0, [engine.Menu(torch.tensor([2.0, 0.0], dtype=torch.float64),
                                                      torch.tensor([0.0, 1.0], dtype=torch.float64))])
    dear = engine.Alternative(0.0, 10.0, [engine.Menu(torch.tensor([2.0, 0.0], dtype=torch.float64),
                                                      torch.tensor([0.0, 1.0], dtype=torch.float64))])
    assert engine.allocate_budget([[cheap, dear]], 11.0) == [(1, [1])]
    assert engine.allocate_budget([[cheap, dear]], 10.5) == [(1, [0])]
    assert engine.allocate_budget([[cheap, dear]], 9.0) == [(0, [1])]


@pytest.fixture(scope="module")
def dense() -> torch.nn.Module:
    return random_model(depth=4, img_size=64)


@pytest.fixture(scope="module")
def stats(dense: torch.nn.Module) -> Statistics:
    x = calib_images(32, size=64)
    return api.calibrate(dense, [x[:16], x[16:]], parts=("mlp", "attn", "vo"))


@pytest.mark.parametrize("target", ["both", "all", "mlp,qk,vo,heads", "mlp,heads", "vo"])
@pytest.mark.parametrize("budget", [0.85, 0.6])
def test_the_budget_is_met_within_one_percent_and_the_counter_agrees(
    dense: torch.nn.Module, stats: Statistics, target: str, budget: float,
) -> None:
    opts = PruneOptions(target=target, flops_budget=budget)
    fam = api.adopt(dense).family
    if target == "vo":  # V/O alone cannot reach 0.6 of a model's FLOPs: said in one line
        reach = 1 - sum(model_counts(dense)["per_block"][i]["attn"] for i in range(4)) / model_counts(dense)["flops"]
        if budget < reach:
            with pytest.raises(InputError, match="--flops-budget"):
                allocate(fam, dense, stats, opts)
            return
    alloc = allocate(fam, dense, stats, opts)
    dense_flops = model_counts(dense)["flops"]
    assert (1 - 0.01) * budget * dense_flops <= alloc.flops <= budget * dense_flops
    result = api.prune(dense, stats, options=opts)
    assert result.after["flops"] == alloc.flops  # the allocation's FLOPs are the pruned model's
    parts = {"mlp": "mlp", "qk": "attn", "vo": "vo", "heads": "heads"}
    for w, m in zip(alloc.widths, result.masks):
        for part, kept in w.items():
            mask = getattr(m, parts[part])
            assert mask is not None and (mask.numel() if part in ("mlp", "heads") else mask.shape[1]) == kept
    blocks = result.report()["allocation"]["blocks"]
    assert len(blocks) == 4 and all(set(b) >= {"block", "flops"} for b in blocks)
    for b in blocks:
        for part in opts.parts:
            assert b[part]["kept"] <= b[part]["width"]
    errs = [b[p].get("predicted_error", b[p].get("predicted_logit_error")) for b in blocks for p in opts.parts]
    assert all(e is None or e >= 0 for e in errs)


def test_floors_and_rounding_are_honoured(dense: torch.nn.Module, stats: Statistics) -> None:
    opts = PruneOptions(target="both", flops_budget=0.55, round_to=32, min_keep=96, min_qk_dim=24)
    alloc = allocate(api.adopt(dense).family, dense, stats, opts)
    for b in alloc.blocks:
        k = b["mlp"]["kept"]
        assert k >= 96 and (k % 32 == 0 or k == 768), k
        assert b["qk"]["kept"] >= 24
    assert alloc.flops <= 0.55 * alloc.dense_flops
    assert allowed_widths("qk", api.adopt(dense).family.shape(dense, 0), opts)[0] == 24


def test_uniform_sparsity_matches_the_pruned_model(dense: torch.nn.Module, stats: Statistics) -> None:
    fam = api.adopt(dense).family
    s, ratio = uniform_sparsity(fam, dense, PruneOptions(target="all"), 0.7)
    assert ratio <= 0.7
    result = api.prune(dense, stats, target="all", sparsity=s)
    assert result.after["flops"] / result.before["flops"] == pytest.approx(ratio)
    with pytest.raises(InputError, match="cannot reach"):
        uniform_sparsity(fam, dense, PruneOptions(target="attn"), 0.3)


@pytest.mark.slow
def test_prune_cli_prints_and_records_the_allocation_and_masks_reapply_it(tmp_path: Path, tiny_ckpt: Path) -> None:
    stats = tmp_path / "stats.safetensors"
    common = ["--checkpoint", str(tiny_ckpt)]
    res = runner.invoke(app, ["calibrate", MODEL, *common, "--data", "synthetic", "--samples", "4", "--batch-size", "4",
                              "--parts", "mlp,attn,vo", "--out", str(stats)])
    assert res.exit_code == 0, res.output
    out, again = tmp_path / "p", tmp_path / "q"
    res = runner.invoke(app, ["prune", MODEL, *common, "--stats", str(stats), "--target", "all", "--flops-budget", "0.6",
                              "--round-to", "16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "--flops-budget 0.6" in res.output and "vo kept" in res.output and "pred. err" in res.output
    report = json.loads((out / "report.json").read_text())
    alloc = report["allocation"]
    assert 0.594 <= alloc["flops_ratio"] <= 0.6 and report["options"]["flops_budget"] == 0.6
    assert report["totals"]["flops_after"] == alloc["flops"]
    assert [b["mlp"]["kept"] % 16 for b in alloc["blocks"]] == [0] * 12
    from corp_cli.masks import load_masks

    assert load_masks(out / "masks.safetensors")[1]["allocation"] == alloc["blocks"]
    res = runner.invoke(app, ["prune", MODEL, *common, "--stats", str(stats), "--masks", str(out / "masks.safetensors"),
                              "--out", str(again)])
    assert res.exit_code == 0, res.output
    a, b = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rep2 = json.loads((again / "report.json").read_text())
    assert rep2["totals"]["flops_after"] == report["totals"]["flops_after"]
    assert rep2["options"]["flops_budget"] == 0.6  # what chose the masks, as the masks file recorded it
    # what a budget chooses cannot also be given
    res = runner.invoke(app, ["prune", MODEL, *common, "--stats", str(stats), "--flops-budget", "0.6", "--sparsity", "0.3",
                              "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--sparsity" in res.stderr


@pytest.mark.slow
def test_sweep_over_flops_budgets_scores_both_arms_at_equal_flops(tmp_path: Path, tiny_ckpt: Path) -> None:
    stats = tmp_path / "stats.safetensors"
    common = ["--checkpoint", str(tiny_ckpt)]
    res = runner.invoke(app, ["calibrate", MODEL, *common, "--data", "synthetic", "--samples", "4", "--batch-size", "4",
                              "--parts", "mlp,attn,vo", "--out", str(stats)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "sweep"
    res = runner.invoke(app, ["sweep", MODEL, *common, "--stats", str(stats), "--data", "synthetic", "--samples", "3",
                              "--batch-size", "3", "--workers", "0", "--target", "all", "--flops-budgets", "0.8,0.6",
                              "--out", str(out), "--json", "-"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "sweep.json").read_text())
    assert rep["flops_budgets"] == [0.8, 0.6] and rep["metric"] == "top1_agreement"
    dense = rep["dense"]["flops_per_item"]
    for budget in (0.8, 0.6):
        arms = {r["arm"]: r for r in rep["points"] if r["flops_budget"] == budget}
        assert set(arms) == {"allocated", "uniform"}
        assert arms["uniform"]["flops_per_item"] <= arms["allocated"]["flops_per_item"] <= budget * dense
        assert arms["allocated"]["flops_per_item"] >= 0.99 * budget * dense
        assert 0 < arms["uniform"]["sparsity"] < 1
    csv = (out / "sweep.csv").read_text().splitlines()
    assert csv[0].endswith(",flops_budget") and len(csv) == 6  # header, dense, 2 budgets x 2 arms
    assert (out / "sweep.png").is_file()
    res = runner.invoke(app, ["sweep", MODEL, *common, "--stats", str(stats), "--data", "synthetic", "--flops-budgets",
                              "0.8", "--sparsities", "0.5", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--flops-budgets" in res.stderr

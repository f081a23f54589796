"""Value/output dims and whole heads: targets, statistics, the closed-form error, masks, the CLI chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from corp_cli import api, engine
from corp_cli.cli import app
from corp_cli.errors import ArtifactError, InputError
from corp_cli.pruning import PruneOptions, parse_target
from corp_cli.stats import Statistics, merge

from .conftest import calib_images, random_model

runner = CliRunner()
MODEL = "deit_tiny_patch16_224"
ALL4 = "mlp,qk,vo,heads"


def test_targets_are_part_sets_written_as_the_old_names_where_they_fit() -> None:
    assert parse_target("attn") == ("qk",) and parse_target("both") == ("mlp", "qk")
    assert parse_target("all") == ("mlp", "qk", "vo")
    assert parse_target(" heads, vo ,mlp") == ("mlp", "vo", "heads")
    assert PruneOptions(target="qk,mlp").target == "both"
    assert PruneOptions(target="qk").target == "attn"
    assert PruneOptions(target="all").target == "mlp,qk,vo"
    assert PruneOptions(target="all,heads").target == ALL4
    for bad in ("", "mlp,hedas", ",", "MLP"):
        with pytest.raises(InputError, match="--target"):
            PruneOptions(target=bad)


def test_records_of_runs_without_the_new_options_keep_their_keys() -> None:
    """Masks, checkpoints and reports of mlp/qk runs must not change: the new fields appear only where used."""
    legacy = {"target", "mlp_sparsity", "attn_sparsity", "ranker", "qk_ranker", "lam", "compensation", "round_to",
              "min_keep", "min_qk_dim", "qk_balanced", "block_overrides"}
    for target in ("mlp", "attn", "both"):
        assert set(PruneOptions(target=target).to_dict()) == legacy
    assert set(PruneOptions(target="all").to_dict()) == legacy | {"vo_sparsity", "vo_ranker"}
    assert set(PruneOptions(target="heads", flops_budget=0.5).to_dict()) == legacy | {
        "head_sparsity", "head_ranker", "flops_budget"}
    again = PruneOptions.from_dict(PruneOptions(target=ALL4, flops_budget=0.5).to_dict())
    assert again == PruneOptions(target=ALL4, flops_budget=0.5)
    with pytest.raises(InputError, match="--flops-budget"):
        PruneOptions(flops_budget=1.0)
    with pytest.raises(InputError, match="overrides"):
        PruneOptions(flops_budget=0.5, block_overrides={0: {"mlp_sparsity": 0.1}})


@pytest.fixture(scope="module")
def dense() -> torch.nn.Module:
    return random_model(depth=2, img_size=64).double()


@pytest.fixture(scope="module")
def stats(dense: torch.nn.Module) -> Statistics:
    x = calib_images(48, size=64).double()
    return api.calibrate(dense, [x[:24], x[24:]], parts=("mlp", "attn", "vo"), precision="float64")


def _attn_out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Block 0's attention output (its input is the same for the dense and the pruned model)."""
    seen: list[torch.Tensor] = []
    h = model.blocks[0].attn.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


@pytest.mark.parametrize("target", ["vo", "heads", "vo,heads"])
def test_predicted_error_is_the_measured_error_and_compensation_never_hurts(
    dense: torch.nn.Module, stats: Statistics, target: str,
) -> None:
    """On the calibration data the closed form is exact: tr(W_P R W_P^T) is E||delta attention output||^2 per token."""
    x = calib_images(48, size=64).double()
    ref = _attn_out(dense, x)
    errs = {}
    for comp in (True, False):
        result = api.prune(dense, stats, target=target, sparsity=0.5, compensation=comp)
        got = _attn_out(result.model, x)
        measured = float((got - ref).square().sum(1).mean())
        entry = result.blocks[0]["vo"]
        predicted = entry["predicted_error_compensated" if comp else "predicted_error_uncompensated"]
        assert measured == pytest.approx(predicted, rel=1e-6)
        errs[comp] = measured
        assert entry["kept"] < entry["width"]
    assert errs[True] <= errs[False]


def test_the_error_ranker_scores_each_head_by_its_compensated_removal(dense: torch.nn.Module, stats: Statistics) -> None:
    from corp_cli.family import ModelFamily

    fam: ModelFamily = api.adopt(dense).family
    w = fam.vo_weights(dense, 0).out_weight
    m = engine.mlp_moments(stats.blocks[0]["vo"])
    lam = 1e-3 * float(torch.trace(m.cov)) / 192
    scores = engine.head_error_scores(w, m.cov, lam, 3)
    for h in range(3):
        prune = torch.arange(h * 64, (h + 1) * 64)
        keep = engine.complement(prune, 192)
        sol = engine.ridge_compensation(m, keep, prune, lam)
        assert float(scores[h]) == pytest.approx(engine.mlp_predicted_error(w, m, keep, prune, sol.b), rel=1e-5)
    order = engine.head_greedy_order(w, m.cov, lam, 3)
    assert sorted(order.tolist()) == [0, 1, 2] and int(order[-1]) == int(torch.argmin(scores))  # removed first


def test_vo_statistics_merge_and_refuse_a_wrong_shape(tmp_path: Path) -> None:
    from corp_cli.data import open_source

    loaded = api.adopt(random_model(depth=2))
    shards = []
    for k in range(2):
        src = open_source("synthetic", samples=4, shard=(k, 2))
        shards.append(api.calibrate(loaded, src, parts=("mlp", "vo"), batch_size=2))
    one = api.calibrate(loaded, open_source("synthetic", samples=4), parts=("mlp", "vo"), batch_size=4)
    merged = merge(shards)
    torch.testing.assert_close(merged.blocks[1]["vo"]["gram"], one.blocks[1]["vo"]["gram"], rtol=1e-6, atol=1e-6)
    path = tmp_path / "s.safetensors"
    one.save(path)
    assert Statistics.load(path).parts == ["mlp", "vo"]
    tensors = load_file(str(path))
    tensors["blocks.0.vo.sum"] = tensors["blocks.0.vo.sum"][:-1]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ArtifactError, match="blocks.0.vo.sum"):
        Statistics.load(bad)


# ------------------------------------------------------------------ the CLI chain


def _invoke(*args: object) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (res.exit_code, res.output, res.exception)
    return res.output


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vo_chain")
    stats, old = root / "stats.safetensors", root / "old.safetensors"
    common = ["--checkpoint", tiny_ckpt, "--data", "synthetic", "--samples", 4, "--batch-size", 4]
    _invoke("calibrate", MODEL, *common, "--parts", "mlp,attn,vo", "--out", stats)
    _invoke("calibrate", MODEL, *common, "--out", old)  # the default parts: what older files hold
    return {"stats": stats, "old": old, "ckpt": tiny_ckpt, "root": root}


def test_statistics_without_vo_sums_say_to_recalibrate_in_one_line(chain: dict[str, Path]) -> None:
    assert Statistics.load(chain["old"]).parts == ["mlp", "attn"]
    for target in ("all", "heads"):
        res = runner.invoke(app, ["prune", MODEL, "--checkpoint", str(chain["ckpt"]), "--stats", str(chain["old"]),
                                  "--target", target, "--out", str(chain["root"] / "x")])
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert "recalibrate with --parts mlp,attn,vo" in lines[0]
    assert not (chain["root"] / "x").exists()


@pytest.mark.slow
def test_vo_and_heads_masks_reapply_exactly_and_the_checkpoint_evaluates_and_benchmarks(chain: dict[str, Path]) -> None:
    root, ckpt = chain["root"], chain["ckpt"]
    first, again = root / "p1", root / "p2"
    args = ["prune", MODEL, "--checkpoint", ckpt, "--stats", chain["stats"]]
    rep = json.loads(_invoke(*args, "--target", ALL4, "--sparsity", "0.5", "--vo-sparsity", "0.25",
                             "--head-ranker", "greedy", "--out", first, "--json", "-"))
    assert rep["options"]["target"] == ALL4 and rep["options"]["head_ranker"] == "greedy"
    for b in rep["blocks"]:
        assert b["vo"]["heads_kept"] == 2 and b["vo"]["v_kept"] == 48 and b["attn"]["qk_kept"] == 32
    out = _invoke(*args, "--masks", first / "masks.safetensors", "--out", again)
    assert "heads" in out
    a, b = load_file(str(first / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a --target that disagrees with what the masks hold is refused
    res = runner.invoke(app, [str(x) for x in (*args, "--masks", first / "masks.safetensors", "--target", "both",
                                               "--out", root / "p3")])
    assert res.exit_code == 2 and f"--masks hold target {ALL4}" in res.stderr

    from corp_cli import load_pruned

    model = load_pruned(first)
    assert [blk.attn.num_heads for blk in model.blocks] == [2] * 12 and model.blocks[0].attn.v_dim == 48
    ev = json.loads(_invoke("evaluate", first, "--data", "synthetic", "--samples", 4, "--reference", MODEL,
                            "--reference-checkpoint", ckpt, "--json", "-"))
    assert ev["results"]["samples"] == 4 and 0 <= ev["results"]["fidelity"]["top1_agreement"] <= 1
    bench = json.loads(_invoke("benchmark", first, "--batch-sizes", "1", "--runs", "1", "--warmup", "0", "--json", "-"))
    from corp_cli.flops import model_counts

    assert bench["model"]["flops_per_item"] == model_counts(model)["flops"] < model_counts(random_model())["flops"]
    assert bench["model"]["architecture"]["blocks"][0] == {"mlp_hidden": 384, "num_heads": 2, "qk_dim": 32, "v_dim": 48}

